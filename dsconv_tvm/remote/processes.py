"""Child processes of the remote verbs and the services: killing a whole process tree, and SIGINT /
SIGTERM turned into an exception inside a block."""

from __future__ import annotations

import contextlib
import signal


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


