#!/usr/bin/env python3
"""Measures the spine's numbers for the shipped example models, through the CLI:

* top-1 on the 10 000 Fashion-MNIST test images: fp32 (ONNX Runtime), fp32 compiled by TVM, and
  DSConv W4 B=32 m=8 compiled by `dsconv-tvm compile` and run by `dsconv-tvm run` (the real kernels),
  plus the paper's L2 scale fit for comparison with the default (mse) fit;
* untuned latency at batch 1 (TVM time_evaluator median of 30 x 5 calls): DSConv vs the fp32
  model compiled by TVM with the same (default, untuned) pipeline;
* weight bytes: fp32 conv weights vs deployed DSConv weights.

Writes a JSON file and prints a markdown table.
Usage: python tools/spine_report.py [--models models/*.onnx] [--out results/spine_x86.json]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dsconv_tvm.cli import main as cli  # noqa: E402
from dsconv_tvm.driver.compile import build, build_relax  # noqa: E402
from dsconv_tvm.accuracy.datasets import load_fashion_mnist  # noqa: E402
from dsconv_tvm.execute.runner import latency_ms
from dsconv_tvm.accuracy.probes import onnx_predict
from dsconv_tvm.execute.compare import top1  # noqa: E402
from dsconv_tvm.frontend.onnx import load_onnx  # noqa: E402
from dsconv_tvm.target import get_target
from dsconv_tvm.host import host_features  # noqa: E402


def _cli(*args) -> None:
    with contextlib.redirect_stdout(sys.stderr):      # the CLI's summaries go to the log
        rc = cli.main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"dsconv-tvm {' '.join(map(str, args))} failed with exit code {rc}")


def measure(model: str, work: str, x: np.ndarray, y: np.ndarray, batch: int) -> dict:
    name = os.path.splitext(os.path.basename(model))[0]
    row = {"model": name}
    row["fp32_ort_top1"] = top1(onnx_predict(model, x), y)
    np.save(os.path.join(work, "x.npy"), x)
    shapes = f"input:[{batch},1,28,28]"
    for fit in ("l2", "mse"):
        so = os.path.join(work, f"{name}_{fit}.so")
        rep = os.path.join(work, f"{name}_{fit}.json")
        _cli("compile", model, "--target", "x86", "-o", so, "--bits", 4, "--block", 32, "--mantissa", 8,
             "--fit", fit, "--input-shapes", shapes, "--no-check", "--report-json", rep)
        out = os.path.join(work, f"{name}_{fit}_y.npy")
        _cli("run", so, "--input", os.path.join(work, "x.npy"), "--output", out)
        row[f"dsconv_{fit}_top1"] = top1(np.load(out), y)
        if fit == "l2":                       # the default
            layers = json.load(open(rep))["layers"]
            row["conv_fp32_bytes"] = sum(l["fp32_bytes"] for l in layers)
            row["conv_deployed_bytes"] = sum(l["deployed_bytes"] for l in layers)
            row["converted_fp32_bytes"] = sum(l["fp32_bytes"] for l in layers if l["converted"])
            row["converted_deployed_bytes"] = sum(l["deployed_bytes"] for l in layers if l["converted"])
            row["layers_converted"] = sum(l["converted"] for l in layers)
            row["layers_kept"] = sum(not l["converted"] for l in layers)
    # fp32 compiled by TVM (same untuned pipeline), accuracy and latency
    loaded = load_onnx(model, {"input": [batch, 1, 28, 28]})
    fp32_so = os.path.join(work, f"{name}_fp32.so")
    spec = get_target("x86")
    spec.export_library(build(build_relax(loaded, None)[0], spec), fp32_so)
    from dsconv_tvm.execute.runner import predict
    row["fp32_tvm_top1"] = top1(predict(fp32_so, x), y)
    # batch-1 latency, both untuned
    lat = {}
    loaded1 = load_onnx(model, {"input": [1, 1, 28, 28]})
    fp32_1 = os.path.join(work, f"{name}_fp32_b1.so")
    spec.export_library(build(build_relax(loaded1, None)[0], spec), fp32_1)
    ds_1 = os.path.join(work, f"{name}_dsconv_b1.so")
    _cli("compile", model, "--target", "x86", "-o", ds_1, "--no-check")
    for key, so in (("fp32_tvm", fp32_1), ("dsconv", ds_1)):
        lat[key] = latency_ms(so)
    row["latency"] = lat
    row["latency_ratio_dsconv_over_fp32"] = lat["dsconv"]["median_ms"] / lat["fp32_tvm"]["median_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=sorted(glob.glob(os.path.join(REPO, "models", "*.onnx"))))
    ap.add_argument("--out", default=os.path.join(REPO, "results", "spine_x86.json"))
    ap.add_argument("--batch", type=int, default=100, help="compiled batch for the accuracy runs")
    ap.add_argument("--limit", type=int, default=10000, help="test images used (default all 10 000)")
    args = ap.parse_args()
    x, y = load_fashion_mnist("test")
    x, y = x[:args.limit], y[:args.limit]
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            print(f"== {model}", file=sys.stderr, flush=True)
            rows.append(measure(model, work, x, y, args.batch))
    from tvm.target import codegen
    result = {"machine": {"cpu": codegen.llvm_get_system_cpu(), "features": host_features(),
                          "cores": os.cpu_count(), "python": platform.python_version()},
              "images": int(len(x)), "seconds": round(time.time() - t0, 1), "models": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print("| model | fp32 ORT | fp32 TVM | DSConv W4 (l2, default) | DSConv W4 (mse fit) | loss (default) | "
          "conv bytes fp32 -> deployed | converted only | fp32 TVM ms | DSConv ms | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r["latency"]
        print(f"| {r['model']} | {100 * r['fp32_ort_top1']:.2f} | {100 * r['fp32_tvm_top1']:.2f} | "
              f"{100 * r['dsconv_l2_top1']:.2f} | {100 * r['dsconv_mse_top1']:.2f} | "
              f"{100 * (r['fp32_ort_top1'] - r['dsconv_l2_top1']):.2f} pt | "
              f"{r['conv_fp32_bytes']} -> {r['conv_deployed_bytes']} "
              f"({r['conv_deployed_bytes'] / r['conv_fp32_bytes']:.3f}x) | "
              f"{r['converted_deployed_bytes'] / max(r['converted_fp32_bytes'], 1):.3f}x | "
              f"{lat['fp32_tvm']['median_ms']:.3f} | {lat['dsconv']['median_ms']:.3f} | "
              f"{r['latency_ratio_dsconv_over_fp32']:.3f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
