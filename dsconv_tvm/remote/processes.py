"""Child processes of the remote verbs and the services: killing a whole process tree, children that
die with their parent (Linux parent-death signal, own process group), a service that adopts its
orphaned descendants (child subreaper), and SIGINT / SIGTERM turned into an exception inside a block."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, arg: int) -> bool:
    """``prctl(option, arg)`` through ctypes; False where it is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies; if the parent
    (``parent``, the pid it had when this process was made) is already gone, raise ``sig`` now."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when the process that
    started it dies (SIGKILL included).  Use with ``start_new_session=True`` so that a Ctrl-C in the
    terminal reaches only the parent, which stops its children itself."""
    parent = os.getpid()

    def _preexec():
        set_parent_death_signal(sig, parent)
    return _preexec


def popen_child(argv, sig: int = signal.SIGTERM, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of a child in its own process group that dies with this process.

    Call it from the main thread: the kernel sends the signal when the *thread* that forked ends."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(argv, preexec_fn=die_with_parent(sig), **kwargs)


def become_subreaper(on: bool = True) -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4), so that a
    grandchild whose parent was killed stays in this process's tree (and is found and stopped by
    :func:`kill_process_tree`) instead of moving to init."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, int(on))


_FORK_HOOKED = []


def forked_children_die_with_us(sig: int = signal.SIGKILL) -> None:
    """Every process forked from now on by this process (e.g. by ``multiprocessing``) gets ``sig``
    when its parent dies."""
    if hasattr(os, "register_at_fork") and not _FORK_HOOKED:
        _FORK_HOOKED.append(sig)
        os.register_at_fork(after_in_child=lambda: _prctl(_PR_SET_PDEATHSIG, int(sig)))


def forked_children_die_with_parent(sig: int = signal.SIGKILL) -> None:
    """:func:`forked_children_die_with_us`, and this process itself gets ``sig`` when *its* parent
    dies (the init callback of TVM's RPC server process)."""
    set_parent_death_signal(sig)
    forked_children_die_with_us(sig)


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


class OwnChildren:
    """The child processes this process starts from now on (and the orphans it adopts as a
    subreaper): :meth:`kill` ends their trees and leaves alone the children it had before (a
    service run in-process, e.g. in a test, must not stop its caller's other children)."""

    def __init__(self):
        import psutil

        self.before = {p.pid for p in psutil.Process().children()}

    def kill(self, timeout: float = 5.0) -> None:
        import psutil

        for p in psutil.Process().children():
            if p.pid not in self.before:
                kill_process_tree(p.pid, timeout=timeout)

    def pids(self) -> list[int]:
        """Every process of the trees this process started since."""
        import psutil

        out = []
        for p in psutil.Process().children():
            if p.pid not in self.before:
                try:
                    out += [p.pid, *(c.pid for c in p.children(recursive=True))]
                except psutil.NoSuchProcess:
                    pass
        return out


def listeners_of(port: int, pids) -> list[int]:
    """Which of ``pids`` hold a TCP socket bound to ``port`` (listening or serving)."""
    import psutil

    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.laddr and c.laddr.port == port for c in conns):
            out.append(pid)
    return out


class Stop(Exception):
    pass


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM raise :class:`Stop` inside the block."""
    def _handler(_signum, _frame):
        raise Stop
    old = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
