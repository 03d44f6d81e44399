"""Output files: checked before the work that produces them, written atomically (a temporary file
next to the output, renamed over it when complete; removed on any failure).  The one mechanism
every writer of the package uses."""

from __future__ import annotations

import contextlib
import os
import tempfile

from .errors import OutputError, check_interrupted


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (the same path after resolving links, or
    the same inode: a hard link)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:                      # one does not exist
        return False


def check_output_path(path: str, inputs=(), suffixes=None) -> None:
    """One clear error now if ``path`` cannot be written later (a directory, a missing or read-only
    parent directory), if it is one of ``inputs`` (or a link to one: writing it would destroy the
    input), or if it does not end in one of ``suffixes``."""
    check_output_name(path, inputs, suffixes)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {directory} is not writable")


def check_output_name(path: str, inputs=(), suffixes=None) -> None:
    """The name checks of :func:`check_output_path` only (not an input, the right suffix)."""
    path = os.fspath(path)
    if not path:
        raise OutputError("the output file name is empty")
    for inp in inputs:
        if inp and same_file(path, os.fspath(inp)):
            raise OutputError(f"cannot write {path}: it is the input {inp} (it would be overwritten); "
                              f"choose another output name")
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a directory")
    if suffixes and not path.endswith(tuple(suffixes)):
        raise OutputError(f"cannot write {path}: the output must end in {' or '.join(suffixes)}")


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
        check_interrupted()              # nothing is committed after Ctrl-C / SIGTERM
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
