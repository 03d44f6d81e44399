"""The TVM RPC tracker's protocol, spoken directly (TVM rpc/base.py: an int32 magic handshake, then
[int32 length][JSON] frames), with a timeout on every socket: summaries, registered keys, board
requests; and the one error class of everything remote."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import struct
import time

from ..errors import DSConvError


class RemoteError(DSConvError):
    """The tracker or a board failed (unreachable, no board with the key, board died or hung).

    ``partial`` holds the :class:`BenchResult` measured before the failure, if any."""

    def __init__(self, message: str, partial=None):
        super().__init__(message)
        self.partial = partial


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; a :class:`RemoteError` naming ``what`` otherwise."""
    host, sep, port = (text or "").strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteError(f"{what} '{text}' is not HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def first_line(exc: BaseException | str) -> str:
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


def explain(msg: str) -> str:
    """TVM's RPC errors in words (the original text kept in parentheses)."""
    if "kShutdown" in msg or "connection closed" in msg.lower() or "Broken pipe" in msg \
            or "Connection reset" in msg or "socket" in msg.lower():
        return f"the connection to the board was lost: it died or was stopped ({msg})"
    return msg


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


def request_board(host: str, port: int, key: str, deadline: float):
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


def board_free_count(summary: dict, key: str) -> int:
    """How many boards with ``key`` are free (registered and not in a session) in a summary."""
    info = summary.get("queue_info", {}).get(key) or {}
    return int(info.get("free", 0))


def wait_board_free(tracker: str, key: str, timeout: float) -> float:
    """Seconds until a board with ``key`` is free again at ``tracker``; a :class:`RemoteError`
    after ``timeout`` seconds (a session that was not closed, a board that did not come back)."""
    host, port = parse_address(tracker, "--tracker")
    t0 = time.time()
    while True:
        try:
            if board_free_count(tracker_summary(host, port, timeout=5.0), key) > 0:
                return time.time() - t0
        except RemoteError:
            pass
        if time.time() - t0 > timeout:
            raise RemoteError(f"board '{key}' at tracker {tracker} is not free after {timeout:g} s "
                              f"(a session still open, or the board did not re-register)")
        time.sleep(0.3)


@contextlib.contextmanager
def board_session(tracker: str, key: str, timeout: float = 60.0, session_timeout: float = 0.0):
    """A TVM RPC session on a board with ``key`` from ``tracker`` ("HOST:PORT"), bounded: the request
    waits at most ``timeout`` seconds for a free board (:class:`RemoteError`), and the board ends
    the session after ``session_timeout`` seconds (0: no limit).

    The session is closed when the block ends: the caller must drop every remote object it made
    (modules, functions, tensors) inside the block; the session itself is released here and a
    ``gc.collect()`` runs, so the board is free for the next user at once."""
    from tvm import rpc

    host, port = parse_address(tracker, "--tracker")
    bhost, bport, matchkey = request_board(host, port, key, time.time() + timeout)
    try:
        ref = SessionRef(rpc.connect(bhost, bport, matchkey, session_timeout=session_timeout))
    except Exception as exc:  # noqa: BLE001  (TVM's connection errors)
        raise RemoteError(f"cannot connect to board '{key}' at {bhost}:{bport}: {first_line(exc)}") from None
    try:
        yield ref
    finally:
        ref.close()


class SessionRef:
    """An RPC session that can be closed: every attribute is the session's until :meth:`close`,
    which drops the reference (a name bound by ``with ... as`` outlives the block)."""

    def __init__(self, sess):
        self._sess = sess

    def __getattr__(self, name):
        sess = self.__dict__.get("_sess")
        if sess is None:
            raise RemoteError("the board session is closed")
        return getattr(sess, name)

    def close(self) -> None:
        self._sess = None
        gc.collect()

