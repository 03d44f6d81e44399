#!/usr/bin/env python3
"""Tuning on a fleet: candidates measured per minute with one and with two emulated boards.

For each board count N (``--boards 1 2``): a tracker of its own on 127.0.0.1, N emulated Raspberry
Pis (tools/emulated_board.py) under one key, then ``tune_model`` for ``rpi5`` with a fixed trial
count, a fixed seed and a fresh database; the run's tuning loop (search, host builds, measurements)
is timed and the candidates it measured are counted, per board too.  The load average of this
machine is recorded before and after each run.  Everything is stopped after each run.

The emulated boards run on this machine's cores, beside the host's builder and the search: the
ratio says how much of the tuning loop the boards' measurements are, not how a fleet of real
boards would scale.

Usage:  python tools/fleet_tuning.py [--model models/resnet20.onnx] [--trials 32] [--boards 1 2]
                                     [--out results/fleet_tuning.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emulated_board  # noqa: E402  (a script beside this one)

from dsconv_tvm.config import DSConvConfig  # noqa: E402
from dsconv_tvm.driver.tune import tune_model  # noqa: E402
from dsconv_tvm.fileio import atomic_write  # noqa: E402
from dsconv_tvm.remote.fleet import wait_for_boards  # noqa: E402
from dsconv_tvm.remote.processes import kill_process_tree, popen_child  # noqa: E402
from dsconv_tvm.remote.tracker import RemoteError, tracker_summary  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_fleet(n: int, key: str, logs: Path):
    """A tracker and ``n`` emulated boards under ``key``, all registered; (tracker address, procs)."""
    port = free_port()
    procs = [popen_child([sys.executable, "-m", "dsconv_tvm.cli", "tracker", "--port", str(port)],
                         stdout=open(logs / "tracker.log", "w"), stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, cwd=str(REPO))]
    address = f"127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            tracker_summary("127.0.0.1", port, timeout=2)
            break
        except RemoteError:
            if time.time() - t0 > 60:
                raise
            time.sleep(0.3)
    board = emulated_board.ensure_board()
    for i in range(n):
        procs.append(emulated_board.start_board_server(
            board, address, key, port=free_port(), stdout=open(logs / f"board{i}.log", "w"),
            stderr=subprocess.STDOUT))
    t0 = time.time()
    while wait_for_boards(address, key, timeout=300)[3] < n:
        if time.time() - t0 > 300:
            raise RuntimeError(f"only some of the {n} boards registered")
        time.sleep(1)
    return address, procs


def one_run(model: str, n: int, trials: int, per_iter: int, seed: int) -> dict:
    key = f"rpi-emu-fleet{n}"
    logs = Path(tempfile.mkdtemp(prefix="fleet-logs-"))
    work = tempfile.mkdtemp(prefix="fleet-db-")
    procs = []
    try:
        address, procs = start_fleet(n, key, logs)
        time.sleep(5)                                      # the boards' start-up load settles
        load_before = os.getloadavg()
        t0 = time.time()
        res = tune_model(model, "rpi5", work, DSConvConfig(), trials=trials, trials_per_iter=per_iter,
                         tracker=address, key=key, timeout=180, seed=seed, stream=io.StringIO(),
                         log=lambda m: print(f"  {m}", flush=True))
        wall = time.time() - t0
        load_after = os.getloadavg()
        sessions = measuring_seconds(os.path.join(work, "logs", "boards.jsonl"))
    finally:
        for p in reversed(procs):
            kill_process_tree(p.pid)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
    per_min = res.candidates / (res.seconds / 60.0) if res.seconds else 0.0
    busy = sum(c["busy_s"] for c in res.boards.values())
    print(f"{n} board(s): {res.candidates} candidates in {res.seconds:.0f} s of tuning = {per_min:.1f}/min; "
          f"{res.failures} failed; boards in sessions {busy:.0f} s, some board busy {sessions:.0f} s of the loop; "
          f"per board {res.boards}; load {load_before} -> {load_after}", flush=True)
    return {"boards": n, "workers": res.workers, "trials": trials, "trials_per_iter": per_iter,
            "seed": seed, "tasks": len(res.tasks), "candidates": res.candidates, "failures": res.failures,
            "tuning_seconds": round(res.seconds, 1), "run_seconds_incl_task_extraction": round(wall, 1),
            "candidates_per_minute": round(per_min, 2), "per_board": res.boards,
            # the boards' sessions (request, upload, load, time, clean up) as a share of the loop
            "board_busy_share": round(busy / (n * res.seconds), 3) if res.seconds else None,
            "board_session_seconds": round(busy, 1),
            # wall seconds in which at least one board was in a session: what parallel boards shorten
            "measuring_wall_seconds": round(sessions, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after]}


def measuring_seconds(journal: str) -> float:
    """Seconds of the union of the candidates' board sessions (journal lines: end ``t``, length
    ``seconds``)."""
    spans = []
    with open(journal) as f:
        for line in f:
            rec = json.loads(line)
            spans.append((rec["t"] - rec["seconds"], rec["t"]))
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "models" / "resnet20.onnx"))
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--trials-per-iter", type=int, default=8)
    p.add_argument("--boards", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2,
                   help="run the board counts this many times, in reverse order every other round")
    p.add_argument("--out", default=str(REPO / "results" / "fleet_tuning.json"))
    args = p.parse_args(argv)
    runs = []
    for k in range(args.rounds):
        for n in (args.boards if k % 2 == 0 else args.boards[::-1]):
            runs.append({"round": k + 1, **one_run(args.model, n, args.trials, args.trials_per_iter, args.seed)})
    summary = {}
    for n in args.boards:
        rates = sorted(r["candidates_per_minute"] for r in runs if r["boards"] == n)
        summary[str(n)] = {"candidates_per_minute": rates, "median": round(statistics.median(rates), 2)}
    base = summary.get("1", {}).get("median")
    for entry in summary.values():
        entry["ratio_to_one_board"] = round(entry["median"] / base, 2) if base else None
    data = {"what": "MetaSchedule candidates measured per minute of the tuning loop, rpi5 target, on "
                    "emulated boards (qemu-aarch64) under one key",
            "model": os.path.relpath(args.model, REPO) if args.model.startswith(str(REPO)) else
            os.path.basename(args.model),
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": _cpu_name()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "note": "the emulated boards, the host's builder and the search share the host's cores: "
                    "the ratio is not the scaling of real boards", "summary": summary, "runs": runs}
    text = json.dumps(data, indent=1).encode()
    atomic_write(args.out, lambda f: f.write(text))
    print(f"wrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
