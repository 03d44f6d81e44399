"""``bench``: the latency of a compiled library here, or on a board over TVM's RPC tracker.

Median / min / max milliseconds of one inference (``main``).  Without a tracker the library runs
here (a host ``.so``).  With one, a board with the key is requested from the tracker, the library is
uploaded and loaded there, and TVM's ``time_evaluator`` times it *on the board* (no network time in
the numbers).  The board's output for a random input is checked against a run on this host of the
same model: ``reference`` (the model compiled for this host), or the library itself when it is a
host library.  Agreement: :func:`dsconv_tvm.execute.compare.check_close`.

The remote session runs in a child process that reports every step and every measurement to the
supervisor as it happens; the supervisor kills it when the board stops answering (``timeout``
seconds without progress), so a board that dies or hangs gives one clear error in bounded time, the
measurements already made are kept (``RemoteError.partial``), and no process is left behind.
:func:`bench_all` runs one such child per board registered with the key, all at once, and keeps
each board's result (and error) apart.
"""

from __future__ import annotations

import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError
from ..execute.compare import CHECK_RTOL, check_close
from ..execute.runner import bench_input, load_library, predict, time_main
from ..fileio import atomic_write
from ..host import host_machine, library_machine
from .bench_worker import Worker
from .tracker import RemoteError, explain, parse_address, registered_keys, tracker_summary


@dataclass
class BenchResult:
    library: str
    mode: str                                   # "local" or "remote"
    repeat: int
    number: int
    tracker: str | None = None
    key: str | None = None
    board: str | None = None                    # the board's address as given by the tracker
    emulated: bool = False
    input_shape: list | None = None
    times_ms: list = field(default_factory=list)
    complete: bool = False
    error: str | None = None
    check: dict | None = None
    board_io: tuple | None = field(default=None, repr=False)   # (input, board output), not in JSON

    def stats(self) -> dict:
        if not self.times_ms:
            return {"median_ms": None, "min_ms": None, "max_ms": None}
        return {"median_ms": statistics.median(self.times_ms), "min_ms": min(self.times_ms),
                "max_ms": max(self.times_ms)}

    def to_json(self) -> dict:
        d = {"library": self.library, "mode": self.mode, "tracker": self.tracker, "key": self.key,
             "board": self.board, "emulated": self.emulated,
             "timings_meaningful": not self.emulated, "input_shape": self.input_shape,
             "repeat": self.repeat, "number": self.number, "measured": len(self.times_ms),
             **self.stats(), "times_ms": list(self.times_ms), "complete": self.complete,
             "error": self.error, "check": self.check}
        return d

    def lines(self) -> list[str]:
        out = []
        if self.mode == "local":
            out.append(f"board     this host ({platform.machine()}, local run)")
        else:
            note = "  [EMULATED board: timings are meaningless for speed]" if self.emulated else ""
            out.append(f"board     '{self.key}' at {self.board or '?'} via tracker {self.tracker}{note}")
        shape = "?" if self.input_shape is None else str(list(self.input_shape))
        out.append(f"library   {self.library} (input {shape})")
        s = self.stats()
        n = len(self.times_ms)
        if n:
            what = (f"{self.repeat} measurements" if self.complete
                    else f"INCOMPLETE: {n} of {self.repeat} measurements")
            line = (f"latency   median {s['median_ms']:.3f} ms  min {s['min_ms']:.3f} ms  "
                    f"max {s['max_ms']:.3f} ms  ({what}, each the mean of {self.number} calls)")
            if self.emulated:
                line += "  [emulated: meaningless for speed]"
            out.append(line)
        else:
            out.append("latency   no measurement made")
        if self.check is not None:
            c = self.check
            if c.get("skipped"):
                out.append(f"check     skipped: {c['skipped']}")
            else:
                verdict = "OK" if c["ok"] else "MISMATCH"
                out.append(f"check     {c['what']}: max |diff| {c['max_abs_diff']:.3g} "
                           f"(tolerance {c['tolerance']:.3g} = {CHECK_RTOL:g} * max|out|), argmax "
                           f"{'same' if c['argmax_equal'] else 'DIFFERENT'}: {verdict}")
        return out


def check_against(reference: str, what: str, x: np.ndarray, y: np.ndarray, shape) -> dict:
    machine = library_machine(reference)
    if machine != host_machine():
        raise ModelError(f"--reference {reference} is an {machine} library; it must be built for "
                         f"this host ({host_machine()}), e.g. with --target x86")
    _vm, ref_shape = load_library(reference)
    if shape is not None and list(ref_shape) != list(shape):
        raise ModelError(f"--reference {reference} has input shape {ref_shape} but the benchmarked "
                         f"library has {list(shape)}: not the same model")
    ref = predict(reference, x)
    c = check_close(y, ref)
    c.update({"what": what, "reference": os.path.abspath(reference)})
    return c


