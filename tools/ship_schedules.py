#!/usr/bin/env python3
"""Merge tuning databases (``dsconv-tvm tune --work-dir DIR`` output) into the shipped schedules of
a target's kernels, ``schedules/<key>/schedules.zip`` (best record per workload; see
``dsconv_tvm/driver/shipped.py``), and time how long ``compile`` takes to open it.

With ``--beat-default`` (the target must run here) a record -- of a DSConv layer or of an fp32 op
(stem conv, depthwise conv, pooling), new or already shipped -- is shipped only if its schedule is
at least 5 % faster than the default schedule of the same PrimFunc (what ``compile`` does without
it: the backend's default rules), both timed here on one thread in CPU time, interleaved (robust on
a shared machine, where MetaSchedule's wall-clock measurements -- and so its choice of the best
record -- can be dominated by other processes): the comparison of ``dsconv-tvm tune``'s guard,
:func:`dsconv_tvm.driver.guard.beats_default`.  A record tuned before a better default rule
existed (e.g. the AVX-512 outer-product stem tile) is dropped that way.

Usage:  python tools/ship_schedules.py --target x86 [--beat-default] DB_DIR [DB_DIR ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("databases", nargs="*", help="MetaSchedule JSON database directories")
    ap.add_argument("--target", default="x86", help="the target whose kernels the records are for (default x86)")
    ap.add_argument("--replace", action="store_true", help="do not keep the records already shipped")
    ap.add_argument("--beat-default", action="store_true",
                    help="ship a record (new or already shipped) only if it is faster than the "
                         "default schedule here (the tune guard's comparison and margin)")
    args = ap.parse_args(argv)
    if args.beat_default:
        os.environ["TVM_NUM_THREADS"] = "1"
    from tvm.s_tir import meta_schedule as ms

    from dsconv_tvm.backends.base import backend_for
    from dsconv_tvm.backends.common import is_dsconv
    from dsconv_tvm.backends.cpu.schedule import dot_intrin
    from dsconv_tvm.driver.database import shipped_schedules_key
    from dsconv_tvm.driver.guard import beats_default, workload_name
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
        name = workload_name(func)
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
