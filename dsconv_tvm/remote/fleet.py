"""A fleet: every board registered at a tracker under one key, used at once.

Tuning measures MetaSchedule's candidates on all free boards of the key in parallel (TVM's
``RPCRunner`` with one worker process per board; each candidate asks the tracker for a free board,
so a board that dies only costs the candidate it was measuring, and the others go to the boards
left).  Every finished candidate appends one line ``{"board": "HOST:PORT", "ok": bool, "t": end,
"seconds": session}`` to a journal file (``tune``: ``WORK_DIR/logs/boards.jsonl``), which gives the
per-board counts.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time

from .processes import set_parent_death_signal
from .tracker import (
    RemoteError,
    SessionRef,
    board_free_count,
    parse_address,
    registered_keys,
    request_board,
    tracker_summary,
)


def fleet_boards(summary: dict, key: str) -> list[str]:
    """The addresses ("HOST:PORT") of the boards registered with ``key`` in a tracker summary."""
    out = []
    for info in summary.get("server_info", []):
        if str(info.get("key", "")) == "server:" + key:
            addr = list(info.get("addr") or [])
            out.append(":".join(str(a) for a in addr) if addr else "?")
    return sorted(out)


def wait_for_boards(tracker: str, key: str, timeout: float, settle: float = 5.0) -> tuple[str, int, int, int]:
    """Wait (up to ``timeout`` s) until a board with ``key`` is free at ``tracker``, then up to
    ``settle`` s more for every registered one to be free; ``(host, port, free, registered)``.
    A :class:`RemoteError` (one line) for an unreachable tracker or no free board in time."""
    host, port = parse_address(tracker, "--tracker")
    t0 = time.time()
    first_free = None
    keys: dict = {}
    while True:
        summary = tracker_summary(host, port, timeout=min(10.0, max(timeout, 1.0)))
        keys = registered_keys(summary)
        free, registered = board_free_count(summary, key), keys.get(key, 0)
        now = time.time()
        if free and first_free is None:
            first_free = now
        if free and (free >= registered or now - first_free >= settle):
            return host, port, free, registered
        if now - t0 > timeout and not free:
            listed = ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"
            what = "registered" if not registered else "free"
            raise RemoteError(f"no {what} board with key '{key}' at tracker {tracker} after "
                              f"{timeout:g} s (registered keys: {listed})")
        time.sleep(0.5)


class BoardSession(SessionRef):
    """An RPC session on one board of the fleet: ``board`` is its address, ``measured`` is set
    once its candidate has been timed."""

    def __init__(self, sess, board: str, started: float):
        super().__init__(sess)
        self.board, self.started = board, started
        self.measured = False


def fleet_create_session(rpc_config):
    """MetaSchedule's ``f_create_session``: a free board with the key, waiting at most the config's
    session timeout (TVM's default waits without limit)."""
    from tvm import rpc

    wait = float(rpc_config.session_timeout_sec or 60)
    t0 = time.time()
    bhost, bport, matchkey = request_board(rpc_config.tracker_host, int(rpc_config.tracker_port),
                                           rpc_config.tracker_key, time.time() + wait)
    sess = rpc.connect(bhost, bport, matchkey, session_timeout=rpc_config.session_timeout_sec or 0)
    return BoardSession(sess, f"{bhost}:{bport}", t0)


def fleet_run_evaluator(session, rt_mod, device, evaluator_config, repeated_args):
    """MetaSchedule's ``f_run_evaluator`` (TVM's), marking the session's candidate as measured."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    costs = run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)
    session.measured = True
    return costs


def fleet_cleanup(session, remote_path, journal: str) -> None:
    """MetaSchedule's ``f_cleanup``: remove the candidate from the board (if it still answers),
    append the candidate's line to the journal, drop the session."""
    if session is None:
        return
    if remote_path is not None:
        try:
            for path in (remote_path, remote_path + ".so", ""):
                session.remove(path)
        except Exception:  # noqa: BLE001  (a board that died: nothing to remove)
            pass
    now = time.time()
    line = json.dumps({"board": session.board, "ok": bool(session.measured), "t": now,
                       "seconds": round(now - session.started, 3)})
    with open(journal, "a") as f:           # one short write per line: whole lines, any order
        f.write(line + "\n")
    session.close()


def alloc_arguments_from_host(session, device, args_info, alloc_repeat):
    """MetaSchedule RPC argument allocation that fills the board's tensors with random data made on
    the host (the default calls ``tvm.contrib.random`` on the board, which a runtime-only TVM lacks)."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(arg):
        dt = np.dtype(str(arg.dtype))
        shape = tuple(int(d) for d in arg.shape)
        if dt.kind == "f":
            data = rng.standard_normal(shape).astype(dt)
        else:
            info = np.iinfo(dt)
            data = rng.integers(info.min, info.max, shape, endpoint=True, dtype=dt)
        arg.copyfrom(data)

    del session
    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def fleet_runner(host: str, port: int, key: str, workers: int, timeout: float, evaluator, journal: str):
    """TVM's ``RPCRunner`` measuring on ``workers`` boards with ``key`` at once.  Each candidate
    may take at most about twice ``timeout`` (the wait for a free board plus the session); one that
    takes longer (a board that hangs) is recorded as failed and its worker process is killed."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.support.popen_pool import PopenPoolExecutor

    runner = ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_timeout_sec=int(timeout)),
        evaluator_config=evaluator, max_workers=workers,
        f_create_session=fleet_create_session,
        f_alloc_argument=alloc_arguments_from_host, f_run_evaluator=fleet_run_evaluator,
        f_cleanup=functools.partial(fleet_cleanup, journal=journal))
    # TVM's pool waits for a candidate without a limit: give each one a bound; and its workers (each
    # holding a board's session) die with this process, even when it is SIGKILLed
    runner.pool.shutdown()
    runner.pool = PopenPoolExecutor(
        max_workers=workers, timeout=2 * timeout + 30,
        initializer=functools.partial(set_parent_death_signal, signal.SIGKILL, os.getpid()))
    return runner


def journal_counts(journal: str) -> dict[str, dict]:
    """Per board: ``{"measured": n, "failed": m, "busy_s": s}`` from a fleet journal (damaged lines
    skipped); ``busy_s``: the seconds its sessions lasted (from the board request to the cleanup)."""
    counts: dict[str, dict] = {}
    if not os.path.exists(journal):
        return counts
    with open(journal) as f:
        for line in f:
            try:
                rec = json.loads(line)
                board, ok, busy = str(rec["board"]), bool(rec["ok"]), float(rec.get("seconds", 0.0))
            except (ValueError, KeyError, TypeError):
                continue
            c = counts.setdefault(board, {"measured": 0, "failed": 0, "busy_s": 0.0})
            c["measured" if ok else "failed"] += 1
            c["busy_s"] = round(c["busy_s"] + busy, 3)
    return counts