def bench_local(library: str, repeat: int = 30, number: int = 5, seed: int = 0,
                reference: str | None = None) -> BenchResult:
    """Time a host ``.so`` here (TVM's time_evaluator, after a warm-up call)."""
    machine = library_machine(library)
    if machine != host_machine():
        raise ModelError(f"{library} is an {machine} library: benchmark it on a board with "
                         f"--tracker HOST:PORT --key KEY")
    vm, shape = load_library(library)
    res = BenchResult(library=os.path.abspath(library), mode="local", repeat=repeat, number=number,
                      input_shape=list(shape))
    x = bench_input(shape, seed)
    y, res.times_ms = time_main(vm, x, repeat, number)
    res.complete = True
    if reference:
        res.check = check_against(reference, f"output vs host run of {reference}", x, y, shape)
    return res


class BoardRun:
    """The supervisor's side of one remote-bench worker (:class:`.bench_worker.Worker`): the result
    so far, the stage the worker is in, and the time by which its next event must come."""

    def __init__(self, params: dict, res: BenchResult, events: queue.Queue, tag: int, timeout: float,
                 log, label: str = ""):
        self.params, self.res, self.timeout, self.log, self.label = params, res, timeout, log, label
        self.key = params["key"]
        self.worker = Worker(params, events, tag)
        self.stage = "starting the benchmark process"
        self.wait = timeout + 60.0       # the child's `import tvm` is not the board's fault
        self.deadline = time.time() + self.wait
        self.final = False               # the worker sent its last event and is exiting
        self.held = False                # connected, waiting for the other boards (bench --all)
        self.error: RemoteError | None = None
        self.ref = None

    @property
    def active(self) -> bool:
        return not self.final and self.error is None

    def fail(self, exc: RemoteError) -> None:
        self.error, self.res.error, exc.partial = exc, str(exc), self.res

    def expire(self) -> None:
        self.fail(RemoteError(f"board '{self.key}' gave no answer for {self.wait:.0f} s while "
                              f"{self.stage}; gave up", self.res))

    def release(self) -> None:
        """Every board is held: this one goes on."""
        self.held = False
        self.deadline = time.time() + self.wait
        self.worker.go()

    def handle(self, ev) -> None:
        """One event of the worker (``None``: its output closed); :class:`RemoteError` on a failure."""
        res, key, p = self.res, self.key, self.params
        if ev is None:
            try:
                code = self.worker.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:     # output closed, process not gone: killed in close()
                code = None
            tail = self.worker.stderr_tail()
            if self.stage == "running the reference here" and code is not None and code < 0:
                try:
                    sig = signal.Signals(-code).name
                except ValueError:
                    sig = f"signal {-code}"
                hint = ("; pass --no-check to skip the output check" if p["auto_reference"]
                        else "; build the reference for this host (--target x86)")
                raise RemoteError(f"{p['reference_name']} cannot run on this host (killed by {sig}: "
                                  f"built for a CPU feature this host lacks?){hint}", res)
            raise RemoteError(f"the benchmark process died (exit code {code}) while {self.stage}"
                              + (f": {tail}" if tail else ""), res)
        kind = ev["ev"]
        self.wait = self.timeout
        if kind == "reference":
            self.stage = "running the reference here"
        elif kind == "ready":
            self.stage = f"waiting for a free board '{key}'"
            self.wait = max(p["deadline"] - time.time(), 0.0) + 10.0
            self.log(f"{self.label}requesting a board '{key}' from tracker {res.tracker}")
        elif kind == "granted":
            res.board = ev["board"]
            self.stage = f"connecting to the board at {res.board}"
            self.log(f"{self.label}got board {res.board}")
        elif kind == "connected":
            self.stage = "uploading the library"
            self.held = bool(p.get("hold"))
            self.log(f"{self.label}uploading {os.path.basename(p['library'])} ({p['machine']}, "
                     f"{os.path.getsize(p['library']) / 1024:.0f} KB)")
        elif kind == "uploaded":
            self.stage = "loading the library on the board"
        elif kind == "loaded":
            res.input_shape = ev["shape"]
            self.stage = "running the model on the board"
        elif kind == "output":
            self.stage = "measuring"
            self.log(f"{self.label}measuring: repeat {res.repeat} x number {res.number}"
                     + (" (emulated board: timings meaningless for speed)" if res.emulated else ""))
        elif kind == "times":
            res.times_ms.extend(ev["ms"])
            self.stage = f"measuring ({len(res.times_ms)} of {res.repeat} done)"
        elif kind == "done":
            res.complete = self.final = True
        elif kind == "error":
            self.final = True
            msg = explain(ev["message"])
            if ev.get("user"):
                raise RemoteError(msg, res)
            if self.stage.startswith("measuring"):
                where = f"during measurement {len(res.times_ms) + 1} of {res.repeat}"
            else:
                where = f"while {self.stage}"
            raise RemoteError(f"board '{key}' failed {where}: {msg}", res)
        self.deadline = float("inf") if self.held else time.time() + self.wait

    def close(self, output: str | None = None) -> None:
        """Stop the worker, keep the board's input and output (``output``: also as a .npz)."""
        self.worker.stop(grace=10.0 if self.final else 0.0)
        x = y = None
        out_file = self.params["output_file"]
        if os.path.exists(out_file):
            try:
                with np.load(out_file) as z:
                    x, y = z["x"], z["y"]
                    self.ref = z["ref"] if "ref" in z.files else None
            except Exception:  # noqa: BLE001
                x = y = self.ref = None
        shutil.rmtree(os.path.dirname(out_file), ignore_errors=True)
        self.res.board_io = None if x is None else (x, y)
        if output and x is not None:
            write_npz(output, x, y)

    def check(self) -> None:
        """The board's output against the reference run here (or why not)."""
        p, res = self.params, self.res
        if self.ref is not None and res.board_io is not None:
            what = ("board output vs a run of the same library here" if p["auto_reference"]
                    else f"board output vs host run of {p['reference_name']}")
            res.check = {**check_close(res.board_io[1], self.ref), "what": what,
                         "reference": p["reference"]}
        elif res.board_io is not None:
            why = ("--no-check" if not p["check"] else
                   f"{os.path.basename(p['library'])} is an {p['machine']} library; pass --reference "
                   f"HOST.so (the same model compiled for this host) to check the board's output")
            res.check = {"skipped": why}


