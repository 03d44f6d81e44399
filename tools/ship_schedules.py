#!/usr/bin/env python3
"""Merge tuning databases (``dsconv-tvm tune --work-dir DIR`` output) into the shipped schedules of
a target's kernels, ``schedules/<key>/schedules.zip`` (best record per workload; see
``dsconv_tvm/driver/shipped.py``), and time how long ``compile`` takes to open it.

Usage:  python tools/ship_schedules.py --target x86 DB_DIR [DB_DIR ...]
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
    args = ap.parse_args(argv)
    from tvm.s_tir import meta_schedule as ms

    from dsconv_tvm.backends.base import backend_for
    from dsconv_tvm.driver.database import shipped_schedules_key
    from dsconv_tvm.driver.shipped import ARCHIVE, shipped_database, write_shipped
    from dsconv_tvm.target import get_target

    backend_for(get_target(args.target).tvm_target()).prepare()
    key = shipped_schedules_key(args.target)
    dest = os.path.join(REPO, "schedules", key, ARCHIVE)
    dbs = [ms.database.JSONDatabase(work_dir=d, allow_missing=False) for d in args.databases]
    n = write_shipped(dest, dbs, keep_existing=not args.replace)
    t0 = time.perf_counter()
    db = shipped_database(dest)
    print(f"{dest}: {n} workloads, {os.path.getsize(dest) / 2**20:.2f} MB, opened in "
          f"{1e3 * (time.perf_counter() - t0):.1f} ms ({len(db)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
