"""The shipped schedules: keyed by the kernels' instruction set, one compact archive read lazily,
the best record per workload kept when merging."""

import zipfile
from pathlib import Path

import pytest

from dsconv_tvm.driver.database import find_database, shipped_schedules_dir, shipped_schedules_key
from dsconv_tvm.driver.shipped import ARCHIVE, shipped_database, write_shipped
from dsconv_tvm.host import host_features

REPO = Path(__file__).resolve().parents[2]
AVX2 = REPO / "schedules" / "x86-avx2" / ARCHIVE


def test_keys_follow_the_kernel_isa():
    assert shipped_schedules_key("x86-avx2") == "x86-avx2"
    assert shipped_schedules_key("x86-avx512") == "x86-avx512"
    assert shipped_schedules_key("x86-vnni") == "x86-vnni"
    assert shipped_schedules_key("rpi5") == "rpi5"
    host = host_features()
    want = "x86-vnni" if host.get("avx512vnni") else "x86-avx512" if host.get("avx512bw") else "x86-avx2"
    assert shipped_schedules_key("x86") == want          # whatever the CPU is called
    assert shipped_schedules_dir("x86-avx2") == AVX2.parent
    db, where = find_database("x86-avx2", None)
    assert where == "shipped schedules/x86-avx2" and len(db) > 0


def _one_entry(db):
    from tvm.s_tir import meta_schedule as ms

    h = sorted(db.hashes)[0]
    w = db._workload(h)
    return h, w, ms.database.TuningRecord.from_json(db._record_json(h), w)


def test_archive_query_and_merge_keep_the_best(tmp_path):
    from tvm.s_tir import meta_schedule as ms
    from tvm.target import Target

    from dsconv_tvm.backends.cpu.schedule import register_metaschedule_rule

    register_metaschedule_rule()
    db = shipped_database(AVX2)
    with zipfile.ZipFile(AVX2) as z:
        assert {n.split(".")[0] for n in z.namelist()} == db.hashes
    h, w, rec = _one_entry(db)
    assert db.has_workload(w.mod)
    target = Target({"kind": "llvm", "mcpu": "haswell"})
    assert db.query_schedule(w.mod, target, "main") is not None      # the trace replays

    mem = ms.database.MemoryDatabase()
    wl = mem.commit_workload(w.mod)
    for secs in (2.0, 0.5, 1.0):
        mem.commit_tuning_record(ms.database.TuningRecord(rec.trace, wl, [secs], rec.target, rec.args_info))
    out = tmp_path / "s" / ARCHIVE
    assert write_shipped(out, [mem]) == 1
    small = shipped_database(out)
    assert len(small) == 1 and small.verify() == []
    best = small.get_top_k(small.commit_workload(w.mod), 1)
    assert [float(s) for s in best[0].run_secs] == [0.5]
    # merging a worse record keeps the better one already shipped
    mem2 = ms.database.MemoryDatabase()
    mem2.commit_tuning_record(ms.database.TuningRecord(rec.trace, mem2.commit_workload(w.mod), [3.0],
                                                       rec.target, rec.args_info))
    assert write_shipped(out, [mem2]) == 1
    assert [float(s) for s in shipped_database(out).get_top_k(small.commit_workload(w.mod), 1)[0].run_secs] == [0.5]
    with pytest.raises(Exception):
        small.commit_tuning_record(rec)
