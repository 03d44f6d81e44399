#!/usr/bin/env python3
"""Issue-5 accuracy table of the Fashion-MNIST example models, through the CLI verbs:

for each model and each weight width (W4 and W3, B=32, m=8, l2 fit): top-1 on the 10 000 test images
of fp32 (ONNX Runtime) and of the compiled DSConv model (`dsconv-tvm eval`), then `dsconv-tvm adapt`
on the first N *unlabelled* training images and `eval` of the adapted model (against the original fp32).

Writes results/accuracy_fashion.json and prints a markdown table.
Usage: python tools/accuracy_report.py [--models ...] [--bits 4 3] [--calib 1024] [--rounding gptq|nearest]
                                      [--out results/accuracy_fashion.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dsconv_tvm.cli import main as cli  # noqa: E402


def _cli(*args) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        rc = cli.main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"dsconv-tvm {' '.join(map(str, args))} failed with exit code {rc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[os.path.join(REPO, "models", f"{m}.onnx")
                                                     for m in ("resnet20", "vgg_small", "mobilenet_small")])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--calib", type=int, default=1024, help="unlabelled training images for adapt")
    ap.add_argument("--limit", type=int, default=None, help="test images (default all 10 000)")
    ap.add_argument("--rounding", default="gptq", choices=["gptq", "nearest"])
    ap.add_argument("--out", default=os.path.join(REPO, "results", "accuracy_fashion.json"))
    ap.add_argument("--reuse-base", default=None, metavar="JSONL",
                    help="rows (one JSON object a line) of an earlier run: their un-adapted numbers are "
                         "reused for the same model and bits instead of evaluating again")
    args = ap.parse_args(argv)
    reuse = {}
    if args.reuse_base:
        for line in open(args.reuse_base):
            if line.strip():
                r = json.loads(line)
                reuse[(r["model"], r["bits"])] = r
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for model in args.models:
            name = os.path.splitext(os.path.basename(model))[0]
            for bits in args.bits:
                scheme = ["--bits", bits, "--block", 32, "--mantissa", 8, "--fit", "l2"]
                lim = ["--limit", args.limit] if args.limit else []
                base = os.path.join(work, f"{name}_w{bits}.json")
                old = reuse.get((name, bits))
                if old is None:
                    _cli("eval", model, "--data", "fashion-mnist", "--batch", 200, "--sqnr-images", 32,
                         "--json", base, *lim, *scheme)
                adapted = os.path.join(work, f"{name}_w{bits}_adapted.onnx")
                t0 = time.time()
                _cli("adapt", model, "--data", "fashion-mnist-unlabelled", "--limit", args.calib,
                     "--rounding", args.rounding, "-o", adapted, *scheme)
                adapt_s = time.time() - t0
                after = os.path.join(work, f"{name}_w{bits}_adapted.json")
                _cli("eval", adapted, "--reference", model, "--data", "fashion-mnist", "--batch", 200,
                     "--sqnr-images", 32, "--json", after, *lim, *scheme)
                a = json.load(open(after))
                b = json.load(open(base)) if old is None else {
                    "fp32_top1": old["fp32_top1"], "dsconv_top1": old["dsconv_top1"], "fp32_top5": old["fp32_top5"],
                    "dsconv_top5": old["dsconv_top5"], "agreement": old["agreement"], "n": old["test_images"],
                    "weight_bytes_fp32": old["weight_bytes_fp32"], "weight_bytes_deployed": old["weight_bytes_deployed"],
                    "layers": [{"sqnr_db": old["min_layer_sqnr_db"], "converted": True},
                               {"sqnr_db": old["last_layer_sqnr_db"], "converted": True}]}
                rows.append({"model": name, "bits": bits, "block": 32, "mantissa": 8,
                             "fp32_top1": b["fp32_top1"], "dsconv_top1": b["dsconv_top1"],
                             "adapted_top1": a["dsconv_top1"], "fp32_top5": b["fp32_top5"],
                             "dsconv_top5": b["dsconv_top5"], "adapted_top5": a["dsconv_top5"],
                             "agreement": b["agreement"], "adapted_agreement": a["agreement"],
                             "weight_bytes_fp32": b["weight_bytes_fp32"],
                             "weight_bytes_deployed": b["weight_bytes_deployed"],
                             "min_layer_sqnr_db": min(l["sqnr_db"] for l in b["layers"] if l["converted"]),
                             "adapted_min_layer_sqnr_db": min(l["sqnr_db"] for l in a["layers"] if l["converted"]),
                             "last_layer_sqnr_db": [l["sqnr_db"] for l in b["layers"]][-1],
                             "adapted_last_layer_sqnr_db": [l["sqnr_db"] for l in a["layers"]][-1],
                             "calib_images": args.calib, "rounding": args.rounding, "adapt_seconds": round(adapt_s, 1),
                             "test_images": b["n"]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print("| model | W | fp32 | DSConv | loss | adapted | loss | agreement | adapted agr. | adapt s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bits']} | {100 * r['fp32_top1']:.2f} | {100 * r['dsconv_top1']:.2f} | "
              f"{100 * (r['fp32_top1'] - r['dsconv_top1']):.2f} | {100 * r['adapted_top1']:.2f} | "
              f"{100 * (r['fp32_top1'] - r['adapted_top1']):.2f} | {r['agreement']:.4f} | "
              f"{r['adapted_agreement']:.4f} | {r['adapt_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
