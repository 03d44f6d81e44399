"""Where ``compile`` takes its schedules from, in order: ``--tuning-db DIR``, the shipped schedules
for the target's kernels in ``schedules/<key>/schedules.zip`` (:mod:`.shipped`; ``key`` from the
target's backend, e.g. ``x86-vnni`` for ``--target x86`` on a VNNI host), the default schedules."""

from __future__ import annotations

import os
from pathlib import Path

from ..backends.base import backend_for
from ..errors import OutputError
from ..target import get_target
from .shipped import ARCHIVE, shipped_database

DB_FILES = ("database_workload.json", "database_tuning_record.json")


def shipped_schedules_key(target_name: str) -> str:
    """The folder of ``schedules/`` for a target (its backend decides: x86 by kernel ISA)."""
    spec = get_target(target_name)
    return backend_for(spec.tvm_target()).schedules_key(spec.name)


def shipped_schedules_dir(target_name: str) -> Path | None:
    """``schedules/<key>/`` (source checkout) or ``dsconv_tvm/data/schedules/<key>/`` (wheel) when
    it holds the shipped archive."""
    package = Path(__file__).resolve().parent.parent
    key = shipped_schedules_key(target_name)
    for base in (package / "data" / "schedules", package.parent / "schedules"):
        if (base / key / ARCHIVE).is_file():
            return base / key
    return None


def is_database_dir(path: str | os.PathLike) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in DB_FILES)


def find_database(target_name: str, tuning_db: str | None):
    """(database, where) for ``compile``: the user's, else the shipped one, else (None, "default").
    The target's backend is prepared first: the records' traces name its tensor intrinsics."""
    from tvm.s_tir import meta_schedule as ms

    backend_for(get_target(target_name).tvm_target()).prepare()

    if tuning_db:
        if not is_database_dir(tuning_db):
            raise OutputError(f"--tuning-db {tuning_db}: not a tuning database (expected "
                              f"{' and '.join(DB_FILES)} in that directory)")
        return ms.database.JSONDatabase(work_dir=tuning_db, allow_missing=False), f"tuning database {tuning_db}"
    shipped = shipped_schedules_dir(target_name)
    if shipped is not None:
        return shipped_database(shipped / ARCHIVE), f"shipped schedules/{shipped.name}"
    return None, "default schedules"
