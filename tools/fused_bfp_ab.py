#!/usr/bin/env python3
"""A/B of fused BFP between layers: one model built like ``compile --target x86`` twice, with
``fuse_bfp`` on (the default) and off (every layer quantizes its own float input, as before),
checked to give the same bits, then timed interleaved in one process.

One thread is timed in the thread's CPU time (what other processes on a shared machine barely
disturb); ``--threads 2`` in wall time.  Both libraries use the same kernels and the same shipped
schedules; unfused layers are the same workloads in both.

Usage:  python tools/fused_bfp_ab.py MODEL [--threads 1] [--rounds 15] [--block 64] [-o results/x.json]
(MODEL: a benchmark model name, e.g. resnet50, or an .onnx path.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "tools")):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    import bench_models
    import numpy as np
    import tvm

    from dsconv_tvm.config import DSConvConfig
    from dsconv_tvm.driver.compile import compile_model
    from dsconv_tvm.execute.runner import load_library

    path = bench_models.prepare(args.model, 1, 0, print).path
    cfg = DSConvConfig(bits=4, block=args.block, mantissa=8, dense="dsconv")
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        calls, outputs, chained = {}, {}, {}
        for name, fuse in (("fused", True), ("unfused", False)):
            so = os.path.join(work, f"{name}.so")
            res = compile_model(path, "x86", so, cfg.replace(fuse_bfp=fuse), check=False)
            chained[name] = sum(1 for layer in res.report.converted if layer.bfp)
            vm, shape = load_library(so)
            x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
            calls[name] = (lambda vm=vm, x=x: vm["main"](x))
            outputs[name] = calls[name]().numpy()
        same = bool(np.array_equal(outputs["fused"], outputs["unfused"]))
        times = {k: [] for k in calls}
        for f in calls.values():
            for _ in range(3):
                f()
        for _ in range(args.rounds):
            for k, f in calls.items():
                t0 = clock()
                for _ in range(args.calls):
                    f()
                times[k].append((clock() - t0) / args.calls * 1e3)
    out = {"model": args.model, "threads": args.threads,
           "clock": "thread CPU time" if args.threads == 1 else "wall time",
           "load_before": load_before, "load_after": os.getloadavg(), "same_bits": same,
           "layers_reading_or_writing_bfp": chained["fused"],
           "ms": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}}
    out["fused_over_unfused"] = out["ms"]["fused"]["median"] / out["ms"]["unfused"]["median"]
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        from dsconv_tvm.fileio import atomic_write_text
        atomic_write_text(args.output, text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
