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
"""

from __future__ import annotations

import json
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import DSConvError, ModelError
from ..execute.compare import CHECK_RTOL, check_close
from ..execute.runner import bench_input, load_library, predict, time_main
from ..fileio import atomic_write
from ..host import host_machine, library_machine
from .processes import kill_process_tree, popen_child
from .tracker import RemoteError, explain, first_line, parse_address, registered_keys, request_board, tracker_summary


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


def _remote_input_shape(sess, vm, known):
    """The compiled input shape (``dsconv_input_shapes()[0]``) of a library loaded on a board.

    Over RPC the function returns a handle to the board's ``Array[Shape]``; it is read with the
    runtime's ``ffi.ArrayGetItem`` and ``rpc.testing.GetShapeSize/GetShapeElem`` (in
    libtvm_runtime).  ``known`` (from a host library) is the fallback."""
    try:
        shapes = vm["dsconv_input_shapes"]()
    except Exception as exc:  # noqa: BLE001
        raise ModelError("the library has no dsconv_input_shapes function (not built by "
                         f"dsconv-tvm): {first_line(exc)}") from None
    try:
        return [int(d) for d in shapes[0]]
    except TypeError:                          # a remote object handle
        pass
    try:
        first = sess.get_function("ffi.ArrayGetItem")(shapes, 0)
        size = int(sess.get_function("rpc.testing.GetShapeSize")(first))
        elem = sess.get_function("rpc.testing.GetShapeElem")
        return [int(elem(first, i)) for i in range(size)]
    except Exception as exc:  # noqa: BLE001
        if known:
            return list(known)
        raise ModelError(f"cannot read the library's input shape on the board ({first_line(exc)})"
                         ) from None


def _worker_session(params: dict, emit, state: dict) -> None:
    """The remote session of a bench worker; every object holding the session is local here, so
    that returning (or raising) and a ``gc.collect()`` close the session cleanly: TVM's RPC
    server stops serving for good when a client vanishes with a reset connection."""
    import tvm
    from tvm import relax, rpc

    x = ref = None
    if params["reference"]:
        # first, so that a reference this host cannot run fails before a board is taken

        state["stage"] = f"running {params['reference']} here (the reference)"
        emit("reference")
        ref_vm, ref_shape = load_library(params["reference"])
        x = bench_input(ref_shape, params["seed"])
        ref = ref_vm["main"](tvm.runtime.tensor(x)).numpy()
        del ref_vm
    emit("ready")
    state["stage"] = "requesting a board"
    th, tp = params["tracker"]
    deadline = max(params["deadline"], time.time() + 1.0)
    bhost, bport, matchkey = request_board(th, tp, params["key"], deadline)
    emit("granted", board=f"{bhost}:{bport}")
    state["stage"] = "connecting to the board"
    sess = rpc.connect(bhost, bport, matchkey, session_timeout=params["session_timeout"])
    emit("connected")
    state["stage"] = "uploading the library"
    name = os.path.basename(params["library"])
    sess.upload(params["library"], name)
    emit("uploaded")
    state["stage"] = "loading the library"
    dev = sess.cpu()
    vm = relax.VirtualMachine(sess.load_module(name), dev)
    shape = _remote_input_shape(sess, vm, None if x is None else list(x.shape))
    emit("loaded", shape=shape)
    if x is not None and list(x.shape) != list(shape):
        raise ModelError(f"--reference {params['reference']} has input shape {list(x.shape)} but "
                         f"the benchmarked library has {list(shape)}: not the same model")
    state["stage"] = "running the model"
    if x is None:
        x = bench_input(shape, params["seed"])
    rx = tvm.runtime.tensor(x, device=dev)
    y = vm["main"](rx).numpy()
    np.savez(params["output_file"], x=x, y=y, **({} if ref is None else {"ref": ref}))
    emit("output")
    state["stage"] = "measuring"
    vm.set_input("main", rx)
    done, chunk, target_s = 0, 1, params["chunk_seconds"]
    while done < params["repeat"]:
        k = min(chunk, params["repeat"] - done)
        t0 = time.perf_counter()
        timer = vm.time_evaluator("invoke_stateful", dev, number=params["number"], repeat=k)
        res = timer("main")
        wall = time.perf_counter() - t0
        done += k
        emit("times", ms=[t * 1e3 for t in res.results])
        # batch the next measurements so that one round trip takes about target_s seconds
        chunk = max(1, min(1000, int(k * target_s / max(wall, 1e-6))))
    state["stage"] = "closing the session"


def worker_main() -> int:
    """The child process of a remote bench: one JSON line of parameters on stdin, one JSON event per
    line on (a private copy of) stdout.  Exits at once when stdin closes (the parent is gone)."""
    import gc

    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                        # anything TVM prints goes to stderr, not into the events
    params = json.loads(sys.stdin.readline())

    def _watch_parent():
        sys.stdin.read()                 # EOF: the parent exited or was killed
        os._exit(3)
    threading.Thread(target=_watch_parent, daemon=True).start()

    def emit(ev, **kw):
        events.write(json.dumps({"ev": ev, **kw}) + "\n")
        events.flush()

    state = {"stage": "starting"}
    final = ("done", {})
    try:
        _worker_session(params, emit, state)
    except DSConvError as exc:
        final = ("error", {"stage": state["stage"], "message": str(exc), "user": True})
    except Exception as exc:  # noqa: BLE001
        final = ("error", {"stage": state["stage"], "message": first_line(exc), "user": False})
    gc.collect()                         # frees the remote objects: the session ends cleanly
    emit(final[0], **final[1])
    return 0 if final[0] == "done" else 1


class _Worker:
    """A running remote-bench child: events arrive on a queue (``None`` when its stdout closes)."""

    def __init__(self, params: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # its own process group, and SIGKILLed by the kernel if this process dies
        self.proc = popen_child(
            [sys.executable, "-c", "import sys; from dsconv_tvm.remote.bench import worker_main; "
             "sys.exit(worker_main())", "--dsconv-bench-worker", f"--parent={os.getpid()}"],
            sig=signal.SIGKILL, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, env=env)
        self.events: queue.Queue = queue.Queue()
        self.proc.stdin.write(json.dumps(params) + "\n")
        self.proc.stdin.flush()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass
        self.events.put(None)

    def next(self, timeout: float):
        try:
            return self.events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return "timeout"

    def stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            lines = [ln.strip() for ln in self.stderr.read().splitlines() if ln.strip()]
            return lines[-1][:300] if lines else ""
        except (OSError, ValueError):
            return ""

    def stop(self, grace: float = 0.0):
        """End the worker: let it exit by itself for ``grace`` seconds (after its final event),
        then close its stdin (it exits at once) and kill its process tree."""
        if grace > 0:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            kill_process_tree(self.proc.pid, timeout=3.0)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.stderr.close()


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

    res = BenchResult(library=os.path.abspath(library), mode="remote", repeat=repeat, number=number,
                      tracker=f"{th}:{tp}", key=key, emulated=emulated)
    tmpdir = tempfile.mkdtemp(prefix="dsconv-bench-")
    out_file = os.path.join(tmpdir, "output.npz")
    params = {"tracker": [th, tp], "key": key, "deadline": t_start + timeout,
              "session_timeout": session_timeout, "library": os.path.abspath(library),
              "repeat": repeat, "number": number, "seed": seed, "output_file": out_file,
              "reference": os.path.abspath(reference) if reference else None,
              "chunk_seconds": max(0.2, min(2.0, timeout / 5.0))}
    worker = _Worker(params)
    stage = "starting the benchmark process"
    # waiting for the child's `import tvm` is not the board's fault: allow it more time
    wait = timeout + 60.0
    final = False                        # the worker sent its last event and is exiting
    try:
        while True:
            ev = worker.next(wait)
            if ev == "timeout":
                raise RemoteError(f"board '{key}' gave no answer for {wait:.0f} s while {stage}; "
                                  f"gave up", res)
            if ev is None:
                code = worker.proc.wait(timeout=5)
                tail = worker.stderr_tail()
                if stage == "running the reference here" and code < 0:
                    try:
                        sig = signal.Signals(-code).name
                    except ValueError:
                        sig = f"signal {-code}"
                    hint = ("; pass --no-check to skip the output check" if auto_reference
                            else "; build the reference for this host (--target x86)")
                    raise RemoteError(f"{reference} cannot run on this host (killed by {sig}: "
                                      f"built for a CPU feature this host lacks?){hint}", res)
                raise RemoteError(f"the benchmark process died (exit code {code}) while {stage}"
                                  + (f": {tail}" if tail else ""), res)
            kind = ev["ev"]
            wait = timeout
            if kind == "reference":
                stage = "running the reference here"
            elif kind == "ready":
                stage = f"waiting for a free board '{key}'"
                wait = max(t_start + timeout - time.time(), 0.0) + 10.0
                log(f"requesting a board '{key}' from tracker {th}:{tp}")
            elif kind == "granted":
                res.board = ev["board"]
                stage = f"connecting to the board at {res.board}"
                log(f"got board {res.board}")
            elif kind == "connected":
                stage = "uploading the library"
                log(f"uploading {os.path.basename(library)} ({machine}, "
                    f"{os.path.getsize(library) / 1024:.0f} KB)")
            elif kind == "uploaded":
                stage = "loading the library on the board"
            elif kind == "loaded":
                res.input_shape = ev["shape"]
                stage = "running the model on the board"
            elif kind == "output":
                stage = "measuring"
                log(f"measuring: repeat {repeat} x number {number}"
                    + (" (emulated board: timings meaningless for speed)" if emulated else ""))
            elif kind == "times":
                res.times_ms.extend(ev["ms"])
                stage = f"measuring ({len(res.times_ms)} of {repeat} done)"
            elif kind == "done":
                res.complete = True
                final = True
                break
            elif kind == "error":
                final = True
                msg = explain(ev["message"])
                if ev.get("user"):
                    raise RemoteError(msg, res)
                if stage.startswith("measuring"):
                    where = f"during measurement {len(res.times_ms) + 1} of {repeat}"
                else:
                    where = f"while {stage}"
                raise RemoteError(f"board '{key}' failed {where}: {msg}", res)
    except RemoteError as exc:
        res.error = str(exc)
        exc.partial = res
        raise
    except BaseException:
        res.error = "interrupted"
        raise
    finally:
        worker.stop(grace=10.0 if final else 0.0)
        x = y = ref = None
        if os.path.exists(out_file):
            try:
                with np.load(out_file) as z:
                    x, y = z["x"], z["y"]
                    ref = z["ref"] if "ref" in z.files else None
            except Exception:  # noqa: BLE001
                x = y = ref = None
        shutil.rmtree(tmpdir, ignore_errors=True)
        res.board_io = None if x is None else (x, y)
        if output and x is not None:
            write_npz(output, x, y)

    if ref is not None:
        what = ("board output vs a run of the same library here" if auto_reference
                else f"board output vs host run of {reference}")
        res.check = {**check_close(y, ref), "what": what, "reference": os.path.abspath(reference)}
    elif x is not None:
        why = ("--no-check" if not check else
               f"{os.path.basename(library)} is an {machine} library; pass --reference HOST.so (the "
               f"same model compiled for this host) to check the board's output")
        res.check = {"skipped": why}
    return res


def write_npz(path: str, x: np.ndarray, y: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, input=x, output=y))
