#!/usr/bin/env python3
"""Merge tuning databases (``dsconv-tvm tune --work-dir DIR`` output) into the shipped schedules of
a target's kernels, ``schedules/<key>/schedules.zip`` (best record per workload; see
``dsconv_tvm/driver/shipped.py``), and time how long ``compile`` takes to open it.

With ``--beat-default`` (the target must run here) a DSConv record is shipped only if its schedule
is at least 5 % faster than the default schedule of the same PrimFunc, both timed here on one
thread in CPU time, interleaved (robust on a shared machine, where MetaSchedule's wall-clock
measurements -- and so its choice of the best record -- can be dominated by other processes).

Usage:  python tools/ship_schedules.py --target x86 [--beat-default] DB_DIR [DB_DIR ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def beats_default(record, target, rounds: int = 7, margin: float = 0.95) -> tuple[bool, float, float]:
    """(record faster than ``margin`` x the default, its ms, the default's ms): one thread, CPU time."""
    import numpy as np
    import tvm

    from dsconv_tvm.backends.cpu.schedule import schedule_dsconv_cpu

    mod = record.workload.mod
    sch = tvm.s_tir.Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    funcs = [tvm.compile(sch.mod, target).mod["main"],
             tvm.compile(schedule_dsconv_cpu(mod["main"], target).mod, target).mod["main"]]
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor((rng.random([int(d) for d in a.shape]) * (15 if "int" in str(a.dtype) else 1))
                               .astype(str(a.dtype))) for a in record.args_info]
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for f, t in zip(funcs, times):
            t0 = time.thread_time()
            for _ in range(3):
                f(*args)
            t.append((time.thread_time() - t0) / 3 * 1e3)
    tuned, default = (statistics.median(t) for t in times)
    return tuned < margin * default, tuned, default


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("databases", nargs="*", help="MetaSchedule JSON database directories")
    ap.add_argument("--target", default="x86", help="the target whose kernels the records are for (default x86)")
    ap.add_argument("--replace", action="store_true", help="do not keep the records already shipped")
    ap.add_argument("--beat-default", action="store_true",
                    help="ship a DSConv record only if it is >= 5 %% faster than the default schedule here")
    args = ap.parse_args(argv)
    if args.beat_default:
        os.environ["TVM_NUM_THREADS"] = "1"
    from tvm.s_tir import meta_schedule as ms

    from dsconv_tvm.backends.base import backend_for
    from dsconv_tvm.backends.common import is_dsconv
    from dsconv_tvm.backends.cpu.schedule import dot_intrin
    from dsconv_tvm.driver.database import shipped_schedules_key
    from dsconv_tvm.driver.shipped import ARCHIVE, shipped_database, write_shipped
    from dsconv_tvm.target import get_target

    backend_for(get_target(args.target).tvm_target()).prepare()
    key = shipped_schedules_key(args.target)
    dest = os.path.join(REPO, "schedules", key, ARCHIVE)
    dbs = [ms.database.JSONDatabase(work_dir=d, allow_missing=False) for d in args.databases]
    target = get_target(args.target).tvm_target()
    dropped = []

    def keep(record) -> bool:
        """Not a record of the plain vector schedule where the default now tensorizes (tuned
        before the narrower intrinsic existed, e.g. a 1000-class classifier): the default wins."""
        func = record.workload.mod["main"]
        if not is_dsconv(func) or dot_intrin(func, target) is None:
            return True
        if not any(inst.kind.name == "Tensorize" for inst in record.trace.insts):
            dropped.append(f"plain vector schedule, the default tensorizes: {func.attrs['dsconv.layer']}")
            return False
        if args.beat_default:
            ok, tuned, default = beats_default(record, target)
            print(f"{'ship' if ok else 'drop'}: tuned {tuned:.3f} ms, default {default:.3f} ms: "
                  f"{func.attrs['dsconv.layer']}", flush=True)
            return ok
        return True

    n = write_shipped(dest, dbs, keep_existing=not args.replace, keep=keep)
    for d in sorted(set(dropped)):
        print(f"dropped ({d})")
    t0 = time.perf_counter()
    db = shipped_database(dest)
    print(f"{dest}: {n} workloads, {os.path.getsize(dest) / 2**20:.2f} MB, opened in "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms ({len(db)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
