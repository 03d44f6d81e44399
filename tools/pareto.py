#!/usr/bin/env python3
"""Accuracy / agreement vs deployed conv weight bytes on the Fashion-MNIST models: uniform W3/W4/W5/W8,
mixed precision (``--bits auto``) at several byte budgets, adapted and not, and ONNX Runtime static
int8 PTQ.  Writes ``results/pareto.{json,md,png}``.

Everything DSConv goes through the command line (``dsconv-tvm eval/adapt``, one subprocess each, with
a timeout): the compiled x86 ``.so`` (the real integer kernels) against the fp32 model (ONNX Runtime)
on the 10 000 test images.  Calibration (sensitivity, adaptation, int8 PTQ): the first ``--calib``
(default 256) *training* images, unlabelled.  ``dense_small`` takes the normalised image: it is fed
through ``--mean 0.286 --std 0.353`` (and a normalised calibration array).

Standard errors: for a proportion p over n test images sqrt(p (1 - p) / n); for the loss in points
(paired, same images) at most sqrt(d / n) with d the fraction of images whose top-1 differs from fp32.

    python tools/pareto.py [--models resnet20 ...] [--budgets 0.20] [--steps 0.01 0.03 0.06] [--no-adapt]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("resnet20", "vgg_small", "mobilenet_small", "inception_small", "dense_small")
NORMALISED = {"dense_small": (0.286, 0.353)}
TIMEOUT = 1800


def _cli(args: list[str], log) -> int:
    cmd = [sys.executable, "-m", "dsconv_tvm", *map(str, args)]
    log("$ dsconv-tvm " + " ".join(map(str, args)))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    if p.returncode != 0:
        log(f"  exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    return p.returncode


def _row(scheme: str, label: str, res: dict, extra: dict | None = None) -> dict:
    n = res["n"]
    a = res["agreement"]
    row = {"scheme": scheme, "label": label, "n": n,
           "weight_bytes": res["weight_bytes_deployed"], "fp32_bytes": res["weight_bytes_fp32"],
           "ratio": res["weight_bytes_deployed"] / res["weight_bytes_fp32"],
           "agreement": a, "agreement_se": math.sqrt(a * (1 - a) / n)}
    if res.get("dsconv_top1") is not None:
        t = res["dsconv_top1"]
        row.update(top1=t, top1_se=math.sqrt(t * (1 - t) / n), fp32_top1=res["fp32_top1"],
                   loss_pt=100 * (res["fp32_top1"] - t), loss_se_pt_max=100 * math.sqrt((1 - a) / n))
    cfg = res.get("config") or {}
    if cfg.get("layer_bits"):
        row["layer_bits"] = cfg["layer_bits"]
    row.update(extra or {})
    return row


def run_model(name: str, args, work: str, log) -> list[dict]:
    from dsconv_tvm.accuracy.datasets import load_fashion_mnist_images

    model = str(REPO / "models" / f"{name}.onnx")
    norm = NORMALISED.get(name)
    pre = ["--mean", norm[0], "--std", norm[1]] if norm else []
    calib = load_fashion_mnist_images("train")[:args.calib]
    if norm:
        calib = ((calib - norm[0]) / norm[1]).astype(np.float32)
    calib_path = os.path.join(work, f"{name}_calib.npy")
    np.save(calib_path, calib)
    data = ["--data", "fashion-mnist", *pre, "--sqnr-images", 0] + (["--limit", args.limit] if args.limit else [])
    rows = []

    def ev(scheme, label, model_path, scheme_args, extra=None, reference=None):
        out = os.path.join(work, f"{name}_{label.replace(' ', '_').replace('/', '_')}.json")
        ref = ["--reference", reference] if reference else []
        t = time.time()
        if _cli(["eval", model_path, *data, *ref, *scheme_args, "--json", out], log) == 0:
            r = _row(scheme, label, json.loads(Path(out).read_text()), extra)
            r["seconds"] = round(time.time() - t, 1)
            rows.append(r)
            log(f"  {name} {label}: {r['weight_bytes']} B ({r['ratio']:.4f}x), agreement {r['agreement']:.4f}"
                + (f", loss {r['loss_pt']:+.2f} pt" if "loss_pt" in r else ""))

    for b in args.bits:
        ev("uniform", f"W{b}", model, ["--bits", b])
    # budgets: fixed fractions of fp32, and steps above this model's uniform W4 bytes
    w4 = next((r["ratio"] for r in rows if r["label"] == "W4"), None)
    budgets = sorted(set(args.budgets) | ({round(w4 + s, 4) for s in args.steps} if w4 else set()))
    budgets = [r for r in budgets if w4 is None or r > w4]
    for r in budgets:
        ev("mixed", f"auto {r}", model, ["--bits", "auto", "--weight-bytes", r, "--calibration", calib_path],
           {"budget": r})
    if not args.no_adapt:
        for label, scheme_args, extra in ([("W4 adapted", ["--bits", 4], {})] +
                                          [(f"auto {r} adapted", ["--bits", "auto", "--weight-bytes", r],
                                            {"budget": r}) for r in
                                           ([round(w4 + args.adapt_step, 4)] if w4 else [])]):
            out = os.path.join(work, f"{name}_{label.replace(' ', '_')}.onnx")
            adapt_data = ["--inputs", calib_path]
            if _cli(["adapt", model, *adapt_data, "-o", out, *scheme_args], log) == 0:
                ev("adapted" if "auto" not in label else "mixed adapted", label, out, scheme_args, extra,
                   reference=model)
    try:
        rows.append(ort_int8_row(model, calib, name, norm, args.limit, work))
        log(f"  {name} ORT int8: agreement {rows[-1]['agreement']:.4f}")
    except Exception as exc:  # noqa: BLE001  (a reference point only)
        log(f"  {name} ORT int8 failed: {exc}")
    return rows


def ort_int8_row(model, calib, name, norm, limit, work) -> dict:
    from sweep import ort_int8

    from dsconv_tvm.accuracy.datasets import load_fashion_mnist

    x, y = load_fashion_mnist("test")
    if limit:
        x, y = x[:limit], y[:limit]
    if norm:
        x = ((x - norm[0]) / norm[1]).astype(np.float32)
    r = ort_int8(model, calib, x, y, work)
    n, a, t = len(x), r["agreement"], r["top1"]
    from dsconv_tvm.frontend.onnx import load_onnx
    loaded = load_onnx(model)
    inits = {i.name: i for i in loaded.model.graph.initializer}
    fp32 = sum(4 * int(np.prod(inits[c.input[1]].dims)) for c in loaded.model.graph.node if c.op_type == "Conv")
    return {"scheme": "ORT int8", "label": "ORT int8 PTQ", "n": n, "weight_bytes": r["weight_bytes"],
            "fp32_bytes": fp32, "ratio": r["weight_bytes"] / fp32, "agreement": a,
            "agreement_se": math.sqrt(a * (1 - a) / n), "top1": t, "top1_se": math.sqrt(t * (1 - t) / n),
            "fp32_top1": r["fp32_top1"], "loss_pt": 100 * (r["fp32_top1"] - t),
            "loss_se_pt_max": 100 * math.sqrt((1 - a) / n)}


def write_table(path: str, results: dict) -> None:
    lines = ["# Accuracy vs deployed conv weight bytes (Fashion-MNIST, `tools/pareto.py`)", "",
             "Compiled x86 `.so` vs fp32 (ONNX Runtime) on the 10 000 test images; B = 32, m = 8, fit l2. "
             "Bytes: every conv weight as deployed (kept convs in fp32; ORT int8: int8 weights + one float "
             "per channel). ± = one standard error (agreement: binomial; loss: paired, an upper bound).", ""]
    for name, rows in results.items():
        fp32 = next((r["fp32_top1"] for r in rows if r.get("fp32_top1") is not None), None)
        lines += [f"## {name}" + (f" (fp32 top-1 {100 * fp32:.2f} %)" if fp32 else ""), "",
                  "| scheme | weight bytes | × fp32 | top-1 % | loss pt | agreement |", "|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["weight_bytes"]):
            top = f"{100 * r['top1']:.2f}" if "top1" in r else "-"
            loss = f"{r['loss_pt']:+.2f} ± {r['loss_se_pt_max']:.2f}" if "loss_pt" in r else "-"
            lines.append(f"| {r['label']} | {r['weight_bytes']} | {r['ratio']:.4f} | {top} | {loss} | "
                         f"{r['agreement']:.4f} ± {r['agreement_se']:.4f} |")
        lines.append("")
    Path(path).write_text("\n".join(lines))


def plot(path: str, results: dict) -> None:
    from bench_models import subplot_grid

    n = len(results)
    fig, axes = subplot_grid(n, 5.2, 4.0)
    style = {"uniform": ("o-", "C0"), "mixed": ("s-", "C1"), "adapted": ("D", "C2"),
             "mixed adapted": ("^-", "C3"), "ORT int8": ("*", "r")}
    for ax, (name, rows) in zip(axes.flat, results.items()):
        for scheme, (fmt, color) in style.items():
            pts = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["ratio"])
            if not pts:
                continue
            ax.errorbar([r["ratio"] for r in pts], [100 * r["agreement"] for r in pts],
                        yerr=[100 * r["agreement_se"] for r in pts], fmt=fmt, color=color, label=scheme,
                        ms=8 if scheme == "ORT int8" else 5, capsize=2)
            for r in pts:
                if scheme == "uniform":
                    ax.annotate(r["label"], (r["ratio"], 100 * r["agreement"]), fontsize=6,
                                xytext=(3, -8), textcoords="offset points")
        ax.set_xlabel("deployed conv weight bytes / fp32")
        ax.set_ylabel("top-1 agreement with fp32 (%)")
        ax.set_title(name, fontsize=9)
        lo = min([100 * r["agreement"] for r in rows if r["agreement"] > 0.9] + [97])
        ax.set_ylim(lo - 0.3, 100.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 8])
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.20],
                    help="mixed-precision budgets as fractions of the fp32 conv weight bytes")
    ap.add_argument("--steps", nargs="*", type=float, default=[0.01, 0.03, 0.06],
                    help="more budgets: the model's uniform W4 fraction + each step")
    ap.add_argument("--adapt-step", type=float, default=0.03,
                    help="the adapted mixed model's budget: uniform W4 fraction + this")
    ap.add_argument("--no-adapt", action="store_true")
    ap.add_argument("--calib", type=int, default=256, help="unlabelled training images for calibration")
    ap.add_argument("--limit", type=int, default=None, help="test images (default all 10 000)")
    ap.add_argument("--out", default=str(REPO / "results" / "pareto"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tools"))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    out_json = args.out + ".json"
    results = json.loads(Path(out_json).read_text()) if os.path.exists(out_json) else {}
    with tempfile.TemporaryDirectory(prefix="dsconv-pareto-") as work:
        for name in args.models:
            results[name] = run_model(name, args, work, log)
            Path(out_json).write_text(json.dumps(results, indent=1) + "\n")
            write_table(args.out + ".md", results)
    plot(args.out + ".png", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
