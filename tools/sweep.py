#!/usr/bin/env python3
"""Issue-5 sweep: accuracy vs deployed conv-weight bytes of DSConv (compiled, `dsconv-tvm eval`),
one factor at a time around the default W4 B=32 m=8 (bits 2..8, block 8..128, mantissa 4..8) plus a
few combinations, with ONNX Runtime static int8 PTQ (QDQ, per-channel weights, calibrated on
unlabelled training images) on the same models and data as the reference point.

The full grid (7 x 5 x 5 per model) is ~175 compiles + runs per model; on 2 cores that is hours, so
this runs the one-factor-at-a-time lines and the combinations listed in COMBOS.

Fashion-MNIST models: top-1 on the first --limit test images (default 1000, +-1 pt; the 10 000-image numbers
are in results/accuracy_fashion.json).  ImageNet nets (mobilenet_v2, efficientnet_lite0): top-1
agreement with fp32 on the photo set (30 photos x (centre + 4 seeded crops)).

Writes results/sweep.json, results/sweep.md and results/sweep.png.
Usage: python tools/sweep.py [--models resnet20 vgg_small mobilenet_small mobilenet_v2 efficientnet_lite0]
                             [--limit 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from imagenet_agreement import eval_json  # noqa: E402

DEFAULT = {"bits": 4, "block": 32, "mantissa": 8}
LINES = {"bits": [2, 3, 4, 5, 6, 8], "block": [8, 16, 32, 64, 128], "mantissa": [4, 5, 6, 7, 8]}
COMBOS = [{"bits": 3, "block": 8, "mantissa": 8}, {"bits": 8, "block": 128, "mantissa": 8},
          {"bits": 4, "block": 8, "mantissa": 6}, {"bits": 5, "block": 16, "mantissa": 8},
          {"bits": 4, "block": 32, "mantissa": 8, "first_layer": "dsconv"}]
FASHION = ("resnet20", "vgg_small", "mobilenet_small")
# the ImageNet nets run ~10x longer per point: the bits line, two block sizes and the first-layer policy
IMAGENET_CONFIGS = [dict(DEFAULT, bits=b) for b in (4, 5, 6, 8)] + [
    dict(DEFAULT, block=8), dict(DEFAULT, first_layer="dsconv")]


def configs(quick: bool) -> list[dict]:
    out = [dict(DEFAULT)]
    for key, values in LINES.items():
        for v in values:
            c = dict(DEFAULT, **{key: v})
            if c not in out and (not quick or v in (3, 4, 8, 64, 6)):
                out.append(c)
    for c in COMBOS:
        c = dict(DEFAULT, **c)
        if c not in out:
            out.append(c)
    return out


def model_and_data(name: str, limit: int):
    """(onnx path, eval data arguments, calibration images for ORT PTQ, eval inputs, labels or None)."""
    if name in FASHION:
        from dsconv_tvm.accuracy.datasets import load_fashion_mnist, load_fashion_mnist_images

        x, y = load_fashion_mnist("test")
        calib = load_fashion_mnist_images("train")[:512]
        return (os.path.join(REPO, "models", f"{name}.onnx"), ["--data", "fashion-mnist", "--limit", limit],
                calib, x[:limit], y[:limit])
    from imagenet_models import ensure_model
    from photo_set import ensure_photo_set

    from dsconv_tvm.accuracy.images import load_images

    model = str(ensure_model(name))
    photos = str(ensure_photo_set("agreement"))
    x, _, _ = load_images(photos, (3, 224, 224), crops=4, seed=0)
    calib, _, _ = load_images(photos, (3, 224, 224), crops=2, seed=123)   # other crops of the photos
    return model, ["--images", photos, "--crops", 4, "--seed", 0], calib, x, None


def ort_int8(model: str, calib: np.ndarray, x: np.ndarray, labels, work: str) -> dict:
    """ONNX Runtime static int8 PTQ (QDQ, per-channel int8 weights, uint8 activations, MinMax
    calibration on ``calib``): top-1 / agreement on ``x`` and the int8 conv weight bytes."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    from dsconv_tvm.accuracy.probes import onnx_predict
    from dsconv_tvm.frontend.onnx import load_onnx

    loaded = load_onnx(model)
    fp32_path = os.path.join(work, "folded.onnx")
    onnx.save(loaded.model, fp32_path)        # BN folded, as DSConv sees it
    name = next(iter(loaded.input_shapes))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(calib), 16))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {name: calib[i:i + 16]}

    q_path = os.path.join(work, "int8.onnx")
    quantize_static(fp32_path, q_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["Conv"])
    ref = onnx_predict(model, x, batch=50)
    out = onnx_predict(q_path, x, batch=50)
    convs = [n for n in loaded.model.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in loaded.model.graph.initializer}
    nbytes = 0
    for n in convs:
        dims = inits[n.input[1]].dims
        nbytes += int(np.prod(dims)) + 4 * int(dims[0])      # int8 weights + one float scale per channel
    row = {"scheme": "ORT int8 PTQ", "weight_bytes": nbytes,
           "agreement": float(np.mean(ref.argmax(1) == out.argmax(1)))}
    if labels is not None:
        row["top1"] = float(np.mean(out.argmax(1) == labels))
        row["fp32_top1"] = float(np.mean(ref.argmax(1) == labels))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(FASHION) + ["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="fewer points per line")
    ap.add_argument("--plot-only", action="store_true", help="redraw table and plot from the JSON")
    ap.add_argument("--out", default=os.path.join(REPO, "results", "sweep"))
    args = ap.parse_args(argv)
    results = {}
    if os.path.exists(args.out + ".json"):          # resume: keep what was measured
        results = json.load(open(args.out + ".json"))
    for name in ([] if args.plot_only else args.models):
        model, data, calib, x, labels = model_and_data(name, args.limit)
        rows = results.get(name, [])
        done = {json.dumps(r["config"], sort_keys=True) for r in rows if "config" in r}
        with tempfile.TemporaryDirectory() as work:
            if not any(r.get("scheme") == "ORT int8 PTQ" for r in rows):
                t0 = time.time()
                rows.append(dict(ort_int8(model, calib, x, labels, work), seconds=round(time.time() - t0, 1)))
                print(name, json.dumps(rows[-1]), file=sys.stderr, flush=True)
            for c in (configs(args.quick) if name in FASHION else IMAGENET_CONFIGS):
                key = json.dumps(c, sort_keys=True)
                if key in done:
                    continue
                t0 = time.time()
                scheme = ["--bits", c["bits"], "--block", c["block"], "--mantissa", c["mantissa"],
                          "--first-layer", c.get("first_layer", "keep")]
                r = eval_json(model, *data, "--batch", 50 if labels is not None else 10, "--sqnr-images", 0, *scheme)
                row = {"scheme": "DSConv", "config": c, "weight_bytes": r["weight_bytes_deployed"],
                       "weight_bytes_fp32": r["weight_bytes_fp32"], "agreement": r["agreement"],
                       "fp32_in_top5": r["fp32_in_top5"], "n": r["n"], "seconds": round(time.time() - t0, 1)}
                if r["fp32_top1"] is not None:
                    row["top1"], row["fp32_top1"] = r["dsconv_top1"], r["fp32_top1"]
                rows.append(row)
                print(name, json.dumps(row), file=sys.stderr, flush=True)
                results[name] = rows
                _save(args.out, results)
        results[name] = rows
        _save(args.out, results)
    write_table(args.out, results)
    plot(args.out, results)
    return 0


def _save(out: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".json.tmp", out + ".json")


def _label(r: dict) -> str:
    if r["scheme"] != "DSConv":
        return r["scheme"]
    c = r["config"]
    return f"W{c['bits']} B{c['block']} m{c['mantissa']}" + (" first=dsconv" if c.get("first_layer") == "dsconv" else "")


def _metric(r: dict) -> tuple[float, str]:
    if "top1" in r:
        return 100 * r["top1"], "top-1 %"
    return 100 * r["agreement"], "top-1 agreement with fp32 %"


def write_table(out: str, results: dict) -> None:
    lines = []
    for name, rows in results.items():
        fp32 = next((r.get("fp32_top1") for r in rows if r.get("fp32_top1") is not None), None)
        lines.append(f"\n### {name}" + (f" (fp32 top-1 {100 * fp32:.2f} % on these images)" if fp32 else
                                         " (agreement with fp32 on the photo set)"))
        lines.append("| scheme | conv weight bytes | top-1 % | agreement | fp32 top-1 in top-5 |")
        lines.append("|---|---|---|---|---|")
        for r in rows:
            top1 = f"{100 * r['top1']:.2f}" if "top1" in r else "-"
            t5 = f"{r['fp32_in_top5']:.4f}" if "fp32_in_top5" in r else "-"
            lines.append(f"| {_label(r)} | {r['weight_bytes']} | {top1} | {r['agreement']:.4f} | {t5} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines).lstrip() + "\n")


def plot(out: str, results: dict) -> None:
    from bench_models import subplot_grid

    n = len(results)
    fig, axes = subplot_grid(n, 5.2, 4.2)
    marker = {"bits": "o", "block": "s", "mantissa": "^"}
    for ax, (name, rows) in zip(axes.flat, results.items()):
        for key, vals in LINES.items():
            pts = [r for r in rows if r["scheme"] == "DSConv" and "first_layer" not in r["config"]
                   and all(r["config"][k] == DEFAULT[k] for k in DEFAULT if k != key)]
            pts.sort(key=lambda r: r["config"][key])
            if pts:
                ax.plot([r["weight_bytes"] / 1024 for r in pts], [_metric(r)[0] for r in pts],
                        marker=marker[key], label=f"{key} line", alpha=0.8)
                for r in pts:
                    ax.annotate(f"{key[0]}{r['config'][key]}", (r["weight_bytes"] / 1024, _metric(r)[0]),
                                fontsize=6, xytext=(2, 2), textcoords="offset points")
        combos = [r for r in rows if r["scheme"] == "DSConv" and (
            "first_layer" in r["config"] or sum(r["config"][k] != DEFAULT[k] for k in DEFAULT) > 1)]
        if combos:
            ax.scatter([r["weight_bytes"] / 1024 for r in combos], [_metric(r)[0] for r in combos],
                       marker="x", color="k", label="combinations")
            for r in combos:
                ax.annotate(_label(r), (r["weight_bytes"] / 1024, _metric(r)[0]), fontsize=5,
                            xytext=(2, -6), textcoords="offset points")
        for r in rows:
            if r["scheme"] != "DSConv":
                ax.scatter([r["weight_bytes"] / 1024], [_metric(r)[0]], marker="*", s=120, color="r",
                           label=r["scheme"])
        fp32 = next((r.get("fp32_top1") for r in rows if r.get("fp32_top1") is not None), None)
        if fp32:
            ax.axhline(100 * fp32, color="gray", ls="--", lw=0.8, label="fp32")
        ax.set_xscale("log")
        ax.set_xlabel("deployed conv weight KiB (log)")
        ax.set_ylabel(_metric(rows[0])[1] if rows else "")
        ax.set_title(name, fontsize=9)
        top = 100.5 if fp32 is None else 100 * fp32 + 1
        floor = top - (40 if fp32 is None else 7)
        off = [_label(r) for r in rows if _metric(r)[0] < floor]
        ax.set_ylim(floor, top)
        if off:
            ax.set_title(f"{name} (off scale: {', '.join(off)})", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out + ".png.tmp.png", dpi=130)
    os.replace(out + ".png.tmp.png", out + ".png")


if __name__ == "__main__":
    sys.exit(main())
