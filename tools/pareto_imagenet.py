#!/usr/bin/env python3
"""ImageNet-net Pareto: top-1 agreement with fp32 vs deployed conv weight bytes, for MobileNetV2 and
EfficientNet-Lite0 (tools/imagenet_models.py): uniform W3/W4/W5/W8, mixed precision (``choose_bits``,
the CPU backend's packed bytes) at several budgets, adapted and not, and ONNX Runtime static int8 PTQ.

Inputs (no ImageNet accuracy is claimed): the 30 package photos of ``tools/photo_set.py agreement``
(20 ImageNet validation images of foolbox + 10 scikit-image / matplotlib photos), each as the centre
crop + 9 seeded random crops, and each of those also mirrored: 600 inputs from 30 distinct photos.
They are strongly correlated within a photo, so next to the binomial standard error the table gives
the *cluster* standard error (std of the 30 per-photo agreements / sqrt(30)), the honest one.
Calibration (sensitivity, ``adapt``, ORT int8): the 10 non-ImageNet photos, centre + 6 crops with seed
1 (70 unlabelled inputs; their other crops are in the evaluation set); the agreement on the 20 ImageNet
photos alone (400 inputs, never seen in calibration) is reported too.

One fp32 reference per model (ONNX Runtime); each scheme is compiled once for this host (the real
integer kernels) and run on every input.  Writes results/pareto_imagenet.{json,md,png}
(the JSON after every row, so an interrupted run keeps what it measured).

    python tools/pareto_imagenet.py [--models mobilenet_v2 efficientnet_lite0] [--budgets 0.15 0.2 0.25]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from imagenet_models import ensure_model  # noqa: E402
from photo_set import ensure_photo_set  # noqa: E402

CROPS, CALIB_CROPS = 9, 6


def input_sets(shape):
    """(x, photo index per input, ImageNet-photo mask) of the evaluation set, and the calibration set."""
    from dsconv_tvm.accuracy.images import load_images

    x, names, src = load_images(str(ensure_photo_set("agreement")), shape, crops=CROPS, seed=0)
    imnet = np.array([n.startswith("imagenet_") for n in names])
    x = np.concatenate([x, x[..., ::-1]])                     # mirrored copies
    calib, _, _ = load_images(str(ensure_photo_set("photos")), shape, crops=CALIB_CROPS, seed=1)
    return (np.ascontiguousarray(x), np.concatenate([src, src]), np.concatenate([imnet, imnet]),
            np.ascontiguousarray(calib))


def agreement_stats(ref: np.ndarray, out: np.ndarray, src: np.ndarray, imnet: np.ndarray) -> dict:
    from dsconv_tvm.execute.compare import topk_hits

    hit = ref.argmax(1) == out.argmax(1)
    a = float(hit.mean())
    per_photo = np.array([hit[src == p].mean() for p in np.unique(src)])
    return {"inputs": len(hit), "photos": len(per_photo), "agreement": a,
            "se_binomial": math.sqrt(a * (1 - a) / len(hit)),
            "se_cluster": float(per_photo.std(ddof=1) / math.sqrt(len(per_photo))),
            "fp32_in_top5": float(np.mean(topk_hits(out, ref.argmax(1), 5))),
            "agreement_imagenet20": float(hit[imnet].mean()), "inputs_imagenet20": int(imnet.sum())}


def run_model(name: str, args, rows: list, save) -> None:
    from sweep import ort_int8

    from dsconv_tvm.accuracy.adapt import adapt_model
    from dsconv_tvm.accuracy.mixed import allocate, choose_bits
    from dsconv_tvm.accuracy.probes import onnx_predict
    from dsconv_tvm.config import DSConvConfig
    from dsconv_tvm.driver.compile import compile_model
    from dsconv_tvm.execute.runner import latency_ms, run_library
    from dsconv_tvm.frontend.onnx import load_onnx

    model = str(ensure_model(name))
    in_name, shape = next(iter(load_onnx(model).input_shapes.items()))
    x, src, imnet, calib = input_sets(shape[1:])
    ref = onnx_predict(model, x)
    base = DSConvConfig(bits=4, block=32, mantissa=8)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {name}: {m}", flush=True)  # noqa: E731
    log(f"{len(x)} inputs, {len(calib)} calibration inputs")

    libs = {}                                  # label -> .so kept for the latency comparison
    work = tempfile.TemporaryDirectory(prefix="dsconv-pareto-")

    def measure(scheme, label, path, cfg, extra=None):
        t = time.time()
        so = os.path.join(work.name, f"{len(libs)}.so")
        comp = compile_model(path, "x86", so, cfg, {in_name: [10, *shape[1:]]}, check=False)
        out = run_library(so, x)
        libs[label] = so
        fp32 = sum(la.fp32_bytes for la in comp.report.layers)
        dep = sum(la.deployed_bytes for la in comp.report.layers)
        bits = [la.bits for la in comp.report.converted]
        row = {"model": name, "scheme": scheme, "label": label, "weight_bytes": dep, "fp32_bytes": fp32,
               "ratio": dep / fp32, **agreement_stats(ref, out, src, imnet),
               "bits_histogram": {str(b): bits.count(b) for b in sorted(set(bits))},
               "seconds": round(time.time() - t, 1), **(extra or {})}
        rows.append(row)
        save()
        log(f"{label}: {row['ratio']:.4f}x agreement {row['agreement']:.4f} ± {row['se_cluster']:.4f} (cluster) "
            f"ImageNet-20 {row['agreement_imagenet20']:.4f} bits {row['bits_histogram']} ({row['seconds']} s)")

    for b in [] if args.adapt_only else args.bits:
        measure("uniform", f"W{b}", model, base.replace(bits=b))
    t = time.time()
    # 3-bit weights cost a 4-bit nibble and 5/6-bit ones a byte on the CPU: only 2, 4, 8 can be chosen
    alloc = choose_bits(model, base, max(args.budgets), calib, bits_options=(2, 4, 8))
    log(f"sensitivity of {len(alloc.layers)} layers at bits 2/4/8 in {time.time() - t:.0f} s")
    mixed = {}
    for r in args.budgets:
        budget = int(math.floor(r * alloc.fp32_bytes))
        path = allocate([c.bytes for c in alloc.layers], [c.sensitivity for c in alloc.layers],
                        budget - alloc.fixed_bytes)
        if path is None:
            log(f"budget {r}: below the smallest deployable bytes")
            continue
        mixed[r] = {c.name: int(b) for c, b in zip(alloc.layers, path)}
        if not args.adapt_only:
            measure("mixed", f"mixed {r}", model, base.replace(layer_bits=mixed[r]), {"budget": r})
    if not args.no_adapt:
        for label, cfg, extra in ([("W4 adapted", base, {})] * args.adapt_w4 +
                                  [(f"mixed {r} adapted", base.replace(layer_bits=mixed[r]), {"budget": r})
                                   for r in args.adapt_budgets if r in mixed]):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "adapted.onnx")
                t = time.time()
                adapt_model(model, calib, cfg, out)
                measure("adapted", label, out, cfg, {**extra, "adapt_seconds": round(time.time() - t, 1)})
    if args.adapt_only:
        work.cleanup()
        return
    # latency (batch 10 as compiled, this loaded host): W4, the uniform ones and the mixed ones,
    # interleaved rounds so that load from other processes hits them alike
    times = {k: [] for k in libs if k.startswith(("W", "mixed")) and "adapted" not in k}
    for _ in range(args.rounds):
        for k in times:
            times[k].append(latency_ms(libs[k], repeat=5, number=2)["median_ms"])
    for row in rows:
        if row["model"] == name and row["label"] in times:
            row["latency_ms_batch10"] = statistics.median(times[row["label"]])
            row["latency_vs_w4"] = row["latency_ms_batch10"] / statistics.median(times["W4"])
    log("latency (median of round medians, batch 10): " +
        ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in times.items()))
    work.cleanup()
    with tempfile.TemporaryDirectory() as tmp:
        r = ort_int8(model, calib, x, None, tmp)
    fp32 = rows[-1]["fp32_bytes"]
    # (ORT's own prediction of the fp32 model is the same reference; recompute the statistics here)
    rows.append({"model": name, "scheme": "ORT int8", "label": "ORT int8 PTQ", "weight_bytes": r["weight_bytes"],
                 "fp32_bytes": fp32, "ratio": r["weight_bytes"] / fp32, "agreement": r["agreement"],
                 "inputs": len(x), "se_binomial": math.sqrt(r["agreement"] * (1 - r["agreement"]) / len(x))})
    save()
    log(f"ORT int8: {rows[-1]['ratio']:.4f}x agreement {r['agreement']:.4f}")


def write_md(path: Path, rows: list) -> None:
    lines = ["# ImageNet nets: agreement with fp32 vs deployed conv weight bytes (`tools/pareto_imagenet.py`)", "",
             "600 inputs = 30 photos × (centre + 9 crops) × (as is, mirrored); ± one *cluster* standard error "
             "(30 photos; the binomial one in brackets); ImageNet-20 = the 400 inputs of the 20 ImageNet photos "
             "never used for calibration.", "",
             "| model | scheme | bytes × fp32 | agreement ± cluster SE (binomial) | fp32 top-1 in top-5 | ImageNet-20 "
             "| latency vs W4 | bits |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        se = f" ± {r['se_cluster']:.3f} ({r['se_binomial']:.3f})" if "se_cluster" in r else f" ({r['se_binomial']:.3f})"
        lines.append(f"| {r['model']} | {r['label']} | {r['ratio']:.3f} | {r['agreement']:.3f}{se} | "
                     f"{r.get('fp32_in_top5', float('nan')):.3f} | {r.get('agreement_imagenet20', float('nan')):.3f} | "
                     f"{r.get('latency_vs_w4', float('nan')):.3f} | "
                     f"{' '.join(f'W{b}×{n}' for b, n in r.get('bits_histogram', {}).items())} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        for scheme, style in (("uniform", "o-"), ("mixed", "s-"), ("adapted", "^"), ("ORT int8", "D")):
            rs = sorted((r for r in rows if r["model"] == m and r["scheme"] == scheme), key=lambda r: r["ratio"])
            if rs:
                ax.errorbar([r["ratio"] for r in rs], [r["agreement"] for r in rs],
                            yerr=[r.get("se_cluster", r["se_binomial"]) for r in rs], fmt=style, label=scheme,
                            capsize=3)
                for r in rs:
                    ax.annotate(r["label"], (r["ratio"], r["agreement"]), fontsize=7, xytext=(3, -9),
                                textcoords="offset points")
        ax.set_title(m)
        ax.set_xlabel("deployed conv weight bytes / fp32")
        ax.set_ylabel("top-1 agreement with fp32 (600 inputs, 30 photos)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 8])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.15, 0.20, 0.25])
    ap.add_argument("--adapt-budgets", nargs="*", type=float, default=[0.20])
    ap.add_argument("--adapt-w4", action="store_true", help="also adapt uniform W4")
    ap.add_argument("--no-adapt", action="store_true")
    ap.add_argument("--adapt-only", action="store_true",
                    help="only the adapted mixed rows of --adapt-budgets, added to the existing results")
    ap.add_argument("--rounds", type=int, default=3, help="latency rounds")
    ap.add_argument("--out", default=str(REPO / "results" / "pareto_imagenet"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = json.loads(Path(str(out) + ".json").read_text())["rows"] if Path(str(out) + ".json").exists() else []
    if args.adapt_only:            # keep the model's other rows; replace the adapted ones measured again
        redo = {f"mixed {r} adapted" for r in args.adapt_budgets}
        rows = [r for r in rows if r["model"] not in args.models or r["label"] not in redo]
    else:
        rows = [r for r in rows if r["model"] not in args.models]

    def save():
        Path(str(out) + ".json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        write_md(Path(str(out) + ".md"), rows)

    for m in args.models:
        run_model(m, args, rows, save)
    plot(Path(str(out) + ".png"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
