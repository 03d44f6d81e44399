#!/usr/bin/env python3
"""ORT fp32, ORT int8 and a DSConv .so on ONE thread, timed in the thread's CPU time: a comparison
that other processes on a shared machine barely disturb (wall-clock timings of 2 threads there are
dominated by whichever thread was descheduled at each parallel barrier).

Usage:  python tools/cpu_time_compare.py MODEL [--rounds 15] [-o results/x.json]
(MODEL: a benchmark model name; the DSConv .so is built like ``compile --target x86`` at W4 B64.)
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

os.environ["TVM_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402

import bench_models  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    import onnxruntime as ort
    import tvm

    from dsconv_tvm.config import DSConvConfig
    from dsconv_tvm.driver.compile import compile_model
    from dsconv_tvm.execute.runner import load_library

    model = bench_models.prepare(args.model, 16, 0, print)
    x = np.ascontiguousarray(model.images[:1])
    import benchmark
    int8 = benchmark.int8_model(model, argparse.Namespace())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        so = os.path.join(work, "m.so")
        res = compile_model(model.path, "x86", so, DSConvConfig(bits=4, block=64, mantissa=8, dense="dsconv"),
                            check=False)
        calls = {}
        for name, path in (("ort_fp32", model.path), ("ort_int8", int8)):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            inp = sess.get_inputs()[0].name
            calls[name] = (lambda s=sess, i=inp: s.run(None, {i: x}))
        vm, _ = load_library(so)
        tx = tvm.runtime.tensor(x)
        calls["dsconv_b64"] = lambda: vm["main"](tx)
        for f in calls.values():
            for _ in range(3):
                f()
        times = {k: [] for k in calls}
        for _ in range(args.rounds):
            for k, f in calls.items():
                t0 = time.thread_time()
                for _ in range(args.calls):
                    f()
                times[k].append((time.thread_time() - t0) / args.calls * 1e3)
    out = {"model": model.name, "schedules": res.schedules, "threads": 1, "clock": "thread CPU time",
           "load_before": load_before, "load_after": os.getloadavg(),
           "ms": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()}}
    med = {k: v["median"] for k, v in out["ms"].items()}
    out["dsconv_over_ort_fp32"] = med["dsconv_b64"] / med["ort_fp32"]
    out["dsconv_over_ort_int8"] = med["dsconv_b64"] / med["ort_int8"]
    text = json.dumps(out, indent=1)
    print(text)
    if args.output:
        from dsconv_tvm.fileio import atomic_write_text
        atomic_write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