def supervise(runs: list[BoardRun], events: queue.Queue) -> None:
    """Hand the workers' events to their runs until every run is done or failed; a held run goes on
    once every run is held or ended."""
    while True:
        active = [r for r in runs if r.active]
        if not active:
            return
        if all(r.held for r in active):
            for r in active:
                r.release()
        now = time.time()
        for r in active:
            if r.deadline <= now:
                r.expire()
        active = [r for r in active if r.active]
        if not active:
            return
        try:
            tag, ev = events.get(timeout=max(min(r.deadline for r in active) - now, 0.0))
        except queue.Empty:
            continue
        run = runs[tag]
        if run.active:
            try:
                run.handle(ev)
            except RemoteError as exc:
                run.fail(exc)


def _bench_boards(library: str, tracker: str, key: str, boards: int | None, repeat: int, number: int,
                  timeout: float, session_timeout: float, emulated: bool | None, seed: int,
                  reference: str | None, output: str | None, check: bool, log) -> list[BoardRun]:
    """``boards`` workers (None: one per board registered with ``key``), run to the end."""
    log = log or (lambda _m: None)
    t_start = time.time()
    th, tp = parse_address(tracker, "--tracker")
    machine = library_machine(library)
    if emulated is None:
        emulated = "emu" in key.lower()
    auto_reference = False
    if not check:
        reference = None
    if reference:
        ref_machine = library_machine(reference)
        if ref_machine != host_machine():
            raise ModelError(f"--reference {reference} is an {ref_machine} library; it must be built "
                             f"for this host ({host_machine()}), e.g. with --target x86")
    elif check and machine == host_machine():
        reference, auto_reference = library, True

    # fast checks without TVM: the tracker answers, and a board with this key is registered
    summary = tracker_summary(th, tp, timeout=min(timeout, 10.0))
    keys = registered_keys(summary)
    if key not in keys:
        known = ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"
        raise RemoteError(f"no board registered with key '{key}' at tracker {th}:{tp} "
                          f"(registered keys: {known})")
    n = boards or keys[key]
    events: queue.Queue = queue.Queue()
    runs = []
    try:
        for i in range(n):
            res = BenchResult(library=os.path.abspath(library), mode="remote", repeat=repeat,
                              number=number, tracker=f"{th}:{tp}", key=key, emulated=emulated)
            params = {"tracker": [th, tp], "key": key, "deadline": t_start + timeout,
                      "session_timeout": session_timeout, "library": os.path.abspath(library),
                      "repeat": repeat, "number": number, "seed": seed,
                      "output_file": os.path.join(tempfile.mkdtemp(prefix="dsconv-bench-"), "output.npz"),
                      "reference": os.path.abspath(reference) if reference else None,
                      "reference_name": reference, "auto_reference": auto_reference, "check": check, "machine": machine,
                      "chunk_seconds": max(0.2, min(2.0, timeout / 5.0)),
                      "hold": timeout + 30.0 if n > 1 else 0}
            runs.append(BoardRun(params, res, events, i, timeout, log,
                                 f"board {i + 1} of {n}: " if n > 1 else ""))
        supervise(runs, events)
    except BaseException:
        for r in runs:
            r.res.error = r.res.error or "interrupted"
        raise
    finally:
        for r in runs:
            r.close(output)
    for r in runs:
        if r.error is None:
            r.check()
    return runs


