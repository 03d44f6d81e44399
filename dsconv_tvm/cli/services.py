"""``dsconv-tvm tracker`` and ``dsconv-tvm board-server``: TVM's RPC tracker and a board's RPC server
(:mod:`dsconv_tvm.remote.services`)."""

from __future__ import annotations


def add_parsers(sub) -> None:
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


def cmd_tracker(args) -> int:
    from ..remote.services import run_tracker

    return run_tracker(args)


def cmd_board_server(args) -> int:
    from ..remote.services import run_board_server

    return run_board_server(args)
