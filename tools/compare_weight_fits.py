#!/usr/bin/env python3
"""Compare the DSConv KDS fits "l2" (paper) and "mse" (clipping grid search) on weight error.

For bits 2..8 and blocks {8, 32, 64, 128} it measures, per weight source, the relative squared
error sum ||W - W_hat||^2 / sum ||W||^2 and the SQNR in dB (= -10 log10 of it) of both fits:

* synthetic conv weights: Gaussian and Laplacian, shapes 64x64x3x3 and 256x128x3x3;
* every ONNX model matched by ``--models`` (default ``models/*.onnx`` in the repo): all Conv weight
  initializers with group == 1, folded with their BatchNormalization when a Conv feeds exactly one
  BN whose parameters are initializers (``--no-fold`` disables it).  Errors are summed over layers.

Prints a table and writes it as JSON to ``--out`` (default ``scratch/weight_fits.json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsconv_tvm.scheme.weights import alpha_grid, quantize_weight
from dsconv_tvm.frontend.batchnorm import fold_batchnorm  # noqa: E402


def synthetic_sources(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for shape in ((64, 64, 3, 3), (256, 128, 3, 3)):
        name = "x".join(map(str, shape))
        out[f"gauss {name}"] = [(rng.standard_normal(shape) * 0.05).astype(np.float32)]
        out[f"laplace {name}"] = [(rng.laplace(size=shape) * 0.05).astype(np.float32)]
    return out


def onnx_conv_weights(path: str, fold: bool = True) -> tuple[list[np.ndarray], dict]:
    """Conv weights (group == 1, 4-D initializers) of an ONNX model, BN-folded where possible."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights, info = [], {"convs": 0, "folded": 0, "skipped": 0}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) < 2 or node.input[1] not in inits or attrs.get("group", 1) != 1:
            info["skipped"] += 1
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if w.ndim != 4:
            info["skipped"] += 1
            continue
        info["convs"] += 1
        users = consumers.get(node.output[0], [])
        if fold and len(users) == 1 and users[0].op_type == "BatchNormalization" \
                and all(n in inits for n in users[0].input[1:5]):
            bn = users[0]
            eps = next((onnx.helper.get_attribute_value(a) for a in bn.attribute
                        if a.name == "epsilon"), 1e-5)
            bias = numpy_helper.to_array(inits[node.input[2]]) \
                if len(node.input) > 2 and node.input[2] in inits else None
            gamma, beta, mean, var = (numpy_helper.to_array(inits[n]) for n in bn.input[1:5])
            w, _ = fold_batchnorm(w, bias, gamma, beta, mean, var, eps)
            info["folded"] += 1
        weights.append(w)
    return weights, info


def measure(ws: list[np.ndarray], bits: int, block: int, fit: str) -> tuple[float, float]:
    """(relative squared error over all tensors, seconds)."""
    num = den = 0.0
    t = time.perf_counter()
    for w in ws:
        w64 = w.astype(np.float64)
        d = w64 - quantize_weight(w, bits, block, fit).dequantize().astype(np.float64)
        num += float(np.sum(d * d))
        den += float(np.sum(w64 * w64))
    return (num / den if den else 0.0), time.perf_counter() - t


def sqnr(rel: float) -> float:
    return math.inf if rel == 0 else -10.0 * math.log10(rel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=[str(REPO / "models" / "*.onnx")],
                    help="ONNX files or glob patterns (default: models/*.onnx in the repo)")
    ap.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)))
    ap.add_argument("--blocks", type=int, nargs="+", default=[8, 32, 64, 128])
    ap.add_argument("--no-fold", action="store_true", help="do not fold Conv->BatchNormalization")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--out", default=str(REPO / "scratch" / "weight_fits.json"))
    args = ap.parse_args(argv)

    sources = {} if args.no_synthetic else synthetic_sources()
    model_info = {}
    paths = sorted({p for pat in args.models for p in glob.glob(pat)})
    for p in paths:
        ws, info = onnx_conv_weights(p, fold=not args.no_fold)
        model_info[p] = info
        if ws:
            sources[f"onnx {Path(p).name}"] = ws
    if not paths:
        print(f"no ONNX models matched {args.models}; synthetic weights only")

    rows = []
    hdr = (f"{'source':28s} {'bits':>4s} {'B':>4s} {'relerr l2':>10s} {'relerr mse':>10s} "
           f"{'SQNR l2':>8s} {'SQNR mse':>8s} {'gain dB':>7s} {'mse s':>6s}")
    print(hdr + "\n" + "-" * len(hdr))
    for src, ws in sources.items():
        for bits in args.bits:
            for block in args.blocks:
                e_l2, _ = measure(ws, bits, block, "l2")
                e_mse, t_mse = measure(ws, bits, block, "mse")
                row = {"source": src, "bits": bits, "block": block,
                       "weights": int(sum(w.size for w in ws)), "tensors": len(ws),
                       "relerr_l2": e_l2, "relerr_mse": e_mse, "sqnr_db_l2": sqnr(e_l2),
                       "sqnr_db_mse": sqnr(e_mse), "gain_db": sqnr(e_mse) - sqnr(e_l2),
                       "mse_seconds": t_mse}
                rows.append(row)
                print(f"{src:28s} {bits:4d} {block:4d} {e_l2:10.3e} {e_mse:10.3e} "
                      f"{row['sqnr_db_l2']:8.2f} {row['sqnr_db_mse']:8.2f} {row['gain_db']:7.2f} "
                      f"{t_mse:6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"alpha_grid": {b: [round(float(alpha_grid(b)[0]), 5), 1.0, len(alpha_grid(b))]
                           for b in args.bits},
            "models": model_info, "fold_batchnorm": not args.no_fold}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
