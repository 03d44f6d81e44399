"""The long-running remote services: TVM's RPC tracker (where boards register under a key and where
``bench``/``tune`` ask for a free one), and TVM's RPC server on a board, registered at a tracker and
restarted when it stops serving.

**An RPC server runs whatever code is uploaded to it**: anyone who can reach its port can run
anything as the user running it.  Both bind 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
import sys
import time

from .processes import (
    OwnChildren,
    Stop,
    become_subreaper,
    forked_children_die_with_parent,
    forked_children_die_with_us,
    kill_process_tree,
    listeners_of,
    stop_on_signals,
)
from .tracker import RemoteError, first_line, parse_address, tracker_summary

SERVER_WARNING = ("WARNING: a TVM RPC server runs any code uploaded to it: anyone who can reach "
                  "{addr} can run anything on this machine as user {user}. Keep it on 127.0.0.1 or a "
                  "trusted network (see --host).")
TRACKER_WARNING = ("note: anyone who can reach the tracker at {addr} can list and use the boards "
                   "registered there (which run any code uploaded to them).")


def _user() -> str:
    try:
        import getpass
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return str(os.getuid())


def run_tracker(args) -> int:
    from tvm.rpc.tracker import Tracker

    addr = f"{args.host}:{args.port}"
    print(TRACKER_WARNING.format(addr=addr), file=sys.stderr, flush=True)
    tracker = None
    forked_children_die_with_us()            # TVM's tracker process goes when this one is killed
    own = OwnChildren()
    try:
        with stop_on_signals():
            try:
                tracker = Tracker(args.host, port=args.port, port_end=args.port + 1,
                                  silent=args.silent)
            except Stop:
                raise
            except Exception as exc:  # noqa: BLE001  (raised in TVM's worker process)
                raise RemoteError(f"cannot start a tracker on {addr}: {first_line(exc)}") from None
            print(f"tracker listening on {args.host}:{tracker.port} (stop with Ctrl-C)", flush=True)
            while tracker.proc.is_alive():
                time.sleep(0.5)
            raise RemoteError("the tracker process exited unexpectedly")
    except Stop:
        pass
    finally:
        if tracker is not None and tracker.proc is not None:
            try:
                tracker.terminate()
            except Exception:  # noqa: BLE001  (e.g. bound to an address 127.0.0.1 cannot reach)
                pass
            tracker.proc = None                   # (TVM's __del__ would try again)
        own.kill()
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


def run_board_server(args) -> int:
    th, tp = parse_address(args.tracker, "--tracker")
    if not args.key:
        raise RemoteError("--key must not be empty")
    print(SERVER_WARNING.format(addr=f"{args.host}:{args.port}", user=_user()), file=sys.stderr,
          flush=True)
    state = {"server": None}
    own = OwnChildren()
    # orphans of TVM's server (a session process whose parent was killed) stay in this tree, so
    # that stop() finds them and the port is freed for the restart
    become_subreaper()

    def start(attempts: int = 1):
        from tvm import rpc

        for attempt in range(attempts):
            try:
                # the init callback runs in TVM's server process: it and the session processes it
                # forks die with their parent (no session left holding the port)
                state["server"] = rpc.Server(args.host, args.port, port_end=args.port + 1,
                                             tracker_addr=(th, tp), key=args.key, silent=args.silent,
                                             custom_addr=args.custom_addr,
                                             server_init_callback=forked_children_die_with_parent)
                return state["server"]
            except Exception as exc:  # noqa: BLE001
                if attempt + 1 >= attempts:
                    raise RemoteError(f"cannot start a board server on {args.host}:{args.port}: "
                                      f"{first_line(exc)}") from None
                free_port()
                time.sleep(1.0)
        return state["server"]

    def free_port():
        """Kill what of this process's tree still holds the port (a stuck session)."""
        for pid in listeners_of(args.port, own.pids()):
            kill_process_tree(pid, timeout=2.0)

    def stop():
        if state["server"] is not None:
            try:
                state["server"].terminate()
            except Exception:  # noqa: BLE001
                pass
            state["server"] = None
        own.kill()

    try:
        with stop_on_signals():
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
                server = start(attempts=10)
                missing_since = None
    except Stop:
        pass
    finally:
        stop()
        become_subreaper(False)
    print("board server stopped", flush=True)
    return 0
