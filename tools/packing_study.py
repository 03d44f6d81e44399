#!/usr/bin/env python3
"""Would denser 3/5/6-bit packing, or a block size per layer, pay?  Measured before building it.

For each Fashion-MNIST model: the per-layer output sensitivities of ``--bits auto`` (the same
``choose_bits`` call, 256 unlabelled training images) at every bits 2..8 and blocks 16/32/64, then the
exact knapsack at the same byte budgets under several *byte models*:

* ``nibble``  the packing before issue 13's second part: 2/3/4-bit weights as nibbles, 5..8 as bytes;
* ``cpu``     the CPU backend's packer today (2-bit weights four per byte; 3/4-bit nibbles; 5..8 bytes);
* ``planes``  a hypothetical b bits per weight for every b (3 = 2+1 bit planes, 5 = 4+1, 6 = 4+2, ...);
* ``cpu+B``, ``planes+B``  the same with a block size per layer (16, 32 or 64) as a knapsack option.

Each allocation is then simulated in ONNX Runtime (the BN-folded model with every converted conv's
weight replaced by its dequantized ``xi * q`` at the chosen bits and block; activations fp32: the BFP
activations at m = 8 are at 47-53 dB, far below these weight errors) on the first ``--limit`` test
images: top-1 agreement with fp32 and its binomial standard error.  Scales: fp32 (the default), one
per block, output channel and tap, counted in every byte model.

    python tools/packing_study.py [--models resnet20 ...] [--steps 0.01 0.03] [--limit 5000]
Writes results/packing_study.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from fit_study import build_sim, load_folded, run  # noqa: E402
from pareto import MODELS, NORMALISED  # noqa: E402

BITS = (2, 3, 4, 5, 6, 7, 8)
BLOCKS = (16, 32, 64)


def byte_models(choices: dict[int, list]) -> dict[str, list[dict]]:
    """Per byte model, per layer: {(bits, block): bytes}.  ``choices[B]`` = the LayerChoices at block B
    (bytes from the CPU packer, sensitivities from the model output)."""
    def planes(c, b):                  # b bits per slot (slots = the int8 layout's bytes) + the scales
        scales = c.bytes[8] - _slot_count(c)
        return -(-_slot_count(c) * b // 8) + scales

    def nibble(c, b):
        return c.bytes[4] if b <= 4 else c.bytes[8]

    out = {}
    for name, cost, blocks in (("nibble", nibble, (32,)), ("cpu", lambda c, b: c.bytes[b], (32,)),
                               ("planes", planes, (32,)), ("cpu+B", lambda c, b: c.bytes[b], BLOCKS),
                               ("planes+B", planes, BLOCKS)):
        bits = (4, 8) if name == "nibble" else (2, 3, 4, 5, 6, 8) if name.startswith("cpu") else BITS
        out[name] = [{(b, blk): cost(choices[blk][i], b) for b in bits for blk in blocks}
                     for i in range(len(choices[32]))]
    return out


def _slot_count(c) -> int:
    """Weight slots of a layer in the int8 layout (its 8-bit bytes minus the fp32 scales)."""
    co, ci, kh, kw = c.weight_shape
    return c.bytes[8] - 4 * co * (-(-ci // c.block)) * kh * kw


def study(name: str, args, log) -> dict:
    from onnx import numpy_helper

    from dsconv_tvm.accuracy.datasets import load_fashion_mnist, load_fashion_mnist_images
    from dsconv_tvm.accuracy.mixed import allocate, choose_bits
    from dsconv_tvm.config import DSConvConfig
    from dsconv_tvm.scheme.weights import quantize_weight

    path = str(REPO / "models" / f"{name}.onnx")
    norm = NORMALISED.get(name, (0.0, 1.0))
    calib = ((load_fashion_mnist_images("train")[:256] - norm[0]) / norm[1]).astype(np.float32)
    x, _ = load_fashion_mnist("test")
    x = ((x[:args.limit] - norm[0]) / norm[1]).astype(np.float32)
    allocs = {blk: choose_bits(path, DSConvConfig(block=blk), 1.0, calib, bits_options=BITS) for blk in BLOCKS}
    choices = {blk: a.layers for blk, a in allocs.items()}
    fixed, fp32 = allocs[32].fixed_bytes, allocs[32].fp32_bytes
    w4 = (fixed + sum(c.bytes[4] for c in choices[32])) / fp32
    model = load_folded(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    wname = {n.name: n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    ref = run(model, x)
    log(f"{name}: W4 at {w4:.4f} of fp32; {len(choices[32])} converted convs")
    rows = []
    for step in args.steps:
        budget = int(math.floor((w4 + step) * fp32)) - fixed
        for bm, costs in byte_models(choices).items():
            errs = [{k: choices[k[1]][i].sensitivity[k[0]] for k in cost} for i, cost in enumerate(costs)]
            path_ = allocate(costs, errs, budget)
            weights = {}
            for c, (b, blk) in zip(choices[32], path_):
                w = inits[wname[c.name]]
                weights[wname[c.name]] = quantize_weight(w, b, blk).dequantize()
            out = run(build_sim(model, weights), x)
            agree = float((out.argmax(1) == ref.argmax(1)).mean())
            used = sum(cost[k] for cost, k in zip(costs, path_)) + fixed
            hist = {}
            for k in path_:
                hist[f"W{k[0]}B{k[1]}"] = hist.get(f"W{k[0]}B{k[1]}", 0) + 1
            rows.append({"model": name, "step": step, "ratio": used / fp32, "byte_model": bm,
                         "predicted_error": sum(e[k] for e, k in zip(errs, path_)), "agreement": agree,
                         "se": math.sqrt(agree * (1 - agree) / len(x)), "n": len(x), "choices": hist})
            log(f"  +{step} {bm:9s} {used / fp32:.4f}x pred {rows[-1]['predicted_error']:.2e} "
                f"agree {agree:.4f}±{rows[-1]['se']:.4f} {hist}")
    return {"model": name, "w4_ratio": w4, "rows": rows}


def write_md(path: Path, results: list[dict]) -> None:
    bms = list(byte_models({b: [] for b in BLOCKS}))
    lines = ["# Would denser packing or a block size per layer pay? (`tools/packing_study.py`)", "",
             "Simulated top-1 agreement with fp32 (weights only, ORT) ± one binomial SE, at W4's bytes + step "
             "(fraction of the fp32 conv weight bytes); predicted error = Σ per-layer output sensitivity.", "",
             "| model | budget | " + " | ".join(bms) + " |", "|---|---|" + "---|" * len(bms)]
    for r in results:
        for step in sorted({x["step"] for x in r["rows"]}):
            cells = {x["byte_model"]: x for x in r["rows"] if x["step"] == step}
            lines.append(f"| {r['model']} | W4 + {step} ({r['w4_ratio'] + step:.3f}×) | " + " | ".join(
                f"{cells[b]['agreement']:.4f} ± {cells[b]['se']:.4f} ({cells[b]['predicted_error']:.1e})"
                for b in bms) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--steps", nargs="+", type=float, default=[0.0, 0.01, 0.03])
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--out", default=str(REPO / "results" / "packing_study"))
    args = ap.parse_args(argv)
    results = [study(m, args, lambda s: print(s, flush=True)) for m in args.models]
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    write_md(Path(args.out + ".md"), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
