"""Boards: ``dsconv-tvm bench`` here and over the RPC tracker (on the emulated Raspberry Pi and on
x86 board servers started here), the faults (unreachable tracker, unknown key, busy / killed / hung
board, session timeout), and the ``tracker`` / ``board-server`` verbs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsconv_tvm.cli import main as cli
from dsconv_tvm.remote import processes
from dsconv_tvm.remote.processes import popen_child
from dsconv_tvm.remote import tracker as tracker_protocol
from dsconv_tvm.execute.runner import predict

from conftest import REPO, free_port, load_emulated_board_tool

CLI = [sys.executable, "-m", "dsconv_tvm.cli"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _model(path, seed=0):
    """conv1 -> relu -> conv2 (s2, bias) -> relu -> conv3 (1x1) -> relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)

    def init(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32), name)
    inits = [init("W1", rng.standard_normal((8, 3, 3, 3)) * 0.3),
             init("W2", rng.standard_normal((16, 8, 3, 3)) * 0.1), init("B2", rng.standard_normal(16) * 0.1),
             init("W3", rng.standard_normal((16, 16, 1, 1)) * 0.2),
             init("Wf", rng.standard_normal((10, 16)) * 0.2), init("Bf", rng.standard_normal(10) * 0.1)]
    nodes = [helper.make_node("Conv", ["input", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2],
                              name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3"], ["c3"], name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"]),
             helper.make_node("GlobalAveragePool", ["r3"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["fl"]),
             helper.make_node("Gemm", ["fl", "Wf", "Bf"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "tiny_remote",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


def _cli_call(*argv):
    """Run the CLI in-process; (rc, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _error_line(err: str, verb: str = "bench") -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(f"dsconv-tvm {verb}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _bench_workers(parent_pid: int | None = None):
    """Live remote-bench worker processes (of ``parent_pid``, or of anyone)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "--dsconv-bench-worker" in cmd and (parent_pid is None or f"--parent={parent_pid}" in cmd):
            found.append(p)
    return found


def _closed_port() -> int:
    return free_port()                       # bound, then closed: nothing listens there


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """The same small model compiled for x86 (this host), arm and rpi5 (DSConv on every conv)."""
    d = tmp_path_factory.mktemp("remote_libs")
    model = _model(d / "tiny.onnx")
    out = {}
    for target in ("x86", "arm", "rpi5"):
        so = d / f"tiny_{target}.so"
        rc, _o, err = _cli_call("compile", model, "--target", target, "-o", so, "--no-check",
                                "--first-layer", "dsconv")
        if rc == 2 and "not found" in err and target != "x86":
            pytest.skip(err.strip())
        assert rc == 0, err
        out[target] = str(so)
    return out


class _Board:
    """``dsconv-tvm board-server`` (x86) as a subprocess, registered at the tracker."""

    def __init__(self, tracker, key, tmp):
        self.key, self.port, self.tracker = key, free_port(), tracker
        self.log = Path(tmp) / f"board-{key}.log"
        self.proc = popen_child(
            [*CLI, "board-server", "--tracker", tracker.address, "--key", key, "--port", str(self.port)],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(REPO))
        t0 = time.time()
        while "registered at tracker" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.time() - t0 < 90, self.log.read_text()
            time.sleep(0.3)

    def tree(self):
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self):
        processes.kill_process_tree(self.proc.pid)
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def x86_board(rpc_tracker, tmp_path_factory):
    b = _Board(rpc_tracker, "x86-shared", tmp_path_factory.mktemp("x86_board"))
    yield b
    b.stop()


def _start_bench(argv, tmp_path):
    out, err = tmp_path / "bench.out", tmp_path / "bench.err"
    proc = popen_child([*CLI, "bench", *map(str, argv)], stdout=open(out, "w"),
                            stderr=open(err, "w"), stdin=subprocess.DEVNULL, cwd=str(REPO))
    return proc, out, err


def _wait_for(path: Path, text: str, proc, timeout=60):
    t0 = time.time()
    while text not in path.read_text():
        assert proc.poll() is None, path.read_text()
        assert time.time() - t0 < timeout, path.read_text()
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------
# emulated Raspberry Pi (qemu) over the tracker: arm and rpi5 libraries match the x86 run
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["arm", "rpi5"])
def test_bench_on_emulated_board_matches_host(emulated_board_booting, libs, emulated_board, target,
                                              tmp_path):
    js, npz = tmp_path / "bench.json", tmp_path / "board.npz"
    rc, out, err = _cli_call("bench", libs[target], "--tracker", emulated_board.tracker, "--key",
                             emulated_board.key, "--repeat", 3, "--number", 1, "--reference",
                             libs["x86"], "--json", js, "--output", npz)
    assert rc == 0, err
    assert "EMULATED" in out and "meaningless for speed" in out
    assert re.search(r"latency   median [\d.]+ ms  min [\d.]+ ms  max [\d.]+ ms", out), out
    assert re.search(r"check .*argmax same: OK", out), out
    data = json.loads(js.read_text())
    assert data["mode"] == "remote" and data["emulated"] and not data["timings_meaningful"]
    assert data["complete"] and data["measured"] == 3 and data["check"]["ok"]
    assert data["input_shape"] == [1, 3, 16, 16]
    # independently: the board's output against the host run of the x86 library
    with np.load(npz) as z:
        x, y = z["input"], z["output"]
    ref = predict(libs["x86"], x)
    assert y.shape == ref.shape
    assert np.max(np.abs(y - ref)) <= 1e-4 * np.max(np.abs(ref))
    assert np.array_equal(np.argmax(y, axis=1), np.argmax(ref, axis=1))
    assert not _bench_workers(os.getpid())


def test_bench_emulated_arm_without_reference_says_check_skipped(emulated_board, libs):
    rc, out, err = _cli_call("bench", libs["arm"], "--tracker", emulated_board.tracker, "--key",
                             emulated_board.key, "--repeat", 1, "--number", 1)
    assert rc == 0, err
    assert "check     skipped" in out and "--reference" in out


def test_emulated_board_build_is_cached(emulated_board_booting):
    tool = load_emulated_board_tool()
    t0 = time.time()
    board = tool.ensure_board(log=lambda m: None)
    assert time.time() - t0 < 2
    info = board.info()
    assert info["tvm"] == "0.27.0.post1" and info["tvm_ffi"] == "0.1.14.post1"
    assert board.python.is_file() and os.access(board.python, os.X_OK)


# ------------------------------------------------------------------------------------------------
# local benchmark
# ------------------------------------------------------------------------------------------------
def test_bench_local_host_library(libs, tmp_path):
    js = tmp_path / "local.json"
    rc, out, err = _cli_call("bench", libs["x86"], "--repeat", 5, "--number", 2, "--json", js)
    assert rc == 0, err
    m = re.search(r"median ([\d.]+) ms  min ([\d.]+) ms  max ([\d.]+) ms", out)
    assert m, out
    med, lo, hi = map(float, m.groups())
    assert 0 < lo <= med <= hi
    data = json.loads(js.read_text())
    assert data["mode"] == "local" and data["complete"] and len(data["times_ms"]) == 5
    assert data["number"] == 2 and data["min_ms"] <= data["median_ms"] <= data["max_ms"]
    assert "meaningless" not in out


def test_bench_local_refuses_arm_library(libs):
    rc, _out, err = _cli_call("bench", libs["arm"])
    assert rc == 2
    assert "AArch64" in _error_line(err) and "--tracker" in err


@pytest.mark.parametrize("argv, needle", [
    (["--key", "k"], "--key needs --tracker"),
    (["--tracker", "nohostport", "--key", "k"], "HOST:PORT"),
    (["--tracker", "127.0.0.1:9190"], "--key"),
    (["--repeat", "0"], "--repeat"),
])
def test_bench_usage_errors(libs, argv, needle):
    rc, _out, err = _cli_call("bench", libs["x86"], *argv)
    assert rc == 2 and needle in _error_line(err)


# ------------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------------
def test_unreachable_tracker_fails_fast(libs):
    port = _closed_port()
    t0 = time.time()
    rc, _out, err = _cli_call("bench", libs["x86"], "--tracker", f"127.0.0.1:{port}", "--key", "k")
    assert rc == 2 and time.time() - t0 < 10
    assert "unreachable" in _error_line(err)
    assert not _bench_workers(os.getpid())


def test_unknown_key_fails_within_timeout(rpc_tracker, x86_board, libs):
    t0 = time.time()
    rc, _out, err = _cli_call("bench", libs["x86"], "--tracker", rpc_tracker.address, "--key",
                              "no-such-board", "--timeout", 10)
    assert rc == 2 and time.time() - t0 < 10
    line = _error_line(err)
    assert "no board registered with key 'no-such-board'" in line and x86_board.key in line


def test_busy_board_gives_up_after_timeout(rpc_tracker, x86_board, libs):
    # hold the only board with that key (the board ends this session by itself after 8 s)
    with tracker_protocol.board_session(rpc_tracker.address, x86_board.key, timeout=30, session_timeout=8):
        t0 = time.time()
        rc, _out, err = _cli_call("bench", libs["x86"], "--tracker", rpc_tracker.address, "--key",
                                  x86_board.key, "--timeout", 4)
        elapsed = time.time() - t0
    assert rc == 2 and elapsed < 4 + 8, elapsed
    assert "all are busy" in _error_line(err)
    assert not _bench_workers(os.getpid())


def test_x86_board_over_rpc_checks_itself(rpc_tracker, x86_board, libs, tmp_path):
    """A host library on a (local) x86 board: checked against a run of the same library here."""
    rc, out, err = _cli_call("bench", libs["x86"], "--tracker", rpc_tracker.address, "--key",
                             x86_board.key, "--repeat", 3, "--number", 2)
    assert rc == 0, err
    assert "same library here" in out and "OK" in out and "meaningless" not in out
    rc, out, err = _cli_call("bench", libs["x86"], "--tracker", rpc_tracker.address, "--key",
                             x86_board.key, "--repeat", 1, "--number", 1, "--emulated")
    assert rc == 0 and "meaningless for speed" in out, err


def test_board_output_mismatch_is_an_error(rpc_tracker, x86_board, libs, tmp_path):
    """--reference of another model (same input shape, other weights): the check fails, exit 2."""
    other = tmp_path / "other_x86.so"
    rc, _o, err = _cli_call("compile", _model(tmp_path / "other.onnx", seed=1), "-o", other,
                            "--no-check", "--first-layer", "dsconv")
    assert rc == 0, err
    js = tmp_path / "mismatch.json"
    rc, out, err = _cli_call("bench", libs["x86"], "--tracker", rpc_tracker.address, "--key",
                             x86_board.key, "--repeat", 2, "--number", 1, "--reference", other,
                             "--json", js)
    assert rc == 2
    assert "does not match the host run" in _error_line(err)
    assert "MISMATCH" in out and "median" in out
    assert json.loads(js.read_text())["check"]["ok"] is False


def test_session_timeout_keeps_partial_results(rpc_tracker, x86_board, libs, tmp_path):
    js = tmp_path / "partial.json"
    t0 = time.time()
    rc, out, err = _cli_call("bench", libs["x86"], "--tracker", rpc_tracker.address, "--key",
                             x86_board.key, "--repeat", 10**7, "--number", 20,
                             "--session-timeout", 3, "--json", js)
    assert rc == 2 and time.time() - t0 < 40, err
    assert "session has expired" in _error_line(err)
    assert "INCOMPLETE" in out
    data = json.loads(js.read_text())
    assert not data["complete"] and data["measured"] > 0 and "expired" in data["error"]
    assert data["median_ms"] is not None
    assert not _bench_workers(os.getpid())


def test_board_killed_mid_benchmark(rpc_tracker, libs, tmp_path):
    board = _Board(rpc_tracker, "x86-victim", tmp_path)
    js = tmp_path / "killed.json"
    bench, out, err = _start_bench([libs["x86"], "--tracker", rpc_tracker.address, "--key",
                                    board.key, "--repeat", 10**7, "--number", 20, "--json", js],
                                   tmp_path)
    try:
        _wait_for(err, "measuring", bench)
        time.sleep(1.5)
        board.stop()                                   # the board dies
        t0 = time.time()
        rc = bench.wait(timeout=60)
        assert time.time() - t0 < 30
    finally:
        if bench.poll() is None:
            processes.kill_process_tree(bench.pid)
        board.stop()
    e, o = err.read_text(), out.read_text()
    assert rc == 2, e
    line = _error_line(e)
    assert "connection to the board was lost" in line and "during measurement" in line
    assert "INCOMPLETE" in o
    data = json.loads(js.read_text())
    assert not data["complete"] and data["measured"] > 0 and data["error"]
    assert not _bench_workers(bench.pid)               # no child process left behind
    assert not board.tree()


def test_hung_board_gives_up_after_timeout(rpc_tracker, libs, tmp_path):
    board = _Board(rpc_tracker, "x86-hung", tmp_path)
    js = tmp_path / "hung.json"
    bench, out, err = _start_bench([libs["x86"], "--tracker", rpc_tracker.address, "--key",
                                    board.key, "--repeat", 10**7, "--number", 20, "--timeout", 4,
                                    "--json", js], tmp_path)
    frozen = []
    try:
        _wait_for(err, "measuring", bench)
        time.sleep(1.0)
        frozen = board.tree()
        for p in frozen:                               # the board hangs (no answer, no close)
            p.send_signal(signal.SIGSTOP)
        t0 = time.time()
        rc = bench.wait(timeout=60)
        assert time.time() - t0 < 4 + 10
    finally:
        if bench.poll() is None:
            processes.kill_process_tree(bench.pid)
        for p in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
        board.stop()
    assert rc == 2
    assert "gave no answer for 4 s while measuring" in _error_line(err.read_text())
    data = json.loads(js.read_text())
    assert not data["complete"] and data["measured"] > 0
    assert not _bench_workers(bench.pid)


# ------------------------------------------------------------------------------------------------
# the tracker / board-server verbs
# ------------------------------------------------------------------------------------------------
def _listening(pids, port):
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                    found.append(c.laddr.ip)
    return found


def _tree_pids(proc):
    p = psutil.Process(proc.pid)
    return [p.pid, *(c.pid for c in p.children(recursive=True))]


def test_tracker_and_board_server_verbs(tmp_path):
    tport, sport = free_port(), free_port()
    tlog, slog = tmp_path / "tracker.log", tmp_path / "server.log"
    tracker = popen_child([*CLI, "tracker", "--port", str(tport)], stdout=open(tlog, "w"),
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
                               start_new_session=True)
    server = None
    try:
        _wait_for(tlog, "tracker listening on 127.0.0.1:", tracker)
        assert "anyone who can reach the tracker" in tlog.read_text()
        tpids = _tree_pids(tracker)
        assert _listening(tpids, tport) == ["127.0.0.1"]

        server = popen_child([*CLI, "board-server", "--tracker", f"127.0.0.1:{tport}", "--key",
                                   "verb-test", "--port", str(sport)], stdout=open(slog, "w"),
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
                                  start_new_session=True)
        _wait_for(slog, "registered at tracker", server)
        text = slog.read_text()
        assert "runs any code uploaded to it" in text and "anyone who can reach" in text
        assert tracker_protocol.registered_keys(tracker_protocol.tracker_summary("127.0.0.1", tport)) == {"verb-test": 1}
        spids = _tree_pids(server)
        assert _listening(spids, sport) == ["127.0.0.1"]

        # TVM's server process dies (or its thread ends after a vanished client): restarted
        tvm_server = [p for p in psutil.Process(server.pid).children()
                      if "tvm.exec.popen_worker" in " ".join(p.cmdline())]
        assert len(tvm_server) == 1
        tvm_server[0].kill()
        _wait_for(slog, "restarting it", server)
        t0 = time.time()
        while tracker_protocol.registered_keys(tracker_protocol.tracker_summary("127.0.0.1", tport)) != {"verb-test": 1}:
            assert time.time() - t0 < 30
            time.sleep(0.3)
        spids = _tree_pids(server)
        assert _listening(spids, sport) == ["127.0.0.1"]

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        assert "board server stopped" in slog.read_text()
        time.sleep(0.5)
        assert not [p for p in spids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        t0 = time.time()
        while tracker_protocol.registered_keys(tracker_protocol.tracker_summary("127.0.0.1", tport)):
            assert time.time() - t0 < 20
            time.sleep(0.3)

        tracker.send_signal(signal.SIGTERM)
        assert tracker.wait(timeout=20) == 0
        assert "tracker stopped" in tlog.read_text()
        time.sleep(0.5)
        assert not [p for p in tpids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    finally:
        for p in (server, tracker):
            if p is not None and p.poll() is None:
                processes.kill_process_tree(p.pid)


def test_board_server_unreachable_tracker_exits_2():
    port = _closed_port()
    t0 = time.time()
    rc, _out, err = _cli_call("board-server", "--tracker", f"127.0.0.1:{port}", "--key", "k",
                              "--wait", 1)
    assert rc == 2 and time.time() - t0 < 15
    assert "unreachable" in _error_line(err, "board-server")
    assert "runs any code uploaded" in err


def test_tracker_port_in_use_exits_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc, _out, err = _cli_call("tracker", "--port", port)
    assert rc == 2 and f"127.0.0.1:{port}" in _error_line(err, "tracker")


def test_in_process_services_leave_the_callers_children_alone():
    """A tracker / board server run in-process stops only what it started (it once killed every
    child of the caller: the test session's tracker and boards)."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            assert _cli_call("tracker", "--port", s.getsockname()[1])[0] == 2
        assert _cli_call("board-server", "--tracker", f"127.0.0.1:{_closed_port()}", "--key", "k",
                         "--wait", 1)[0] == 2
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=10)


# ------------------------------------------------------------------------------------------------
# tools/emulated_board.py: atomic build, clear error without qemu
# ------------------------------------------------------------------------------------------------
def test_emulated_board_interrupted_build_restarts_cleanly(tmp_path, monkeypatch):
    tool = load_emulated_board_tool()
    monkeypatch.setattr(tool, "check_qemu", lambda: "/usr/bin/true")

    def interrupted(work, downloads, log):
        (work / "half-written").write_text("x")
        raise KeyboardInterrupt
    monkeypatch.setattr(tool, "_build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tool.ensure_board(tmp_path)
    top = tool.board_dir(tmp_path)
    assert not (top / "board").exists() and not list(top.glob(".build-*"))
    (top / ".build-stale").mkdir()                      # e.g. left by a killed process

    calls = []

    def ok(work, downloads, log):
        calls.append(work)
        (work / "python3").write_text("#!/bin/sh\n")
    monkeypatch.setattr(tool, "_build", ok)
    board = tool.ensure_board(tmp_path)
    assert board.path == top / "board" and (top / "board" / "DONE").is_file()
    assert not list(top.glob(".build-*"))
    tool.ensure_board(tmp_path)                          # cached: not built again
    assert len(calls) == 1


def test_emulated_board_needs_qemu(monkeypatch, tmp_path):
    tool = load_emulated_board_tool()
    monkeypatch.setattr(tool.shutil, "which", lambda name: None)
    with pytest.raises(tool.BoardSetupError, match="qemu-user-static"):
        tool.ensure_board(tmp_path)
    monkeypatch.setenv("DSCONV_TVM_CACHE", str(tmp_path))
    assert tool.board_dir() == tmp_path / "emulated-board"


# ------------------------------------------------------------------------------------------------
# nothing leaks, the board server heals (issue 12)
# ------------------------------------------------------------------------------------------------
def _tvm_server_process(board):
    """TVM's RPC server process of a board server (its ``tvm.exec.popen_worker`` child)."""
    for p in psutil.Process(board.proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "tvm.exec.popen_worker" in " ".join(p.cmdline()):
                return p
    return None


def test_board_server_heals_when_its_rpc_worker_is_killed_mid_session(rpc_tracker, libs, tmp_path):
    board = _Board(rpc_tracker, "x86-heal", tmp_path)
    bench = None
    try:
        bench, _out, err = _start_bench([libs["x86"], "--tracker", rpc_tracker.address, "--key",
                                         board.key, "--repeat", 10**7, "--number", 20], tmp_path)
        _wait_for(err, "measuring", bench)
        worker = _tvm_server_process(board)
        assert worker is not None and worker.children()        # a session is being served
        session = worker.children(recursive=True)
        worker.kill()                                            # the stuck/killed server worker
        assert bench.wait(timeout=60) == 2
        for p in session:                                        # its session dies with it
            with contextlib.suppress(psutil.NoSuchProcess):
                assert p.wait(timeout=10) is not None or True
            assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
        # the server restarts TVM's server on the same port and registers again
        tracker_protocol.wait_board_free(rpc_tracker.address, board.key, timeout=60)
        assert "restarting it" in board.log.read_text()
        assert _listening([p.pid for p in board.tree()], board.port) == ["127.0.0.1"]
        rc, out, err2 = _cli_call("bench", libs["x86"], "--tracker", rpc_tracker.address, "--key",
                                  board.key, "--repeat", 2, "--number", 1, "--timeout", 30)
        assert rc == 0, err2
        assert "cannot bind" not in board.log.read_text()
    finally:
        if bench is not None and bench.poll() is None:
            processes.kill_process_tree(bench.pid)
        board.stop()
    assert not board.tree()


_PARENT = """
import sys, time
from dsconv_tvm.remote.processes import popen_child
cli = [sys.executable, "-m", "dsconv_tvm.cli"]
t = popen_child([*cli, "tracker", "--port", sys.argv[1]], stdout=open(sys.argv[3], "w"), stderr=-2)
time.sleep(1.5)
s = popen_child([*cli, "board-server", "--tracker", "127.0.0.1:" + sys.argv[1], "--key", "orphan",
                 "--port", sys.argv[2]], stdout=open(sys.argv[4], "w"), stderr=-2)
print(t.pid, s.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_parent_leaves_no_service(tmp_path, sig):
    """A process (a test run, a script) that started a tracker and a board server is killed: both
    services and every process they started go with it."""
    tport, sport = free_port(), free_port()
    tlog, slog = tmp_path / "t.log", tmp_path / "s.log"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tport), str(sport), str(tlog), str(slog)],
                              stdout=subprocess.PIPE, text=True, cwd=str(REPO), start_new_session=True)
    tree = []
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        t0 = time.time()
        while "registered at tracker" not in slog.read_text():
            assert time.time() - t0 < 90, slog.read_text()
            time.sleep(0.3)
        tree = [psutil.Process(p) for p in pids]
        tree += [c for p in list(tree) for c in p.children(recursive=True)]
        assert len(tree) >= 4                              # the verbs and TVM's processes
        parent.send_signal(sig)
        parent.wait(timeout=10)
        _gone, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                processes.kill_process_tree(p.pid)
        parent.stdout.close()


def test_killed_bench_leaves_no_worker_and_frees_the_board(rpc_tracker, x86_board, libs, tmp_path):
    bench, _out, err = _start_bench([libs["x86"], "--tracker", rpc_tracker.address, "--key",
                                     x86_board.key, "--repeat", 10**7, "--number", 20], tmp_path)
    try:
        _wait_for(err, "measuring", bench)
        workers = _bench_workers(bench.pid)
        assert workers
        bench.kill()                                       # SIGKILL: no handler runs
        bench.wait(timeout=10)
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive
    finally:
        if bench.poll() is None:
            processes.kill_process_tree(bench.pid)
    # the board ends the orphaned session and is free again
    tracker_protocol.wait_board_free(rpc_tracker.address, x86_board.key, timeout=60)
