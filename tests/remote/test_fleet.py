"""A fleet: two emulated Raspberry Pis registered under one key.  ``tune --tracker --key`` measures on
both at once, and a board killed in the middle of a run costs only the candidates it was measuring;
``bench --all`` times the library on each board and reports per board."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import onnx
import psutil
import pytest
from conftest import REPO, emulated_board_tool, free_port, start_tracker
from onnx import TensorProto, helper, numpy_helper

from dsconv_tvm.cli import main as cli
from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.driver.database import check_database
from dsconv_tvm.driver.tune import tune_model
from dsconv_tvm.remote.processes import kill_process_tree, popen_child

KEY = "rpi-emu-fleet"


def _two_conv_model(path):
    """Two DSConv layers of different shapes (two tasks: enough candidates for a few rounds)."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["out"])]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 12, 12])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 6, 6])],
                          [w("w1", 16, 8, 3, 3), w("w2", 16, 16, 3, 3)])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


class _Fleet:
    """A tracker of its own and two emulated boards under ``KEY``; :meth:`ensure` restarts a board
    that a test killed."""

    def __init__(self, tmp):
        self.tool = emulated_board_tool()
        self.board = self.tool.ensure_board()
        self.tmp = tmp
        self.tracker = start_tracker(tmp / "tracker.log")
        self.servers: list = [None, None]
        self.starts = 0

    def _start(self, i):
        self.starts += 1
        port = free_port()
        log = self.tmp / f"board{i}-{self.starts}.log"
        with open(log, "w") as fh:
            proc = self.tool.start_board_server(self.board, self.tracker.address, KEY, port=port,
                                                stdout=fh, stderr=subprocess.STDOUT)
        self.servers[i] = SimpleNamespace(proc=proc, port=port, log=log, address=f"127.0.0.1:{port}")

    def ensure(self):
        started = [i for i, s in enumerate(self.servers) if s is None or s.proc.poll() is not None]
        for i in started:                             # both boot at once (~30 s each under qemu)
            self._start(i)
        for i in started:
            self.tool.wait_registered(self.tracker.address, KEY, timeout=240, proc=self.servers[i].proc)
        t0 = time.time()                              # both listed under the key
        from dsconv_tvm.remote.fleet import fleet_boards
        from dsconv_tvm.remote.tracker import tracker_summary
        while len(fleet_boards(tracker_summary("127.0.0.1", self.tracker.port), KEY)) < 2:
            assert time.time() - t0 < 240, [s.log.read_text()[-500:] for s in self.servers]
            time.sleep(0.5)
        return self

    def sessions(self, i) -> int:
        """Sessions board ``i`` served, from its server's log (TVM's "connected from" lines)."""
        return self.servers[i].log.read_text(errors="replace").count("connected from")

    def all_free(self, timeout=60):
        """Every live board is free again at the tracker: the run closed all its sessions."""
        from dsconv_tvm.remote.tracker import board_free_count, tracker_summary

        live = sum(1 for s in self.servers if s is not None and s.proc.poll() is None)
        t0 = time.time()
        while board_free_count(tracker_summary("127.0.0.1", self.tracker.port), KEY) < live:
            assert time.time() - t0 < timeout, "a session was left open on a board"
            time.sleep(0.3)

    def kill(self, i):
        kill_process_tree(self.servers[i].proc.pid)
        self.servers[i].proc.wait(timeout=10)

    def stop(self):
        for s in self.servers:
            if s is not None:
                kill_process_tree(s.proc.pid)
        self.tracker.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = _Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.stop()


def _records(work):
    db = check_database(work)
    assert db.skipped == 0, "damaged lines in the database"
    return [json.loads(r)[1] for r in db.records]


def _run_secs(rec):
    return [float(x) for x in rec[1]]


CFG = DSConvConfig(block=8, first_layer="dsconv")


def test_tune_measures_on_every_board_of_the_key(fleet, tmp_path):
    fleet.ensure()
    before = [fleet.sessions(0), fleet.sessions(1)]
    model = _two_conv_model(tmp_path / "two.onnx")
    work = str(tmp_path / "db")
    res = tune_model(model, "rpi5", work, CFG, trials=8, trials_per_iter=4, tracker=fleet.tracker.address,
                     key=KEY, timeout=120, stream=io.StringIO())
    assert res.workers == 2
    boards = {s.address for s in fleet.servers}
    assert set(res.boards) == boards, res.boards
    for b in boards:                                  # both boards measured candidates
        assert res.boards[b]["measured"] >= 1, res.boards
    assert res.failures == 0, res.first_error
    # the boards' own logs agree: one session per candidate
    served = [fleet.sessions(i) - before[i] for i in range(2)]
    assert served == [res.boards[s.address]["measured"] for s in fleet.servers]
    # every candidate has a record, with a real time
    recs = _records(work)
    assert len(recs) == res.candidates == sum(c["measured"] for c in res.boards.values()) >= 4
    assert all(0 < t < 10 for r in recs for t in _run_secs(r))
    fleet.all_free()


