"""Boards: benchmarking compiled libraries on a board over TVM's RPC tracker, or on this host.

Three verbs of the command line live here:

``dsconv-tvm tracker [--host 127.0.0.1] [--port 9190]``
    TVM's RPC tracker (``tvm.rpc.tracker.Tracker``, what ``python -m tvm.exec.rpc_tracker`` runs):
    the place where boards register under a key ("rpi5", "rpi4", ...) and where ``bench`` asks for
    a free one.

``dsconv-tvm board-server --tracker HOST:PORT --key KEY [--host 127.0.0.1] [--port 9090]``
    TVM's RPC server (``tvm.rpc.Server``, what ``python -m tvm.exec.rpc_server`` runs), registered
    at the tracker under KEY.  Run it on the board (a Raspberry Pi with ``pip install
    apache-tvm==0.27.0.post1``).  **An RPC server runs whatever code is uploaded to it**: anyone who
    can reach its port can run anything as the user running it.  Both verbs bind 127.0.0.1 unless
    ``--host`` says otherwise; use ``--host 0.0.0.0`` only on a trusted network.

``dsconv-tvm bench LIB.so [--tracker HOST:PORT --key KEY] [--repeat N] [--number M] ...``
    Median / min / max milliseconds of one inference (``main``).  Without ``--tracker`` the library
    runs here (a host ``.so``).  With it, a board with KEY is requested from the tracker, the
    library is uploaded and loaded there, and TVM's ``time_evaluator`` times it *on the board* (no
    network time in the numbers).  The board's output for a random input is checked against a run
    on this host of the same model: ``--reference HOST.so`` (the model compiled for this host), or
    LIB itself when it is a host library.  Agreement means max |diff| <= 1e-4 * max |reference| and
    the same argmax per sample.

The remote session runs in a child process that reports every step and every measurement to
``bench`` as it happens; ``bench`` kills it when the board stops answering (``--timeout`` seconds
without progress), so a board that dies or hangs gives one clear error line (exit 2) in bounded time,
the measurements already made are printed and written (``--json``), and no process is left behind.

Importing this module is cheap (no TVM); TVM is imported by the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import DSConvError, ModelError
from .evaluate import bench_input
from .outputs import atomic_write, check_output_path
from .targets import host_machine, library_machine

__all__ = ["RemoteError", "BenchResult", "add_parsers", "bench_local", "bench_remote",
           "compare_outputs", "parse_address", "tracker_summary", "registered_keys",
           "kill_process_tree", "SERVER_WARNING"]

#: relative tolerance of the board-vs-host check, as a fraction of max |reference output|
CHECK_RTOL = 1e-4

SERVER_WARNING = ("WARNING: a TVM RPC server runs any code uploaded to it: anyone who can reach "
                  "{addr} can run anything on this machine as user {user}. Keep it on 127.0.0.1 or a "
                  "trusted network (see --host).")
TRACKER_WARNING = ("note: anyone who can reach the tracker at {addr} can list and use the boards "
                   "registered there (which run any code uploaded to them).")


class RemoteError(DSConvError):
    """The tracker or a board failed (unreachable, no board with the key, board died or hung).

    ``partial`` holds the :class:`BenchResult` measured before the failure, if any."""

    def __init__(self, message: str, partial: "BenchResult | None" = None):
        super().__init__(message)
        self.partial = partial


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; a :class:`RemoteError` naming ``what`` otherwise."""
    host, sep, port = (text or "").strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteError(f"{what} '{text}' is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def kill_process_tree(pid: int, timeout: float = 5.0, include_parent: bool = True) -> None:
    """Terminate ``pid`` and all its descendants (TVM's RPC server forks workers that outlive a
    plain terminate of their parent); SIGKILL what is still alive after ``timeout`` seconds."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    if include_parent:
        procs.append(parent)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def _first_line(exc: BaseException | str) -> str:
    """A one-line summary of a (TVM) exception message: its last non-empty meaningful line."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else "unknown error"
    # TVM errors end with the message after a traceback
    for ln in reversed(lines):
        if not ln.startswith(("File ", "at ", "Traceback", "^", "~")):
            return ln[:400]
    return lines[-1][:400]


def _explain(msg: str) -> str:
    """TVM's RPC errors in words (the original text kept in parentheses)."""
    if "kShutdown" in msg or "connection closed" in msg.lower() or "Broken pipe" in msg \
            or "Connection reset" in msg or "socket" in msg.lower():
        return f"the connection to the board was lost: it died or was stopped ({msg})"
    return msg


# ------------------------------------------------------------------------------------------------
# the tracker's protocol (TVM rpc/base.py: int32 magic handshake, then [int32 length][JSON] frames)
# ------------------------------------------------------------------------------------------------
_TRACKER_MAGIC = 0x2F271
_SUCCESS, _REQUEST, _SUMMARY = 0, 4, 6


def _recvall(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the tracker")
        buf += chunk
    return bytes(buf)


def _send_json(sock: socket.socket, data) -> None:
    raw = json.dumps(data).encode()
    sock.sendall(struct.pack("<i", len(raw)) + raw)


def _recv_json(sock: socket.socket):
    size = struct.unpack("<i", _recvall(sock, 4))[0]
    return json.loads(_recvall(sock, size).decode())


def _tracker_connect(host: str, port: int, timeout: float) -> socket.socket:
    """A connected tracker socket (no retry: a closed port fails at once)."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=max(timeout, 0.1))
    except socket.timeout:
        raise RemoteError(f"tracker {where} unreachable: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise RemoteError(f"tracker {where} unreachable: {exc.strerror or exc}") from None
    try:
        sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
        magic = struct.unpack("<i", _recvall(sock, 4))[0]
    except (OSError, ConnectionError) as exc:
        sock.close()
        raise RemoteError(f"{where} is not a TVM RPC tracker ({exc})") from None
    if magic != _TRACKER_MAGIC:
        sock.close()
        raise RemoteError(f"{where} is not a TVM RPC tracker")
    return sock


def tracker_summary(host: str, port: int, timeout: float = 10.0) -> dict:
    """The tracker's summary: ``{"queue_info": {key: {"free", "pending"}}, "server_info": [...]}``."""
    sock = _tracker_connect(host, port, timeout)
    try:
        _send_json(sock, [_SUMMARY])
        reply = _recv_json(sock)
    except (OSError, ConnectionError, ValueError) as exc:
        raise RemoteError(f"tracker {host}:{port} did not answer a summary request ({exc})") from None
    finally:
        sock.close()
    if not (isinstance(reply, list) and reply and reply[0] == _SUCCESS):
        raise RemoteError(f"tracker {host}:{port} answered {reply!r} to a summary request")
    return reply[1]


def registered_keys(summary: dict) -> dict[str, int]:
    """key -> number of boards registered with it."""
    keys: dict[str, int] = {}
    for info in summary.get("server_info", []):
        k = str(info.get("key", ""))
        if k.startswith("server:"):
            keys[k[7:]] = keys.get(k[7:], 0) + 1
    return keys


def _request_board(host: str, port: int, key: str, deadline: float):
    """Ask the tracker for a free board with ``key``; ``(board_host, board_port, matchkey)``.
    Waits until ``deadline`` (time.time()) while all boards with the key are busy."""
    sock = _tracker_connect(host, port, max(deadline - time.time(), 1.0))
    try:
        _send_json(sock, [_REQUEST, key, "", 1])
        sock.settimeout(max(deadline - time.time(), 0.1))
        reply = _recv_json(sock)
    except socket.timeout:
        raise RemoteError(f"no free board with key '{key}' at tracker {host}:{port}: all are busy "
                          f"(gave up after the --timeout)") from None
    except (OSError, ConnectionError, ValueError) as exc:
        raise RemoteError(f"tracker {host}:{port} failed while requesting a board ({exc})") from None
    finally:
        sock.close()
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == _SUCCESS):
        raise RemoteError(f"tracker {host}:{port} answered {reply!r} to a board request")
    board_host, board_port, matchkey = reply[1]
    return str(board_host), int(board_port), str(matchkey)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
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


def compare_outputs(got: np.ndarray, ref: np.ndarray) -> dict:
    """The board-vs-host agreement: max |diff| <= CHECK_RTOL * max |ref|, and the same argmax of
    every sample (integer arithmetic is identical; float sums may be ordered differently)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return {"ok": False, "max_abs_diff": float("inf"), "tolerance": 0.0, "argmax_equal": False,
                "shape": list(got.shape), "reference_shape": list(ref.shape)}
    tol = CHECK_RTOL * float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    n = got.shape[0] if got.ndim > 1 else 1
    am_got = np.argmax(got.reshape(n, -1), axis=1)
    am_ref = np.argmax(ref.reshape(n, -1), axis=1)
    same = bool(np.array_equal(am_got, am_ref))
    finite = bool(np.all(np.isfinite(got)))
    return {"ok": bool(finite and diff <= tol and same), "max_abs_diff": diff, "tolerance": tol,
            "argmax_equal": same, "argmax": [int(a) for a in am_got]}


def _check_against(reference: str, what: str, x: np.ndarray, y: np.ndarray, shape) -> dict:
    from .evaluate import load_library, predict

    machine = library_machine(reference)
    if machine != host_machine():
        raise ModelError(f"--reference {reference} is an {machine} library; it must be built for "
                         f"this host ({host_machine()}), e.g. with --target x86")
    _vm, ref_shape = load_library(reference)
    if shape is not None and list(ref_shape) != list(shape):
        raise ModelError(f"--reference {reference} has input shape {ref_shape} but the benchmarked "
                         f"library has {list(shape)}: not the same model")
    ref = predict(reference, x)
    c = compare_outputs(y, ref)
    c.update({"what": what, "reference": os.path.abspath(reference)})
    return c


# ------------------------------------------------------------------------------------------------
# local benchmark
# ------------------------------------------------------------------------------------------------
def bench_local(library: str, repeat: int = 30, number: int = 5, seed: int = 0,
                reference: str | None = None) -> BenchResult:
    """Time a host ``.so`` here (TVM's time_evaluator, after a warm-up call)."""
    from .evaluate import load_library, time_main

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
        res.check = _check_against(reference, f"output vs host run of {reference}", x, y, shape)
    return res


# ------------------------------------------------------------------------------------------------
# remote benchmark: the worker (child process) and its supervisor
# ------------------------------------------------------------------------------------------------
def _remote_input_shape(sess, vm, known):
    """The compiled input shape (``dsconv_input_shapes()[0]``) of a library loaded on a board.

    Over RPC the function returns a handle to the board's ``Array[Shape]``; it is read with the
    runtime's ``ffi.ArrayGetItem`` and ``rpc.testing.GetShapeSize/GetShapeElem`` (in
    libtvm_runtime).  ``known`` (from a host library) is the fallback."""
    try:
        shapes = vm["dsconv_input_shapes"]()
    except Exception as exc:  # noqa: BLE001
        raise ModelError("the library has no dsconv_input_shapes function (not built by "
                         f"dsconv-tvm): {_first_line(exc)}") from None
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
        raise ModelError(f"cannot read the library's input shape on the board ({_first_line(exc)})"
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
        from .evaluate import load_library

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
    bhost, bport, matchkey = _request_board(th, tp, params["key"], deadline)
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


def _worker_main() -> int:
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
        final = ("error", {"stage": state["stage"], "message": _first_line(exc), "user": False})
    gc.collect()                         # frees the remote objects: the session ends cleanly
    emit(final[0], **final[1])
    return 0 if final[0] == "done" else 1


class _Worker:
    """A running remote-bench child: events arrive on a queue (``None`` when its stdout closes)."""

    def __init__(self, params: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from dsconv_tvm.remote import _worker_main; "
             "sys.exit(_worker_main())", "--dsconv-bench-worker", f"--parent={os.getpid()}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
            start_new_session=True)
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
                msg = _explain(ev["message"])
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
            _write_npz(output, x, y)

    if ref is not None:
        what = ("board output vs a run of the same library here" if auto_reference
                else f"board output vs host run of {reference}")
        res.check = {**compare_outputs(y, ref), "what": what, "reference": os.path.abspath(reference)}
    elif x is not None:
        why = ("--no-check" if not check else
               f"{os.path.basename(library)} is an {machine} library; pass --reference HOST.so (the "
               f"same model compiled for this host) to check the board's output")
        res.check = {"skipped": why}
    return res


def _write_npz(path: str, x: np.ndarray, y: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, input=x, output=y))


# ------------------------------------------------------------------------------------------------
# the verbs
# ------------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    if args.repeat < 1 or args.number < 1:
        raise RemoteError("--repeat and --number must be >= 1")
    if args.timeout <= 0:
        raise RemoteError("--timeout must be > 0")
    if args.key and not args.tracker:
        raise RemoteError("--key needs --tracker HOST:PORT")
    for path in (args.json, args.output):
        if path:
            check_output_path(path)

    def log(msg):
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    def write_json(res):
        if args.json and res is not None:
            data = json.dumps(res.to_json(), indent=2).encode()
            atomic_write(args.json, lambda f: f.write(data))

    if not args.tracker:
        if args.output:
            raise RemoteError("--output is for a board's output (with --tracker)")
        res = bench_local(args.library, args.repeat, args.number, reference=args.reference)
    else:
        if not args.key:
            raise RemoteError("--tracker needs --key KEY (the board's key at the tracker)")
        emulated = True if args.emulated else None
        try:
            res = bench_remote(args.library, args.tracker, args.key, args.repeat, args.number,
                               timeout=args.timeout, session_timeout=args.session_timeout,
                               emulated=emulated, reference=args.reference, output=args.output,
                               check=not args.no_check, log=log)
        except RemoteError as exc:
            if exc.partial is not None and exc.partial.times_ms:
                print("\n".join(exc.partial.lines()), flush=True)
                write_json(exc.partial)
                if args.json:
                    print(f"wrote     {args.json} (partial)", flush=True)
            raise
    for line in res.lines():
        print(line)
    write_json(res)
    if args.json:
        print(f"wrote     {args.json}")
    if args.output and res.board_io is not None:
        print(f"wrote     {args.output} (input and board output)")
    if res.check is not None and not res.check.get("skipped") and not res.check["ok"]:
        raise RemoteError(f"the board's output does not match the host run (max |diff| "
                          f"{res.check['max_abs_diff']:.3g} > {res.check['tolerance']:.3g} or "
                          f"argmax differs)")
    return 0


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT / SIGTERM raise :class:`_Stop` inside the block."""
    def _handler(_signum, _frame):
        raise _Stop
    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _user() -> str:
    try:
        import getpass
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return str(os.getuid())


def cmd_tracker(args) -> int:
    from tvm.rpc.tracker import Tracker

    addr = f"{args.host}:{args.port}"
    print(TRACKER_WARNING.format(addr=addr), file=sys.stderr, flush=True)
    tracker = None
    try:
        with _stop_on_signals():
            try:
                tracker = Tracker(args.host, port=args.port, port_end=args.port + 1,
                                  silent=args.silent)
            except _Stop:
                raise
            except Exception as exc:  # noqa: BLE001  (raised in TVM's worker process)
                raise RemoteError(f"cannot start a tracker on {addr}: {_first_line(exc)}") from None
            print(f"tracker listening on {args.host}:{tracker.port} (stop with Ctrl-C)", flush=True)
            while tracker.proc.is_alive():
                time.sleep(0.5)
            raise RemoteError("the tracker process exited unexpectedly")
    except _Stop:
        pass
    finally:
        if tracker is not None and tracker.proc is not None:
            try:
                tracker.terminate()
            except Exception:  # noqa: BLE001  (e.g. bound to an address 127.0.0.1 cannot reach)
                pass
            tracker.proc = None                   # (TVM's __del__ would try again)
        kill_process_tree(os.getpid(), include_parent=False)
    print("tracker stopped", flush=True)
    return 0


def _server_listed(th: str, tp: int, key: str, port: int) -> bool | None:
    """Whether the tracker lists a server with ``key`` on ``port`` (None: tracker unreachable)."""
    try:
        infos = tracker_summary(th, tp, timeout=5.0).get("server_info", [])
    except RemoteError:
        return None
    return any(i.get("key") == "server:" + key and list(i.get("addr", []))[-1:] == [port]
               for i in infos)


def cmd_board_server(args) -> int:
    th, tp = parse_address(args.tracker, "--tracker")
    if not args.key:
        raise RemoteError("--key must not be empty")
    print(SERVER_WARNING.format(addr=f"{args.host}:{args.port}", user=_user()), file=sys.stderr,
          flush=True)
    state = {"server": None}

    def start():
        from tvm import rpc

        try:
            state["server"] = rpc.Server(args.host, args.port, port_end=args.port + 1,
                                         tracker_addr=(th, tp), key=args.key, silent=args.silent,
                                         custom_addr=args.custom_addr)
        except Exception as exc:  # noqa: BLE001
            raise RemoteError(f"cannot start a board server on {args.host}:{args.port}: "
                              f"{_first_line(exc)}") from None
        return state["server"]

    def stop():
        if state["server"] is not None:
            try:
                state["server"].terminate()
            except Exception:  # noqa: BLE001
                pass
            state["server"] = None
        kill_process_tree(os.getpid(), include_parent=False)

    try:
        with _stop_on_signals():
            # the tracker may still be starting (boot order): try for a while before giving up
            t0 = time.time()
            while True:
                try:
                    tracker_summary(th, tp, timeout=5.0)
                    break
                except RemoteError as exc:
                    if time.time() - t0 > args.wait:
                        raise RemoteError(f"{exc} (tried for {args.wait:g} s)") from None
                    time.sleep(2.0)
            server = start()
            # registration happens in TVM's server thread: report it once the tracker lists it
            t0 = time.time()
            while not _server_listed(th, tp, args.key, server.port):
                if not server.proc.is_alive():
                    raise RemoteError("the board server process exited unexpectedly")
                if time.time() - t0 > args.wait:
                    raise RemoteError(f"the board server did not register at tracker {th}:{tp} "
                                      f"within {args.wait:g} s")
                time.sleep(0.5)
            print(f"board server on {args.host}:{server.port} registered at tracker {th}:{tp} as "
                  f"'{args.key}' (stop with Ctrl-C)", flush=True)
            # TVM's server thread ends for good when a client's connection is reset or a session
            # fails; the tracker then forgets the board.  Start it again when that happens.
            missing_since = None
            while True:
                time.sleep(2.0)
                listed = _server_listed(th, tp, args.key, server.port)
                if listed is None or listed:          # tracker down: TVM reconnects by itself
                    missing_since = None
                    if server.proc.is_alive():
                        continue
                elif missing_since is None:
                    missing_since = time.time()
                if server.proc.is_alive() and time.time() - missing_since < args.restart_after:
                    continue
                print(f"board server: TVM's RPC server stopped serving (not listed at tracker "
                      f"{th}:{tp} or exited); restarting it", file=sys.stderr, flush=True)
                stop()
                server = start()
                missing_since = None
    except _Stop:
        pass
    finally:
        stop()
    print("board server stopped", flush=True)
    return 0


def add_parsers(sub) -> None:
    """Add ``bench``, ``tracker`` and ``board-server`` to the CLI's sub-parsers."""
    b = sub.add_parser(
        "bench", help="latency of a .so, here or on a board over the RPC tracker",
        description="Median / min / max milliseconds of one inference. Without --tracker the .so "
                    "(built for this host) runs here. With --tracker and --key, a board is requested "
                    "from the TVM RPC tracker, the .so is uploaded and timed ON THE BOARD, and the "
                    "board's output is checked against a run here of the same model (--reference "
                    "HOST.so, or the .so itself if it is a host library): max |diff| <= 1e-4 * "
                    "max|out| and the same argmax. Timings from an emulated board (--emulated, or a "
                    "key containing 'emu') are meaningless for speed. Exit 2 with one error line if "
                    "the tracker or board fails; measurements made before are still printed/written.")
    b.add_argument("library", help="the compiled .so")
    b.add_argument("--tracker", default=None, metavar="HOST:PORT", help="the RPC tracker")
    b.add_argument("--key", default=None, help="the board's key at the tracker (e.g. rpi5)")
    b.add_argument("--repeat", type=int, default=30, help="measurements (default 30)")
    b.add_argument("--number", type=int, default=5,
                   help="calls averaged per measurement (default 5)")
    b.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the tracker, a free board, and each step on the board "
                        "(default 60)")
    b.add_argument("--session-timeout", type=float, default=0.0,
                   help="the board ends the session after this many seconds (default 0: no limit)")
    b.add_argument("--reference", default=None, metavar="HOST.so",
                   help="the same model compiled for this host: check the board's output against it")
    b.add_argument("--no-check", action="store_true",
                   help="do not check the board's output against a run here")
    b.add_argument("--emulated", action="store_true",
                   help="the board is emulated (qemu): label its timings as meaningless for speed")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    b.add_argument("--output", default=None, metavar="FILE.npz",
                   help="save the random input and the board's output (input, output arrays)")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser(
        "tracker", help="run TVM's RPC tracker (boards register here)",
        description="Run TVM's RPC tracker (tvm.exec.rpc_tracker) until Ctrl-C / SIGTERM. Boards "
                    "(`dsconv-tvm board-server`) register with it under a key; `dsconv-tvm bench "
                    "--tracker HOST:PORT --key KEY` asks it for a free board. Binds 127.0.0.1 unless "
                    "--host says otherwise (e.g. --host 0.0.0.0 to let boards on the LAN in).")
    t.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    t.add_argument("--port", type=int, default=9190, help="port (default 9190)")
    t.add_argument("--silent", action="store_true", help="less logging")
    t.set_defaults(func=cmd_tracker)

    s = sub.add_parser(
        "board-server", help="run TVM's RPC server on a board, registered at a tracker",
        description="Run TVM's RPC server (tvm.exec.rpc_server) on this machine (e.g. a Raspberry "
                    "Pi with apache-tvm installed) and register it at the tracker under KEY, until "
                    "Ctrl-C / SIGTERM. WARNING: the server runs any code uploaded to it; anyone who "
                    "can reach its port can run anything as this user. Binds 127.0.0.1 unless --host "
                    "says otherwise.")
    s.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the RPC tracker")
    s.add_argument("--key", required=True, help="the key to register under (e.g. rpi5)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9090, help="port (default 9090)")
    s.add_argument("--custom-addr", default=None,
                   help="address to report to the tracker (default: as the tracker sees this machine)")
    s.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the tracker and for registration (default 60)")
    s.add_argument("--restart-after", type=float, default=10.0,
                   help="restart TVM's server when the tracker has not listed it for this many "
                        "seconds (it stops for good after a client vanishes; default 10)")
    s.add_argument("--silent", action="store_true", help="less logging")
    s.set_defaults(func=cmd_board_server)
