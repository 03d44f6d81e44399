"""The child process of a remote ``bench`` (:mod:`.bench`) and its handle in the supervisor.

The child opens the RPC session on the board, uploads, loads, runs and times the library, and reports
every step and every measurement as one JSON line; the supervisor kills it when the board stops
answering.  Every object holding the session lives in the child, so the session closes with it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ..errors import DSConvError, ModelError
from ..execute.runner import bench_input, load_library
from .processes import kill_process_tree, popen_child
from .tracker import first_line, request_board


def remote_input_shape(sess, vm, known):
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


def worker_session(params: dict, emit, state: dict, go: threading.Event) -> None:
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
    if params.get("hold"):
        # bench --all: keep this board until every board of the key is held (so that the tracker
        # gives each worker another board), then go on together
        state["stage"] = "waiting for the other boards"
        go.wait(timeout=params["hold"])
    state["stage"] = "uploading the library"
    name = os.path.basename(params["library"])
    sess.upload(params["library"], name)
    emit("uploaded")
    state["stage"] = "loading the library"
    dev = sess.cpu()
    vm = relax.VirtualMachine(sess.load_module(name), dev)
    shape = remote_input_shape(sess, vm, None if x is None else list(x.shape))
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

    go = threading.Event()

    def _watch_parent():
        for line in sys.stdin:           # "go": the other boards are held (see worker_session)
            if line.strip() == "go":
                go.set()
        os._exit(3)                      # EOF: the parent exited or was killed
    threading.Thread(target=_watch_parent, daemon=True).start()

    def emit(ev, **kw):
        events.write(json.dumps({"ev": ev, **kw}) + "\n")
        events.flush()

    state = {"stage": "starting"}
    final = ("done", {})
    try:
        worker_session(params, emit, state, go)
    except DSConvError as exc:
        final = ("error", {"stage": state["stage"], "message": str(exc), "user": True})
    except Exception as exc:  # noqa: BLE001
        final = ("error", {"stage": state["stage"], "message": first_line(exc), "user": False})
    gc.collect()                         # frees the remote objects: the session ends cleanly
    emit(final[0], **final[1])
    return 0 if final[0] == "done" else 1


class Worker:
    """A running remote-bench child: its events arrive on ``events`` as ``(tag, event)`` (event
    ``None`` when its stdout closes)."""

    def __init__(self, params: dict, events: queue.Queue, tag: int = 0):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # its own process group, and SIGKILLed by the kernel if this process dies
        self.proc = popen_child(
            [sys.executable, "-c", "import sys; from dsconv_tvm.remote.bench_worker import worker_main; "
             "sys.exit(worker_main())", "--dsconv-bench-worker", f"--parent={os.getpid()}"],
            sig=signal.SIGKILL, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, env=env)
        self.events, self.tag = events, tag
        self.proc.stdin.write(json.dumps(params) + "\n")
        self.proc.stdin.flush()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.events.put((self.tag, json.loads(line)))
            except ValueError:
                pass
        self.events.put((self.tag, None))

    def go(self) -> None:
        """Let a worker waiting for the other boards (``hold``) go on."""
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

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
