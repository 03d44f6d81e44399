#!/usr/bin/env python3
"""Latency of mixed-precision models against uniform W4 and W8 (does mixed precision cost speed?).

For each model: compile uniform W4, uniform W8 and ``--bits auto`` at the given budgets (data-free
sensitivity, or ``--calib N`` unlabelled Fashion-MNIST training images) for this host (batch 1), then
time the three ``.so`` files interleaved (``rounds`` rounds of ``repeat`` x ``number`` runs each, so
that load from other processes hits them alike) and report the median of the per-round medians and
the minimum.  Writes ``results/mixed_latency.json``.  The ImageNet nets (``mobilenet_v2``,
``efficientnet_lite0``) take absolute ``--budgets`` and the calibration of ``tools/pareto_imagenet.py``
(70 crops of the 10 non-ImageNet package photos); their sensitivities at 2/4/8 bits only (the widths
with distinct CPU bytes).

    python tools/mixed_latency.py [--models resnet20 vgg_small ...] [--steps 0.03] [--rounds 5]
    python tools/mixed_latency.py --models efficientnet_lite0 --budgets 0.2 --out results/mixed_latency_imagenet.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from dsconv_tvm.accuracy.datasets import load_fashion_mnist_images  # noqa: E402
from dsconv_tvm.accuracy.mixed import choose_bits  # noqa: E402
from dsconv_tvm.config import DSConvConfig  # noqa: E402
from dsconv_tvm.driver.compile import compile_model  # noqa: E402
from dsconv_tvm.execute.runner import latency_ms  # noqa: E402

NORMALISED = {"dense_small": (0.286, 0.353)}
IMAGENET = ("mobilenet_v2", "efficientnet_lite0")


def model_and_calibration(name: str, calib: int):
    """(ONNX path, unlabelled calibration inputs, bits options) of a Fashion-MNIST or ImageNet model."""
    if name in IMAGENET:
        from imagenet_models import ensure_model
        from pareto_imagenet import input_sets

        return str(ensure_model(name)), input_sets((3, 224, 224))[3], (2, 4, 8)
    x = load_fashion_mnist_images("train")[:calib]
    if name in NORMALISED:
        m, s = NORMALISED[name]
        x = (x - m) / s
    return str(REPO / "models" / f"{name}.onnx"), x.astype("float32"), (2, 3, 4, 5, 6, 8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "vgg_small", "mobilenet_small"])
    ap.add_argument("--steps", nargs="+", type=float, default=[0.03],
                    help="budgets: the model's uniform W4 fraction + each step")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.2], help="budgets of the ImageNet nets")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "results" / "mixed_latency.json"))
    args = ap.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory(prefix="dsconv-lat-") as work:
        for name in args.models:
            model, x, bits_options = model_and_calibration(name, args.calib)
            libs = {}
            for b in (4, 8):
                so = os.path.join(work, f"{name}_w{b}.so")
                r = compile_model(model, "x86", so, DSConvConfig(bits=b), check=False)
                libs[f"W{b}"] = (so, sum(la.deployed_bytes for la in r.report.layers), None)
            fp32 = sum(la.fp32_bytes for la in r.report.layers)
            ratios = args.budgets if name in IMAGENET else [round(libs["W4"][1] / fp32 + s, 4) for s in args.steps]
            for ratio in ratios:
                a = choose_bits(model, DSConvConfig(), ratio, x, bits_options=bits_options)
                so = os.path.join(work, f"{name}_auto{ratio}.so")
                r = compile_model(model, "x86", so, DSConvConfig(layer_bits=a.layer_bits), check=False)
                libs[f"auto {ratio}"] = (so, sum(la.deployed_bytes for la in r.report.layers), a.layer_bits)
            times = {k: [] for k in libs}
            for _ in range(args.rounds):
                for k, (so, _, _) in libs.items():
                    t = latency_ms(so, repeat=10, number=5)
                    times[k].append(t)
            out[name] = {k: {"bytes": libs[k][1], "ratio": libs[k][1] / fp32,
                             "median_ms": statistics.median(t["median_ms"] for t in times[k]),
                             "min_ms": min(t["min_ms"] for t in times[k]),
                             "w8_layers": None if libs[k][2] is None else sum(v == 8 for v in libs[k][2].values()),
                             "w2_layers": None if libs[k][2] is None else sum(v == 2 for v in libs[k][2].values()),
                             "layers": None if libs[k][2] is None else len(libs[k][2])}
                         for k in libs}
            for k, v in out[name].items():
                print(f"{name:16s} {k:12s} {v['ratio']:.4f}x  median {v['median_ms']:.3f} ms  min {v['min_ms']:.3f} ms",
                      flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
