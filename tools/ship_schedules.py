#!/usr/bin/env python3
"""Merge tuning databases (``dsconv-tvm tune --work-dir DIR`` output) into the shipped schedules of
a target's kernels, ``schedules/<key>/schedules.zip`` (best record per workload; see
``dsconv_tvm/driver/shipped.py``), and time how long ``compile`` takes to open it.

With ``--beat-default`` (the target must run here) a record -- of a DSConv layer or of an fp32 op
(stem conv, depthwise conv, pooling), new or already shipped -- is shipped only if its schedule is
at least 5 % faster than the default schedule of the same PrimFunc (what ``compile`` does without
it: the backend's default rules), both timed here on one thread in CPU time, interleaved (robust on
a shared machine, where MetaSchedule's wall-clock measurements -- and so its choice of the best
record -- can be dominated by other processes).  A record tuned before a better default rule
existed (e.g. the AVX-512 outer-product stem tile) is dropped that way.

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


def beats_default(record, target, backend, rounds: int = 7, margin: float = 0.95) -> tuple[bool, float, float]:
    """(record faster than ``margin`` x the default, its ms, the default's ms): one thread, CPU time.
    The default is the backend's default schedule pass applied to the record's PrimFunc."""
    import numpy as np
    import tvm

    mod = record.workload.mod
    sch = tvm.s_tir.Schedule(mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    with target:
        default = backend.default_schedule_pass()(mod)
    funcs = [tvm.compile(sch.mod, target).mod["main"], tvm.compile(default, target).mod["main"]]
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


def _fp32_name(func) -> str:
    """An fp32 PrimFunc named by its blocks (e.g. ``fp32 pad_temp/conv2d_nchw/T_add``)."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return "fp32 " + "/".join(names[:4])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("databases", nargs="*", help="MetaSchedule JSON database directories")
    ap.add_argument("--target", default="x86", help="the target whose kernels the records are for (default x86)")
    ap.add_argument("--replace", action="store_true", help="do not keep the records already shipped")
    ap.add_argument("--beat-default", action="store_true",
                    help="ship a record (new or already shipped) only if it is >= 5 %% faster than the "
                         "default schedule here")
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

    target = get_target(args.target).tvm_target()
    backend = backend_for(target)
    backend.prepare()
    key = shipped_schedules_key(args.target)
    dest = os.path.join(REPO, "schedules", key, ARCHIVE)
    dbs = [ms.database.JSONDatabase(work_dir=d, allow_missing=False) for d in args.databases]
    keep_existing = not args.replace
    if args.beat_default and keep_existing and os.path.isfile(dest):
        dbs.append(shipped_database(dest))         # the shipped records are checked again too
        keep_existing = False
    dropped = []

    def keep(record) -> bool:
        """Not a record of the plain vector schedule where the default now tensorizes (tuned
        before the narrower intrinsic existed, e.g. a 1000-class classifier): the default wins."""
        func = record.workload.mod["main"]
        name = str(func.attrs["dsconv.layer"]) if is_dsconv(func) else _fp32_name(func)
        if is_dsconv(func) and dot_intrin(func, target) is not None and \
                not any(inst.kind.name == "Tensorize" for inst in record.trace.insts):
            dropped.append(f"plain vector schedule, the default tensorizes: {name}")
            return False
        if args.beat_default:
            ok, tuned, default = beats_default(record, target, backend)
            print(f"{'ship' if ok else 'drop'}: tuned {tuned:.3f} ms, default {default:.3f} ms: {name}", flush=True)
            return ok
        return True

    n = write_shipped(dest, dbs, keep_existing=keep_existing, keep=keep)
    for d in sorted(set(dropped)):
        print(f"dropped ({d})")
    t0 = time.perf_counter()
    db = shipped_database(dest)
    print(f"{dest}: {n} workloads, {os.path.getsize(dest) / 2**20:.2f} MB, opened in "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms ({len(db)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