def _cli_call(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_error_line(err, verb):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(f"dsconv-tvm {verb}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def fleet_libs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet_libs")
    model = _two_conv_model(d / "two.onnx")
    out = {}
    for target in ("rpi5", "x86"):
        out[target] = str(d / f"two_{target}.so")
        rc, _o, err = _cli_call("compile", model, "--target", target, "-o", out[target], "--no-check",
                                "--block", "8", "--first-layer", "dsconv")
        assert rc == 0, err
    return out


def test_bench_all_times_each_board_once(fleet, fleet_libs, tmp_path):
    fleet.ensure()
    before = [fleet.sessions(0), fleet.sessions(1)]
    js = tmp_path / "all.json"
    rc, out, err = _cli_call("bench", fleet_libs["rpi5"], "--tracker", fleet.tracker.address, "--key", KEY,
                             "--all", "--repeat", 3, "--number", 1, "--reference", fleet_libs["x86"],
                             "--json", js, "--timeout", 120)
    assert rc == 0, err
    print(out)
    data = json.loads(js.read_text())
    assert data["boards_total"] == data["boards_ok"] == 2 and data["complete"]
    boards = sorted(b["board"] for b in data["boards"])
    assert boards == sorted(s.address for s in fleet.servers)       # each board once
    for b in data["boards"]:
        assert b["complete"] and b["measured"] == 3 and b["median_ms"] > 0 and b["error"] is None
        assert b["check"]["ok"] and b["check"]["argmax_equal"] and b["emulated"]
    rows = [ln for ln in out.splitlines() if ln.split()[:1] and ln.split()[0] in boards]
    assert len(rows) == 2 and all(re.search(r"\b3/3\s+OK \(max \|diff\|", r) for r in rows), out
    assert "EMULATED" in out
    assert [fleet.sessions(i) - before[i] for i in range(2)] == [1, 1]   # the boards' own logs
    fleet.all_free()


def test_bench_all_with_a_board_killed_reports_it_and_keeps_the_others(fleet, fleet_libs, tmp_path):
    fleet.ensure()
    js, out, err = tmp_path / "all.json", tmp_path / "out.txt", tmp_path / "err.txt"
    bench = popen_child([sys.executable, "-m", "dsconv_tvm.cli", "bench", fleet_libs["rpi5"], "--tracker",
                         fleet.tracker.address, "--key", KEY, "--all", "--repeat", "4000", "--number", "1",
                         "--no-check", "--json", str(js), "--timeout", "60"],
                        stdout=open(out, "w"), stderr=open(err, "w"), stdin=subprocess.DEVNULL, cwd=str(REPO))
    try:
        t0 = time.time()
        while err.read_text().count(": measuring") < 2:
            assert bench.poll() is None and time.time() - t0 < 180, err.read_text()
            time.sleep(0.1)
        fleet.kill(1)                                  # one board dies while both measure
        rc = bench.wait(timeout=300)
    finally:
        if bench.poll() is None:
            kill_process_tree(bench.pid)
    e = err.read_text()
    assert rc == 2, e
    line = _one_error_line(e, "bench")
    assert "1 of 2 boards" in line and fleet.servers[1].address in line and "connection to the board was lost" in line
    data = json.loads(js.read_text())
    by_board = {b["board"]: b for b in data["boards"]}
    dead, alive = by_board[fleet.servers[1].address], by_board[fleet.servers[0].address]
    assert not dead["complete"] and dead["error"] and dead["measured"] < 4000
    assert alive["complete"] and alive["measured"] == 4000 and alive["error"] is None
    assert data["boards_ok"] == 1 and not data["complete"]
    rows = {ln.split()[0]: ln for ln in out.read_text().splitlines() if ln.startswith("127.0.0.1:")}
    assert "FAILED: " in rows[fleet.servers[1].address] and "4000/4000" in rows[fleet.servers[0].address]
    assert not [p for p in psutil.process_iter(["cmdline"])
                if f"--parent={bench.pid}" in (p.info.get("cmdline") or [])]   # no bench worker left
    fleet.all_free()


@pytest.mark.parametrize("argv, needle", [
    (["--all", "--tracker", "127.0.0.1:9"], "--all needs --tracker HOST:PORT and --key"),
    (["--all"], "--all needs --tracker HOST:PORT and --key"),
    (["--all", "--tracker", "127.0.0.1:9", "--key", "k", "--output", "o.npz"], "not with --all"),
])
def test_bench_all_usage_errors(fleet_libs, argv, needle):
    rc, _out, err = _cli_call("bench", fleet_libs["rpi5"], *argv)
    assert rc == 2 and needle in _one_error_line(err, "bench")


@pytest.mark.parametrize("argv, needle", [
    (["--key", "k"], "--key needs --tracker HOST:PORT"),
    (["--tracker", "127.0.0.1:9", "--key", "k", "--timeout", "0"], "--timeout 0: must be > 0"),
])
def test_tune_fleet_usage_errors(tmp_path, argv, needle):
    model = _two_conv_model(tmp_path / "two.onnx")
    rc, _out, err = _cli_call("tune", model, "--target", "rpi5", "--work-dir", tmp_path / "db", *argv)
    assert rc == 2 and needle in _one_error_line(err, "tune")
    assert not (tmp_path / "db").exists()


def test_a_key_without_boards_is_one_error_line(fleet, fleet_libs, tmp_path):
    t0 = time.time()
    rc, _out, err = _cli_call("bench", fleet_libs["rpi5"], "--tracker", fleet.tracker.address, "--key",
                              "nobody", "--all", "--timeout", 5)
    assert rc == 2 and "no board registered with key 'nobody'" in _one_error_line(err, "bench")
    model = _two_conv_model(tmp_path / "two.onnx")
    rc, _out, err = _cli_call("tune", model, "--target", "rpi5", "--work-dir", tmp_path / "db", "--tracker",
                              fleet.tracker.address, "--key", "nobody", "--timeout", 3)
    assert rc == 2 and "no registered board with key 'nobody'" in _one_error_line(err, "tune")
    assert time.time() - t0 < 60
    assert not (tmp_path / "db").exists()             # nothing written before the check


def test_a_board_killed_mid_run_costs_only_its_candidates(fleet, tmp_path):
    fleet.ensure()
    model = _two_conv_model(tmp_path / "two.onnx")
    work = str(tmp_path / "db")
    victim, survivor = fleet.servers[1], fleet.servers[0]
    killed = {}

    def counts():
        text = victim.log.read_text(errors="replace")
        return text.count("connected from"), text.count("finish serving")
    c0, f0 = counts()                                 # sessions of earlier tests

    def kill_when_busy():
        """Kill board 1 while it serves its second candidate of this run (connected, not finished)."""
        t0 = time.time()
        while time.time() - t0 < 300:
            c, f = counts()
            if c - c0 >= 2 and c - f > c0 - f0:
                killed["survivor_sessions"] = fleet.sessions(0)
                killed["victim_sessions"] = c
                killed["at"] = time.time()
                fleet.kill(1)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    t0 = time.time()
    res = tune_model(model, "rpi5", work, CFG, trials=12, trials_per_iter=4, tracker=fleet.tracker.address,
                     key=KEY, timeout=60, stream=io.StringIO())
    took = time.time() - t0
    killer.join(timeout=10)
    print(f"\nfleet kill: {res.boards}, {res.failures} failed ({res.first_error[-200:]!r}), {took:.0f} s")
    assert killed, "board 1 was never seen in a session"
    assert victim.proc.poll() is not None and not _tree_alive(victim.proc.pid)
    # the run completed; at most the dead board's in-flight candidate(s) failed, nothing else.  The
    # kill may land after the board sent its last reply but before its log says "finish serving":
    # then nothing fails; either way the dead board measured only what it had started before the kill
    started = killed["victim_sessions"] - c0
    assert res.failures <= 2, (res.failures, res.first_error)
    v = res.boards[victim.address]
    assert 1 <= v["measured"] <= started, (v, started)
    # (a candidate whose session to the dead board could not even be opened fails in MetaSchedule's
    # runner before a board is known: it counts in res.failures, not in any board's line)
    assert v["failed"] <= res.failures
    assert res.boards[survivor.address]["failed"] == 0
    assert fleet.sessions(0) > killed["survivor_sessions"]      # the survivor measured the rest
    recs = _records(work)
    assert len(recs) == res.candidates >= 8
    failed = [r for r in recs if min(_run_secs(r)) >= 1e9]     # MetaSchedule's mark of a failed run
    assert len(failed) == res.failures
    assert all(0 < t < 10 for r in recs if r not in failed for t in _run_secs(r))
    assert took < 600
    fleet.all_free()


def _tree_alive(pid):
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).is_running() and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def test_a_killed_tune_run_leaves_no_process_and_frees_the_boards(fleet, tmp_path):
    """SIGKILL of ``tune`` while both boards measure: its runner workers die with it (parent-death
    signal), the rest of its tree ends within a bound, and both boards are free again."""
    fleet.ensure()
    model = _two_conv_model(tmp_path / "two.onnx")
    c0 = [fleet.sessions(0), fleet.sessions(1)]
    err = tmp_path / "tune.err"
    tune = popen_child([sys.executable, "-m", "dsconv_tvm.cli", "tune", model, "--target", "rpi5", "--work-dir",
                        str(tmp_path / "db"), "--trials", "64", "--trials-per-iter", "8", "--block", "8",
                        "--first-layer", "dsconv", "--tracker", fleet.tracker.address, "--key", KEY,
                        "--timeout", "60"], stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                       stdin=subprocess.DEVNULL, cwd=str(REPO))
    tree = []
    try:
        t0 = time.time()
        while min(fleet.sessions(i) - c0[i] for i in range(2)) < 1:    # both boards measured
            assert tune.poll() is None and time.time() - t0 < 300, err.read_text()[-2000:]
            time.sleep(0.1)
        tree = psutil.Process(tune.pid).children(recursive=True)
        assert tree
        tune.kill()
        tune.wait(timeout=10)
        _gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    finally:
        if tune.poll() is None:
            kill_process_tree(tune.pid)
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    fleet.all_free()
