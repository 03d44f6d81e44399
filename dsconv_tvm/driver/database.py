"""Where ``compile`` takes its schedules from, in order: ``--tuning-db DIR``, the shipped schedules
for the target's kernels in ``schedules/<key>/schedules.zip`` (:mod:`.shipped`; ``key`` from the
target's backend, e.g. ``x86-vnni`` for ``--target x86`` on a VNNI host), the default schedules."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..backends.base import backend_for
from ..errors import OutputError
from ..fileio import atomic_write_text
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

    backend_for(get_target(target_name).tvm_target()).prepare()

    if tuning_db:
        if not is_database_dir(tuning_db):
            raise OutputError(f"--tuning-db {tuning_db}: not a tuning database (expected "
                              f"{' and '.join(DB_FILES)} in that directory)")
        return open_user_database(tuning_db), f"tuning database {tuning_db}"
    shipped = shipped_schedules_dir(target_name)
    if shipped is not None:
        return shipped_database(shipped / ARCHIVE), f"shipped schedules/{shipped.name}"
    return None, "default schedules"


# --------------------------------------------------------------------------------------------------
# user databases (``tune --work-dir``, ``compile --tuning-db``): damaged lines skipped and repaired
# --------------------------------------------------------------------------------------------------
@dataclass
class CheckedDatabase:
    """The good lines of a tuning database; ``skipped`` damaged lines (not JSON: a half-written
    last line of a killed tuner or a full disk; or a record of a workload that is not there)."""

    workloads: list[str]
    records: list[str]
    skipped: int

    def text(self) -> tuple[str, str]:
        return ("".join(w + "\n" for w in self.workloads), "".join(r + "\n" for r in self.records))


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise OutputError(f"cannot read the tuning database file {path}: {exc.strerror or exc}") from None


def check_database(work_dir: str) -> CheckedDatabase:
    """Read a database's two files line by line, keeping the lines that parse (a workload: a JSON
    list; a record: ``[workload index, [...]]`` of a workload kept, re-indexed)."""
    workloads, index, skipped = [], {}, 0
    for i, line in enumerate(ln for ln in _lines(os.path.join(work_dir, DB_FILES[0])) if ln.strip()):
        try:
            ok = isinstance(json.loads(line), list)
        except ValueError:
            ok = False
        if ok:
            index[i] = len(workloads)
            workloads.append(line)
        else:
            skipped += 1
    records = []
    for line in _lines(os.path.join(work_dir, DB_FILES[1])):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = (isinstance(rec, list) and len(rec) == 2 and isinstance(rec[0], int)
                  and isinstance(rec[1], list) and rec[0] in index)
        except ValueError:
            ok = False
        if not ok:
            skipped += 1
            continue
        if index[rec[0]] != rec[0]:
            line = json.dumps([index[rec[0]], rec[1]], separators=(",", ":"))
        records.append(line)
    return CheckedDatabase(workloads, records, skipped)


def repair_database(work_dir: str) -> int:
    """Rewrite a damaged database without its damaged lines (each file atomically); the number of
    lines removed (0: nothing to do, the files are left as they are)."""
    db = check_database(work_dir)
    if db.skipped:
        for name, text in zip(DB_FILES, db.text()):
            atomic_write_text(os.path.join(work_dir, name), text)
    return db.skipped


def drop_workload_records(work_dir: str, workloads) -> int:
    """Remove every record of the workloads at these indices of a repaired database
    (:func:`repair_database`): compile then finds no record for them and uses the default schedule.
    The records file is rewritten atomically; the workloads file is left as it is (its indices stay
    valid).  The number of records removed."""
    workloads = set(workloads)
    db = check_database(work_dir)
    keep = [r for r in db.records if json.loads(r)[0] not in workloads]
    if len(keep) < len(db.records):
        atomic_write_text(os.path.join(work_dir, DB_FILES[1]), "".join(r + "\n" for r in keep))
    return len(db.records) - len(keep)


def open_user_database(work_dir: str, log=None):
    """A MetaSchedule database of the good records of ``work_dir``; warns once (``log``) with the
    number of damaged lines skipped.  The user's files are not changed (a clean copy in a
    temporary directory is opened when lines are skipped)."""
    from tvm.s_tir import meta_schedule as ms

    db = check_database(work_dir)
    if not db.skipped:
        return ms.database.JSONDatabase(work_dir=work_dir, allow_missing=False)
    (log or _warn)(f"warning: tuning database {work_dir}: skipped {db.skipped} damaged line"
                   f"{'s' if db.skipped > 1 else ''} (half-written records?); kept {len(db.records)} "
                   f"records; `dsconv-tvm tune --repair-db {work_dir}` removes them from the files")
    clean = tempfile.mkdtemp(prefix="dsconv-tuning-db-")
    for name, text in zip(DB_FILES, db.text()):
        with open(os.path.join(clean, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    try:
        return ms.database.JSONDatabase(work_dir=clean, allow_missing=False)
    finally:                              # the database is read into memory when opened
        shutil.rmtree(clean, ignore_errors=True)


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
