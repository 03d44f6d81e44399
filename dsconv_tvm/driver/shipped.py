"""The shipped schedules: one compact, indexed archive per kernel instruction set.

``schedules/<key>/schedules.zip`` (``key``: :meth:`Backend.schedules_key`, e.g. ``x86-vnni``) holds
the best tuning record of every workload, two deflated members per workload, named by the
workload's structural hash (what MetaSchedule's JSON database keys workloads by):

* ``<hash>.record.json``  the record as ``TuningRecord.as_json`` writes it (trace, run times,
  target, argument info);
* ``<hash>.workload.json`` the workload as ``Workload.as_json`` writes it (the PrimFunc), kept for
  merging and checking, never read by ``compile``.

The zip's central directory is the index: opening the archive reads only the member names;
a query hashes the PrimFunc, and only a hit decompresses its (small) record.  A 64-bit structural
hash identifies the workload (no structural comparison with the stored PrimFunc at compile time;
:meth:`ShippedDatabase.verify` does it for every entry).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

ARCHIVE = "schedules.zip"
_RECORD, _WORKLOAD = ".record.json", ".workload.json"


def _mean(run_secs) -> float:
    vals = [float(v) for v in run_secs or []]
    return sum(vals) / len(vals) if vals else float("inf")


def shipped_database(path: str | os.PathLike):
    """A read-only MetaSchedule database over a shipped archive (see the module docstring)."""
    import tvm_ffi
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class ShippedDatabase(ms.database.PyDatabase):
        def __init__(self, archive: str):
            super().__init__()
            self.path = archive
            self._zip = zipfile.ZipFile(archive)          # the central directory: the index
            self.hashes = {n[:-len(_RECORD)] for n in self._zip.namelist() if n.endswith(_RECORD)}
            self._records: dict[str, list] = {}
            self._last = (None, "")

        def _hash(self, mod) -> str:
            # a query hashes the same module up to three times (has, commit, top k): once here
            if self._last[0] is None or not self._last[0].same_as(mod):
                self._last = (mod, str(tvm_ffi.structural_hash(mod)))
            return self._last[1]

        def _record_json(self, h: str) -> list:
            if h not in self._records:
                self._records[h] = json.loads(self._zip.read(h + _RECORD))
            return self._records[h]

        def has_workload(self, mod) -> bool:
            return self._hash(mod) in self.hashes

        def commit_workload(self, mod):
            return ms.database.Workload(mod)

        def commit_tuning_record(self, record) -> None:
            raise RuntimeError(f"{self.path}: the shipped schedules are read-only")

        def get_top_k(self, workload, top_k: int) -> list:
            h = self._hash(workload.mod)
            if h not in self.hashes or top_k <= 0:
                return []
            return [ms.database.TuningRecord.from_json(self._record_json(h), workload)]

        def get_all_tuning_records(self) -> list:
            return [rec for w, rec in self.entries()]

        def __len__(self) -> int:
            return len(self.hashes)

        def entries(self):
            """(Workload, TuningRecord) of every entry (parses the stored PrimFuncs: slow)."""
            out = []
            for h in sorted(self.hashes):
                w = self._workload(h)
                out.append((w, ms.database.TuningRecord.from_json(self._record_json(h), w)))
            return out

        def verify(self) -> list[str]:
            """Hashes whose stored PrimFunc does not hash to the member's name (should be none)."""
            return [h for h in sorted(self.hashes)
                    if self._hash(self._workload(h).mod) != h]

        def _workload(self, h: str):
            return ms.database.Workload.from_json(json.loads(self._zip.read(h + _WORKLOAD)))

    return ShippedDatabase(str(path))


def record_json(record) -> list:
    """A MetaSchedule TuningRecord as JSON, the way its JSON database files store it: TVM's
    ``TuningRecord.as_json`` cannot convert a trace that holds an IndexMap (a ``transform_layout``:
    every unfused x86 DSConv schedule has one), which the database files store as the object's
    ``tvm.ir.save_json`` string; so does this."""
    import tvm
    import tvm.s_tir.meta_schedule  # noqa: F401  (registers its global functions)
    import tvm_ffi

    def plain(obj):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
            return obj.value
        if isinstance(obj, tvm_ffi.Array):
            return [plain(i) for i in obj]
        if isinstance(obj, tvm_ffi.Map):
            return {plain(k): plain(v) for k, v in obj.items()}
        return tvm.ir.save_json(obj)

    return plain(tvm_ffi.get_global_func("s_tir.meta_schedule.TuningRecordAsJSON")(record))


def write_shipped(archive: str | os.PathLike, databases, keep_existing: bool = True, keep=None) -> int:
    """Merge the best record per workload of ``databases`` (MetaSchedule databases) and, with
    ``keep_existing``, of the archive already there, into ``archive``; returns the entry count.
    ``keep(record) -> bool`` filters the best new record of each workload.  Written to a temporary
    file and renamed."""
    entries: dict[str, tuple[float, str, str]] = {}       # hash -> (mean run s, record, workload)

    def offer(h: str, mean: float, rec: str, wl: str) -> None:
        if h not in entries or mean < entries[h][0]:
            entries[h] = (mean, rec, wl)

    archive = Path(archive)
    if keep_existing and archive.is_file():
        with zipfile.ZipFile(archive) as z:
            for n in z.namelist():
                if n.endswith(_RECORD):
                    h = n[:-len(_RECORD)]
                    rec = z.read(n).decode()
                    offer(h, _mean(json.loads(rec)[1]), rec, z.read(h + _WORKLOAD).decode())
    import tvm_ffi

    best: dict[str, tuple[float, object]] = {}             # the new records: best per workload first
    for db in databases:
        for record in db.get_all_tuning_records():
            if not record.run_secs:
                continue
            h, mean = str(tvm_ffi.structural_hash(record.workload.mod)), _mean(record.run_secs)
            if h not in best or mean < best[h][0]:
                best[h] = (mean, record)
    for h, (mean, record) in best.items():
        if keep is None or keep(record):
            offer(h, mean, json.dumps(record_json(record), separators=(",", ":")),
                  json.dumps(record.workload.as_json(), separators=(",", ":")))
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for h in sorted(entries):
            _, rec, wl = entries[h]
            z.writestr(h + _RECORD, rec)
            z.writestr(h + _WORKLOAD, wl)
    os.replace(tmp, archive)
    return len(entries)
