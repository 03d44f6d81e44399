#!/usr/bin/env python3
"""Time MobileNetV2's depthwise convs standalone under the default fp32 schedule (FP32ConvCPU).

Each of the 10 depthwise shapes of MobileNetV2 (3x3, pad 1, stride 1 or 2, bias + clip(0, 6), as
the ONNX model legalizes: ``group_conv2d_nchw`` + add + maximum + minimum) is built as a TE
PrimFunc, scheduled with :func:`dsconv_tvm.backends.cpu.rules.schedule_fp32_conv`, checked against
numpy and timed on 1 thread (set TVM_NUM_THREADS=1 and pin with taskset): the CPU time of the
process (``time.process_time``, robust on a loaded machine) over a batch of calls, the best of
``--repeat`` batches.  ``count`` is how many times MobileNetV2 runs the shape; the total weighs by
it.  Writes (or adds ``--label`` to) the JSON ``--out``.

Usage: TVM_NUM_THREADS=1 taskset -c 1 python tools/bench_depthwise.py --target x86 --label after
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

#: (channels, input height = width, stride, convs of this shape in MobileNetV2)
SHAPES = [(32, 112, 1, 1), (96, 112, 2, 1), (144, 56, 1, 1), (144, 56, 2, 1), (192, 28, 1, 2), (192, 28, 2, 1),
          (384, 14, 1, 4), (576, 14, 1, 2), (576, 14, 2, 1), (960, 7, 1, 3)]


def depthwise_func(c: int, hw: int, s: int):
    """The PrimFunc of a depthwise 3x3 conv + bias + clip(0, 6) and its output shape."""
    import tvm
    from tvm import te, topi

    x = te.placeholder((1, c, hw, hw), "float32", "x")
    w = te.placeholder((c, 1, 3, 3), "float32", "w")
    b = te.placeholder((1, c, 1, 1), "float32", "b")
    y = topi.nn.conv(x, w, s, 1, 1, c, "NCHW", "OIHW", "float32")
    y = topi.minimum(topi.maximum(topi.add(y, b), tvm.tirx.const(0.0, "float32")), tvm.tirx.const(6.0, "float32"))
    return te.create_prim_func([x, w, b, y]).with_attr("global_symbol", "main"), [int(d) for d in y.shape]


def reference(x, w, b, s):
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh = (x.shape[2] - 1) // s + 1
    out = sum(w[None, :, 0, i, j, None, None] * xp[:, :, i:i + s * oh:s, j:j + s * oh:s]
              for i in range(3) for j in range(3))
    return np.clip(out + b, 0, 6)


def measure(target_name: str, repeat: int) -> list[dict]:
    import tvm

    from dsconv_tvm.backends.cpu.rules import schedule_fp32_conv
    from dsconv_tvm.target import get_target

    target = get_target(target_name).tvm_target()
    rows = []
    for c, hw, s, count in SHAPES:
        func, oshape = depthwise_func(c, hw, s)
        lib = tvm.compile(schedule_fp32_conv(func, target).mod, target=target)
        rng = np.random.default_rng(0)
        x, w, b = (rng.standard_normal(t).astype(np.float32) for t in ((1, c, hw, hw), (c, 1, 3, 3), (1, c, 1, 1)))
        args = [tvm.runtime.tensor(a) for a in (x, w, b)] + [tvm.runtime.tensor(np.zeros(oshape, np.float32))]
        lib(*args)
        err = float(np.abs(args[-1].numpy() - reference(x, w, b, s)).max())
        flop = 2 * 9 * c * oshape[2] * oshape[3]
        calls = max(20, int(2e8 / flop))            # about 0.1 s a batch at 50 GFLOP/s
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            for _ in range(calls):
                lib(*args)
            times.append((time.process_time() - t0) / calls * 1e3)
        ms = min(times)
        rows.append({"channels": c, "size": hw, "stride": s, "count": count, "ms": round(ms, 5),
                     "ms_median": round(sorted(times)[len(times) // 2], 5), "gflops": round(flop / ms / 1e6, 1),
                     "max_abs_err": err})
        print(f"{c:4d} x {hw:3d}^2 stride {s} (x{count}): {ms:.4f} ms  {flop / ms / 1e6:6.1f} GFLOP/s  "
              f"max |err| {err:.1e}", flush=True)
    print(f"MobileNetV2's 17 depthwise convs: {sum(r['ms'] * r['count'] for r in rows):.3f} ms")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="x86")
    ap.add_argument("--label", default="current", help="the key of this run in the JSON (e.g. before, after)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(REPO, "results", "depthwise_x86_schedule.json"))
    args = ap.parse_args(argv)
    rows = measure(args.target, args.repeat)
    data = json.load(open(args.out)) if os.path.exists(args.out) else {}
    data.setdefault("runs", {})[f"{args.target}/{args.label}"] = {
        "target": args.target, "threads": int(os.environ.get("TVM_NUM_THREADS", "0")),
        "load_average": [round(v, 2) for v in os.getloadavg()], "shapes": rows,
        "total_ms": round(sum(r["ms"] * r["count"] for r in rows), 4)}
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