def bench_remote(library: str, tracker: str, key: str, repeat: int = 30, number: int = 5,
                 timeout: float = 60.0, session_timeout: float = 0.0, emulated: bool | None = None,
                 seed: int = 0, reference: str | None = None, output: str | None = None,
                 check: bool = True, log=None) -> BenchResult:
    """Time ``library`` on a board with ``key`` from ``tracker`` ("HOST:PORT").

    ``timeout``: seconds to wait for the tracker, for a free board, and for each step on the
    board (upload, load, run, each batch of measurements).  ``session_timeout``: the board ends
    the session after that many seconds (0: no limit).  The board's output is compared with
    ``reference`` (a host library of the same model; default: ``library`` itself when it is a host
    library, unless ``check`` is False).  Raises :class:`RemoteError` (with the measurements made
    so far in ``.partial``) when the tracker or the board fails."""
    run = _bench_boards(library, tracker, key, 1, repeat, number, timeout, session_timeout, emulated,
                        seed, reference, output, check, log)[0]
    if run.error is not None:
        raise run.error
    return run.res


def bench_all(library: str, tracker: str, key: str, repeat: int = 30, number: int = 5,
              timeout: float = 60.0, session_timeout: float = 0.0, emulated: bool | None = None,
              seed: int = 0, reference: str | None = None, check: bool = True,
              log=None) -> list[BenchResult]:
    """:func:`bench_remote` on every board registered with ``key``, all at once (each worker keeps
    its board until every board is held, so that each board is timed once).  One result per board,
    sorted by address; a board that failed has ``error`` set (and the measurements made before)."""
    runs = _bench_boards(library, tracker, key, None, repeat, number, timeout, session_timeout,
                         emulated, seed, reference, None, check, log)
    return sorted((r.res for r in runs), key=lambda r: (r.board is None, r.board or ""))


def write_npz(path: str, x: np.ndarray, y: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, input=x, output=y))


def fleet_json(results: list[BenchResult]) -> dict:
    """``bench --all`` as JSON: the per-board results and whether every board completed and agreed."""
    ok = [r.complete and r.error is None and not (r.check and r.check.get("ok") is False) for r in results]
    first = results[0] if results else None
    return {"mode": "fleet", "library": first and first.library, "tracker": first and first.tracker,
            "key": first and first.key, "boards_total": len(results), "boards_ok": sum(ok),
            "complete": all(ok), "boards": [r.to_json() for r in results]}


def fleet_lines(results: list[BenchResult]) -> list[str]:
    """``bench --all`` as a table: one row per board."""
    first = results[0]
    note = "  [EMULATED boards: timings are meaningless for speed]" if first.emulated else ""
    shape = next((r.input_shape for r in results if r.input_shape is not None), None)
    out = [f"boards    {len(results)} with key '{first.key}' via tracker {first.tracker}{note}",
           f"library   {first.library} (input {'?' if shape is None else list(shape)})",
           f"{'board':<22} {'median ms':>10} {'min ms':>10} {'max ms':>10} {'measured':>9}  check"]
    for r in results:
        s = r.stats()
        cols = [f"{s[k]:>10.3f}" if s[k] is not None else f"{'-':>10}" for k in ("median_ms", "min_ms", "max_ms")]
        c = r.check or {}
        if r.error:
            verdict = f"FAILED: {r.error}"
        elif c.get("skipped"):
            verdict = "skipped"
        elif c:
            verdict = f"{'OK' if c['ok'] else 'MISMATCH'} (max |diff| {c['max_abs_diff']:.3g}, argmax " \
                      f"{'same' if c['argmax_equal'] else 'DIFFERENT'})"
        else:
            verdict = "-"
        out.append(f"{r.board or '?':<22} {' '.join(cols)} {f'{len(r.times_ms)}/{r.repeat}':>9}  {verdict}")
    return out
