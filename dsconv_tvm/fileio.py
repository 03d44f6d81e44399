"""Output files: checked before the work that produces them, written atomically (a temporary file
next to the output, renamed over it when complete; removed on any failure).  The one mechanism
every writer of the package uses."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import OutputError


def check_output_path(path: str) -> None:
    """One clear error now if ``path`` cannot be written later (a directory, a missing or read-only
    parent directory)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {directory} is not writable")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", mode: int = 0o666):
    """Yield a temporary path next to ``path`` for the caller to write; rename it over ``path``
    (with ``mode`` less the umask, as a new file gets) when the block ends normally, remove it on
    any exception (``KeyboardInterrupt`` included)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix or ".tmp", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        yield tmp
        _chmod_like_new_file(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def atomic_write(path: str, write) -> None:
    """Call ``write(file)`` on a temporary binary file next to ``path``, then rename it over ``path``;
    nothing is left behind on failure."""
    check_output_path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _chmod_like_new_file(path: str, mode: int) -> None:
    """mkstemp creates 0600; give the library the usual permissions (mode & ~umask)."""
    umask = None
    try:  # Linux >= 4.7; avoids the racy os.umask() read-and-restore
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    os.chmod(path, mode & ~umask)
