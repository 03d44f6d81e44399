#!/usr/bin/env python3
"""Markdown table of tools/arm_count.py results: ``python tools/arm_count_table.py results/arm_count_*.json``.

One row per (model, cpu): DSConv, ORT int8 and ORT fp32 instructions per inference, the ratios,
the DSConv share spent outside the compiled library (Relax VM, TVM runtime, libc, ld.so) and the
goals of issue 14 where they apply (ResNet-50: A76 <= 1.0x int8 and <= 0.35x fp32, A72 <= 1.2x int8)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOALS = {("resnet50", "cortex-a76"): (1.0, 0.35), ("resnet50", "cortex-a72"): (1.2, None)}


def _m(n):
    return f"{n / 1e6:,.1f} M"


def rows(paths):
    out = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        v = r["variants"]
        if not {"dsconv", "ort_int8", "ort_fp32"} <= set(v):
            continue
        d, i8, f32 = (v[k]["instructions"] for k in ("dsconv", "ort_int8", "ort_fp32"))
        lib = sum(n for k, n in v["dsconv"]["by_object"].items() if k.endswith(".so") and "_rpi" in k)
        goal = GOALS.get((r["model"], r["cpu"]))
        if goal:
            ok = d / i8 <= goal[0] and (goal[1] is None or d / f32 <= goal[1])
            gtxt = f"<= {goal[0]}x int8" + (f", <= {goal[1]}x fp32" if goal[1] else "") + (": met" if ok else ": **missed**")
        else:
            gtxt = ""
        macs = v["dsconv"].get("model_macs")
        out.append((r["model"], r["cpu"], d, i8, f32, d / i8, d / f32, 1 - lib / d, macs, gtxt))
    order = ["resnet50", "mobilenet_v2", "resnet20", "vgg_small", "mobilenet_small"]
    return sorted(out, key=lambda r: (order.index(r[0]) if r[0] in order else len(order), r[0],
                                      r[1] != "cortex-a76"))


def markdown(paths) -> str:
    lines = ["| model | core | DSConv | ORT int8 | ORT fp32 | DSConv / int8 | DSConv / fp32 | DSConv outside the library | DSConv instr. / MAC | goal |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, c, d, i8, f32, ri, rf, out, macs, g in rows(paths):
        ipm = f"{d / macs:.3f}" if macs else "-"
        lines.append(f"| {m} | {c} | {_m(d)} | {_m(i8)} | {_m(f32)} | {ri:.2f} | {rf:.2f} | {100 * out:.1f} % | {ipm} | {g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(sys.argv[1:]))
