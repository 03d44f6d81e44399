"""`dsconv-tvm tune` (MetaSchedule + XGBoost) and `compile --tuning-db`: tuned schedules are used and
the tuned model still equals the numpy reference."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsconv_tvm.cli import main as cli
from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.driver.compile import compile_model
from dsconv_tvm.execute.runner import predict, sample_inputs
from dsconv_tvm.frontend.onnx import load_onnx
from dsconv_tvm.scheme.reference import reference_model


def _one_conv_model(path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["out"])]
    g = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 12, 12])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 12, 12])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _tune_one_conv(d, *extra) -> tuple[str, str, str]:
    """``tune`` of the one-conv model in the folder ``d`` (4 trials); (model, work dir, output)."""
    model = _one_conv_model(str(d / "one.onnx"))
    work = str(d / "db")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["tune", model, "--work-dir", work, "--trials-per-task", "4", "--trials-per-iter", "2",
                       "--block", "8", "--first-layer", "dsconv", *extra])
    assert rc == 0
    return model, work, out.getvalue()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    model, work, out = _tune_one_conv(tmp_path_factory.mktemp("tune"), "--keep-losing")
    assert "guard     not run (--keep-losing): every record is kept" in out
    return model, work


def test_tune_writes_a_database(tuned):
    _, work = tuned
    assert os.path.getsize(os.path.join(work, "database_tuning_record.json")) > 0
    assert os.path.getsize(os.path.join(work, "database_workload.json")) > 0
    with open(os.path.join(work, "database_tuning_record.json")) as f:
        records = [line for line in f if line.strip()]
    assert 1 <= len(records) <= 4          # --trials-per-task 4 with one task: 4 trials in total
    assert not os.path.exists(os.path.join(work, "guard.json"))


def test_trials_per_task_must_be_positive(tmp_path, capsys):
    model = _one_conv_model(str(tmp_path / "one.onnx"))
    assert cli.main(["tune", model, "--work-dir", str(tmp_path / "w"), "--trials-per-task", "0"]) == 2
    err = capsys.readouterr().err
    assert "--trials-per-task 0" in err and "Traceback" not in err


def _compile_and_check(model, work, out):
    """Compile with the tuning database ``work``: the library matches the numpy reference; the
    compile result (its ``tuned_functions``: the functions a database record scheduled)."""
    cfg = DSConvConfig(block=8, first_layer="dsconv")
    result = compile_model(model, "x86", out, cfg, check=False, tuning_db=work)
    assert result.schedules.startswith("tuning database")
    loaded = load_onnx(model)
    x = sample_inputs(loaded, 1)[0]
    ref = reference_model(loaded, result.report, cfg.mantissa, cfg.block)(x)
    np.testing.assert_allclose(predict(out, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    return result


def test_compile_uses_tuning_db_and_matches_reference(tuned, tmp_path, capsys):
    model, work = tuned
    result = _compile_and_check(model, work, str(tmp_path / "t.so"))
    assert result.tuned_functions and any(f.startswith("dsconv_") for f in result.tuned_functions)
    assert cli.main(["compile", model, "-o", str(tmp_path / "u.so"), "--block", "8", "--first-layer", "dsconv",
                     "--tuning-db", work, "--no-check"]) == 0
    assert "1 of 1 DSConv layers tuned" in capsys.readouterr().out


def _records(work):
    with open(os.path.join(work, "database_tuning_record.json")) as f:
        return f.read()


@pytest.mark.parametrize("tuned_ms, kept", [(0.5, True), (0.96, False), (2.0, False)])
def test_guard_keeps_only_records_that_beat_the_default(tuned, tmp_path, tuned_ms, kept):
    """A record kept stays (the file is not rewritten); one that loses (or is within the 5 % margin)
    is removed with every record of its workload, and compile then uses the default schedule."""
    from dsconv_tvm.driver.guard import guard_database

    model, work = tuned
    db = str(tmp_path / "db")
    shutil.copytree(work, db)
    before = _records(db)
    measured = [{"workload": 0, "name": "conv", "tuned_ms": tuned_ms, "default_ms": 1.0}]
    result = guard_database(db, "x86", measure=lambda w, t: measured)
    assert [(e.name, e.kept, e.tuned_ms, e.default_ms) for e in result.entries] == [("conv", kept, tuned_ms, 1.0)]
    report = json.load(open(os.path.join(db, "guard.json")))
    assert report["kept"] == int(kept) and report["tasks"][0]["tuned_ms"] == tuned_ms
    assert report["records_removed"] == result.records_removed
    if kept:
        assert _records(db) == before and result.records_removed == 0
    else:
        assert _records(db) == "" and result.records_removed == before.count("\n")
    workloads = [open(os.path.join(d, "database_workload.json")).read() for d in (db, work)]
    assert workloads[0] == workloads[1]             # the workloads file is left as it is
    compiled = _compile_and_check(model, db, str(tmp_path / "g.so"))
    assert bool(compiled.tuned_functions) == kept


def test_guard_drops_untimed_records_and_rewrites_atomically(tuned, tmp_path, monkeypatch):
    """A workload the timing child did not report is dropped; a rewrite that fails at the rename (a
    kill) leaves the database as it was and no temporary file."""
    from dsconv_tvm import fileio
    from dsconv_tvm.driver.guard import guard_database

    _, work = tuned
    db = str(tmp_path / "db")
    shutil.copytree(work, db)
    before, listing = _records(db), sorted(os.listdir(db))

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        guard_database(db, "x86", measure=lambda w, t: [{"timeout": 1.0}])
    assert _records(db) == before and sorted(os.listdir(db)) == listing
    monkeypatch.undo()
    result = guard_database(db, "x86", measure=lambda w, t: [{"timeout": 1.0}])
    assert [(e.kept, e.note) for e in result.entries] == [(False, "not timed (timeout 1 s)")]
    assert _records(db) == ""


def test_guard_timing_child_is_bounded(tuned):
    """The timing child killed at its timeout reports the timeout (and whatever it timed before)."""
    from dsconv_tvm.driver.guard import measure_in_child

    _, work = tuned
    assert measure_in_child(work, "x86", timeout_s=0.2)[-1] == {"timeout": 0.2}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    return _tune_one_conv(tmp_path_factory.mktemp("guarded"))


def test_tune_guard_keeps_only_records_that_beat_the_default(guarded, tuned, tmp_path):
    """After `tune`: every record left beats the default by the guard's own measurement
    (guard.json), the others are gone, the summary is printed, and the model compiled with the
    database still matches the reference.  The same run with --keep-losing (``tuned``) kept every
    record: as many as the guarded run left and removed."""
    from dsconv_tvm.driver.guard import MARGIN

    model, work, out = guarded
    report = json.load(open(os.path.join(work, "guard.json")))
    assert report["margin"] == MARGIN and len(report["tasks"]) == 1
    task = report["tasks"][0]
    assert task["tuned_ms"] > 0 and task["default_ms"] > 0
    assert task["kept"] == (task["tuned_ms"] < MARGIN * task["default_ms"])
    records = _records(work).splitlines()
    left = {json.loads(line)[0] for line in records}
    assert left == {t["workload"] for t in report["tasks"] if t["kept"]}
    assert len(_records(tuned[1]).splitlines()) == len(records) + report["records_removed"]
    assert f"guard     {'kept   ' if task['kept'] else 'dropped'} dsconv in=[1, 8, 12, 12]" in out
    assert f"guard     {report['kept']} of 1 tasks keep their tuned record" in out
    result = _compile_and_check(model, work, str(tmp_path / "g.so"))
    assert bool(result.tuned_functions) == task["kept"]


def test_bad_tuning_db_is_one_line_error(tuned, tmp_path, capsys):
    model, _ = tuned
    assert cli.main(["compile", model, "-o", str(tmp_path / "x.so"), "--tuning-db", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a tuning database" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x.so")


def test_tune_for_a_board_needs_a_tracker(tuned, tmp_path, capsys):
    model, _ = tuned
    assert cli.main(["tune", model, "--target", "rpi4", "--work-dir", str(tmp_path / "w")]) == 2
    assert "--tracker" in capsys.readouterr().err


@pytest.fixture
def own_emulated_board(tmp_path):
    """A tracker and an emulated board of this test's own (the session's are shared with the fault
    tests of test_remote.py, which stop and freeze boards)."""
    import subprocess
    from types import SimpleNamespace

    from conftest import emulated_board_tool, free_port, start_tracker

    from dsconv_tvm.remote.processes import kill_process_tree

    tool = emulated_board_tool()
    board = tool.ensure_board()
    tracker = start_tracker(tmp_path / "tracker.log")
    server = None
    try:
        with open(tmp_path / "board.log", "w") as fh:
            server = tool.start_board_server(board, tracker.address, "rpi-emu-tune", port=free_port(),
                                             stdout=fh, stderr=subprocess.STDOUT)
        tool.wait_registered(tracker.address, "rpi-emu-tune", timeout=240, proc=server)
        yield SimpleNamespace(tracker=tracker.address, key="rpi-emu-tune")
    finally:
        if server is not None:
            kill_process_tree(server.pid)
        tracker.stop()


def test_tune_over_the_tracker_on_the_emulated_board(own_emulated_board, tmp_path, capsys):
    emulated_board = own_emulated_board
    """`tune --tracker --key`: candidates are cross-linked on the host and measured on the (emulated)
    board; the tuned rpi5 library then runs on the board and matches the host build."""
    import re

    model = _one_conv_model(str(tmp_path / "one.onnx"))
    work = str(tmp_path / "db")
    assert cli.main(["tune", model, "--target", "rpi5", "--work-dir", work, "--trials", "2",
                     "--trials-per-iter", "2", "--block", "8", "--first-layer", "dsconv",
                     "--tracker", emulated_board.tracker, "--key", emulated_board.key,
                     "--timeout", "180"]) == 0
    tune_err = capsys.readouterr().err
    assert "candidates failed" not in tune_err, tune_err[-2000:]
    records = [json.loads(line) for line in open(os.path.join(work, "database_tuning_record.json"))]
    assert records
    so, ref = str(tmp_path / "t_rpi5.so"), str(tmp_path / "t_x86.so")
    common = ["--block", "8", "--first-layer", "dsconv", "--no-check"]
    assert cli.main(["compile", model, "--target", "rpi5", "-o", so, "--tuning-db", work, *common]) == 0
    assert "1 of 1 DSConv layers tuned" in capsys.readouterr().out
    assert cli.main(["compile", model, "--target", "x86", "-o", ref, *common]) == 0
    capsys.readouterr()
    assert cli.main(["bench", so, "--tracker", emulated_board.tracker, "--key", emulated_board.key,
                     "--repeat", "1", "--number", "1", "--reference", ref]) == 0
    assert re.search(r"check .*argmax same: OK", capsys.readouterr().out)


def test_timing_a_record_leaves_its_workload_as_it_was():
    """The guard (and ship_schedules) time a record against the default schedule of its PrimFunc;
    the record's workload must stay the unscheduled PrimFunc (a Schedule on it rewrote it in place,
    and the archive then held scheduled workloads no trace replays on)."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from dsconv_tvm.backends.base import backend_for
    from dsconv_tvm.backends.cpu.kernels import dsconv_primfunc
    from dsconv_tvm.backends.cpu.schedule import register_metaschedule_rule, schedule_dsconv_cpu
    from dsconv_tvm.driver.guard import time_against_default
    from dsconv_tvm.scheme.geometry import ConvGeometry
    from dsconv_tvm.scheme.layer import DSConvLayer
    from dsconv_tvm.target import get_target

    register_metaschedule_rule()
    target = get_target("x86").tvm_target()
    backend = backend_for(target)
    layer = DSConvLayer((1, 32, 8, 8), 32, (1, 1), ConvGeometry(), 4, 32, 8, True, "float32", True, "relu",
                        backend.act_dtype)
    func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
    db = ms.database.MemoryDatabase()
    workload = db.commit_workload(tvm.IRModule({"main": func}))
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    schedule_dsconv_cpu(func, target, sch=sch)
    record = ms.database.TuningRecord(sch.trace, workload, [1e-4], target, ms.arg_info.ArgInfo.from_prim_func(func))
    before = tvm_ffi.structural_hash(record.workload.mod)
    tuned, default = time_against_default(record, target, backend, rounds=1)
    assert tuned > 0 and default > 0
    assert tvm_ffi.structural_hash(record.workload.mod) == before
