"""Session fixtures shared by the test modules.

``rpc_tracker``: a ``dsconv-tvm tracker`` on a free port of 127.0.0.1 for the whole session.
``emulated_board_booting`` / ``emulated_board``: the emulated Raspberry Pi (aarch64 Python + TVM
runtime under qemu-user, built once into the cache by tools/emulated_board.py) running
``dsconv-tvm board-server`` registered at that tracker.  ``emulated_board_booting`` only starts it
(registration takes ~10-30 s, so a test can compile its models meanwhile); ``emulated_board`` waits
until it is registered.  Every process tree is killed at the end of the session.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EMULATED_KEY = "rpi-emu"


def _load_emulated_board_tool():
    name = "emulated_board"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "emulated_board.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli() -> list[str]:
    return [sys.executable, "-m", "dsconv_tvm.cli"]


@dataclass
class _Service:
    proc: subprocess.Popen
    host: str
    port: int
    log: Path
    key: str | None = None
    tracker: str | None = None
    started: float = field(default_factory=time.time)
    registered_after: float | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        from dsconv_tvm.remote import kill_process_tree

        kill_process_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _start(argv, log: Path, env=None) -> subprocess.Popen:
    fh = open(log, "w")
    try:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, cwd=str(REPO))
    finally:
        fh.close()


def start_tracker(log: Path) -> _Service:
    """``dsconv-tvm tracker`` on 127.0.0.1:<free port>, up and answering; ``.address`` is
    "127.0.0.1:PORT".  Stop it with ``.stop()``."""
    from dsconv_tvm.remote import RemoteError, tracker_summary

    for _attempt in range(3):                       # a free port may be taken meanwhile
        port = _free_port()
        svc = _Service(_start([*_cli(), "tracker", "--port", str(port)], log), "127.0.0.1", port, log)
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                tracker_summary("127.0.0.1", port, timeout=2)
                break
            except RemoteError:
                if svc.proc.poll() is not None:
                    break
                time.sleep(0.3)
        else:
            svc.stop()
            pytest.fail(f"the tracker did not start within 60 s:\n{svc.output()}")
        if svc.proc.poll() is None:
            break
    else:
        pytest.fail(f"the tracker could not start:\n{svc.output()}")
    return svc


def emulated_board_tool():
    """tools/emulated_board.py, or skip the test when qemu-user-static is missing."""
    tool = _load_emulated_board_tool()
    try:
        tool.check_qemu()
    except tool.BoardSetupError as exc:
        pytest.skip(str(exc))
    return tool


@pytest.fixture(scope="session")
def rpc_tracker(tmp_path_factory):
    """The session's tracker (see :func:`start_tracker`)."""
    svc = start_tracker(tmp_path_factory.mktemp("tracker") / "tracker.log")
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def emulated_board_booting(rpc_tracker, tmp_path_factory):
    """The emulated board, built if needed and started (not yet waited for)."""
    tool = emulated_board_tool()
    t0 = time.time()
    logs = []
    board = tool.ensure_board(log=logs.append)
    setup_s = time.time() - t0
    log = tmp_path_factory.mktemp("emulated-board") / "board.log"
    port = _free_port()
    fh = open(log, "w")
    try:
        proc = tool.start_board_server(board, rpc_tracker.address, EMULATED_KEY, port=port,
                                       stdout=fh, stderr=subprocess.STDOUT)
    finally:
        fh.close()
    svc = _Service(proc, "127.0.0.1", port, log, key=EMULATED_KEY, tracker=rpc_tracker.address)
    svc.setup_seconds = setup_s                      # type: ignore[attr-defined]
    svc.board = board                                # type: ignore[attr-defined]
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def emulated_board(emulated_board_booting):
    """The emulated board, registered at ``rpc_tracker`` under ``.key``."""
    svc = emulated_board_booting
    if svc.registered_after is None:
        tool = _load_emulated_board_tool()
        try:
            tool.wait_registered(svc.tracker, svc.key, timeout=240, proc=svc.proc)
        except tool.BoardSetupError as exc:
            pytest.fail(f"{exc}\n{svc.output()[-3000:]}")
        svc.registered_after = time.time() - svc.started
        print(f"\nemulated board: setup {svc.setup_seconds:.1f} s, registered "
              f"{svc.registered_after:.1f} s after start", file=sys.stderr)
    return svc
