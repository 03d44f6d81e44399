#!/usr/bin/env python3
"""Issue-5 ImageNet-net agreement: MobileNetV2 and EfficientNet-Lite0 (tools/imagenet_models.py), fp32
(ONNX Runtime) vs the compiled DSConv model (`dsconv-tvm eval`), on the 30 package photos
(tools/photo_set.py agreement) with the centre crop + 4 seeded random crops each (150 inputs), for
the first-layer policies keep / dsconv; plus the 20 labelled ImageNet images (centre crop) as a
sanity check only.

With ``--adapt``: instead, `dsconv-tvm adapt` on the 10 non-ImageNet photos (tools/photo_set.py photos,
centre + 6 crops with seed 1 = 70 unlabelled inputs), then agreement of the plain and the adapted
model on the agreement set (its 10 photos were seen in calibration, with other crops) and on the 20
ImageNet photos alone (never seen: centre + 4 crops, seed 0 = 100 inputs).  Writes
results/imagenet_adapted.json.

Writes results/imagenet_agreement.json and prints a markdown table.
Usage: python tools/imagenet_agreement.py [--models mobilenet_v2 efficientnet_lite0] [--bits 4] [--crops 4] [--adapt]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from dsconv_tvm.cli import main as cli  # noqa: E402
from imagenet_models import ensure_model  # noqa: E402
from photo_set import ensure_photo_set  # noqa: E402


def eval_json(*args) -> dict:
    """``dsconv-tvm eval ARGS --json``, its JSON report (stdout to stderr; one line on failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        with contextlib.redirect_stdout(sys.stderr):
            rc = cli.main(["eval", *map(str, args), "--json", out])
        if rc != 0:
            raise SystemExit(f"dsconv-tvm eval {' '.join(map(str, args))} failed ({rc})")
        return json.load(open(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4])
    ap.add_argument("--first-layer", nargs="+", default=["keep", "dsconv"])
    ap.add_argument("--crops", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(REPO, "results", "imagenet_agreement.json"))
    ap.add_argument("--adapt", action="store_true")
    ap.add_argument("--rounding", default="gptq", choices=["gptq", "nearest"], help="with --adapt")
    args = ap.parse_args(argv)
    if args.adapt:
        return adapted(args)
    photos = ensure_photo_set("agreement")
    labelled = ensure_photo_set("imagenet20")
    rows = []
    for name in args.models:
        model = ensure_model(name)
        for bits in args.bits:
            for first in args.first_layer:
                scheme = ["--bits", bits, "--block", 32, "--mantissa", 8, "--first-layer", first]
                a = eval_json(model, "--images", photos, "--crops", args.crops, "--seed", 0, "--batch", 10,
                          "--sqnr-images", 10, *scheme)
                s = eval_json(model, "--images", labelled, "--labels-from-names", "--crops", 0, "--batch", 10,
                          "--sqnr-images", 0, *scheme)
                row = {"model": name, "bits": bits, "block": 32, "mantissa": 8, "first_layer": first,
                       "depthwise": "keep", "samples": a["n"], "agreement": a["agreement"],
                       "fp32_in_top5": a["fp32_in_top5"], "confident_agreement": a["confident_agreement"],
                       "confident_n": a["confident_n"], "weight_bytes_fp32": a["weight_bytes_fp32"],
                       "weight_bytes_deployed": a["weight_bytes_deployed"],
                       "min_layer_sqnr_db": min(l["sqnr_db"] for l in a["layers"] if l["converted"]),
                       "imagenet20_fp32_top1": s["fp32_top1"], "imagenet20_dsconv_top1": s["dsconv_top1"],
                       "imagenet20_fp32_top5": s["fp32_top5"], "imagenet20_dsconv_top5": s["dsconv_top5"]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print("| model | W | first layer | inputs | top-1 agreement | fp32 top-1 in DSConv top-5 | agreement (fp32 p>=0.5) "
          "| weight bytes fp32 -> deployed | ImageNet-20 top-1 fp32 / DSConv (sanity) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bits']} | {r['first_layer']} | {r['samples']} | {r['agreement']:.4f} | "
              f"{r['fp32_in_top5']:.4f} | {r['confident_agreement']:.4f} ({r['confident_n']}) | "
              f"{r['weight_bytes_fp32']} -> {r['weight_bytes_deployed']} | "
              f"{20 * r['imagenet20_fp32_top1']:.0f}/20 / {20 * r['imagenet20_dsconv_top1']:.0f}/20 |")
    return 0


def adapted(args) -> int:
    photos = ensure_photo_set("agreement")
    calib = ensure_photo_set("photos")
    held_out = ensure_photo_set("imagenet20")
    out = args.out.replace("imagenet_agreement", "imagenet_adapted" + ("" if args.rounding == "gptq" else "_nearest"))
    rows = []
    for name in args.models:
        model = str(ensure_model(name))
        for bits in args.bits:
            scheme = ["--bits", bits, "--block", 32, "--mantissa", 8]
            with tempfile.TemporaryDirectory() as tmp:
                ad = os.path.join(tmp, "adapted.onnx")
                import time
                t0 = time.time()
                with contextlib.redirect_stdout(sys.stderr):
                    rc = cli.main(["adapt", model, "--images", str(calib), "--crops", "6", "--seed", "1",
                                   "--rounding", args.rounding, "-o", ad, *map(str, scheme)])
                if rc:
                    raise SystemExit(f"adapt failed ({rc})")
                secs = time.time() - t0
                row = {"model": name, "bits": bits, "block": 32, "mantissa": 8, "calib_inputs": 70, "rounding": args.rounding,
                       "adapt_seconds": round(secs, 1)}
                for tag, folder, crops in (("agreement_set", photos, args.crops), ("imagenet20_held_out", held_out, 4)):
                    base = eval_json(model, "--images", folder, "--crops", crops, "--seed", 0, "--batch", 10,
                                 "--sqnr-images", 0, *scheme)
                    new = eval_json(ad, "--reference", model, "--images", folder, "--crops", crops, "--seed", 0,
                                "--batch", 10, "--sqnr-images", 0, *scheme)
                    row[tag] = {"samples": base["n"], "agreement": base["agreement"],
                                "adapted_agreement": new["agreement"], "fp32_in_top5": base["fp32_in_top5"],
                                "adapted_fp32_in_top5": new["fp32_in_top5"]}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    os.replace(out + ".tmp", out)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
