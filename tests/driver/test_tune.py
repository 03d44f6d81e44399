"""`dsconv-tvm tune` (MetaSchedule + XGBoost) and `compile --tuning-db`: tuned schedules are used and
the tuned model still equals the numpy reference."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsconv_tvm.cli import main as cli
from dsconv_tvm.driver.compile import compile_model
from dsconv_tvm.execute.runner import sample_inputs
from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.execute.runner import predict
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


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    model = _one_conv_model(str(d / "one.onnx"))
    work = str(d / "db")
    rc = cli.main(["tune", model, "--work-dir", work, "--trials-per-task", "4", "--trials-per-iter", "2",
                   "--block", "8", "--first-layer", "dsconv"])
    assert rc == 0
    return model, work


def test_tune_writes_a_database(tuned):
    _, work = tuned
    assert os.path.getsize(os.path.join(work, "database_tuning_record.json")) > 0
    assert os.path.getsize(os.path.join(work, "database_workload.json")) > 0
    with open(os.path.join(work, "database_tuning_record.json")) as f:
        records = [line for line in f if line.strip()]
    assert 1 <= len(records) <= 4          # --trials-per-task 4 with one task: 4 trials in total


def test_trials_per_task_must_be_positive(tmp_path, capsys):
    model = _one_conv_model(str(tmp_path / "one.onnx"))
    assert cli.main(["tune", model, "--work-dir", str(tmp_path / "w"), "--trials-per-task", "0"]) == 2
    err = capsys.readouterr().err
    assert "--trials-per-task 0" in err and "Traceback" not in err


def test_compile_uses_tuning_db_and_matches_reference(tuned, tmp_path, capsys):
    model, work = tuned
    cfg = DSConvConfig(block=8, first_layer="dsconv")
    out = str(tmp_path / "t.so")
    result = compile_model(model, "x86", out, cfg, check=False, tuning_db=work)
    assert result.schedules.startswith("tuning database")
    assert result.tuned_functions and any(f.startswith("dsconv_") for f in result.tuned_functions)
    loaded = load_onnx(model)
    x = sample_inputs(loaded, 1)[0]
    ref = reference_model(loaded, result.report, cfg.mantissa, cfg.block)(x)
    np.testing.assert_allclose(predict(out, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert cli.main(["compile", model, "-o", str(tmp_path / "u.so"), "--block", "8", "--first-layer", "dsconv",
                     "--tuning-db", work, "--no-check"]) == 0
    assert "1 of 1 DSConv layers tuned" in capsys.readouterr().out


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

    from conftest import free_port, emulated_board_tool, start_tracker
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
    import json
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
