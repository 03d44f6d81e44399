"""``dsconv-tvm bench``: latency of a .so here or on a board over the RPC tracker
(:mod:`dsconv_tvm.remote.bench`)."""

from __future__ import annotations

import json
import sys

from ..fileio import atomic_write, check_output_path, same_file
from ..remote.tracker import RemoteError


def add_parser(sub) -> None:
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
    b.add_argument("--all", action="store_true",
                   help="time the library on every board registered with --key, all at once, and "
                        "report per board (a table with one row per board; --json: per-board figures)")
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


def cmd_bench(args) -> int:
    from ..remote.bench import bench_all, bench_local, bench_remote, fleet_json, fleet_lines

    if args.repeat < 1 or args.number < 1:
        raise RemoteError("--repeat and --number must be >= 1")
    if args.timeout <= 0:
        raise RemoteError("--timeout must be > 0")
    if args.key and not args.tracker:
        raise RemoteError("--key needs --tracker HOST:PORT")
    if args.all and not (args.tracker and args.key):
        raise RemoteError("--all needs --tracker HOST:PORT and --key KEY (every board with the key)")
    if args.all and args.output:
        raise RemoteError("--output saves one board's output: not with --all")
    for path in (args.json, args.output):
        if path:
            check_output_path(path, inputs=[args.library, args.reference])
    if args.json and args.output and same_file(args.json, args.output):
        raise RemoteError(f"--json and --output are the same file ({args.json})")

    def log(msg):
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    def write_json(res):
        if args.json and res is not None:
            data = json.dumps(res if isinstance(res, dict) else res.to_json(), indent=2).encode()
            atomic_write(args.json, lambda f: f.write(data))

    if args.all:
        results = bench_all(args.library, args.tracker, args.key, args.repeat, args.number,
                            timeout=args.timeout, session_timeout=args.session_timeout,
                            emulated=True if args.emulated else None, reference=args.reference,
                            check=not args.no_check, log=log)
        print("\n".join(fleet_lines(results)))
        summary = fleet_json(results)
        write_json(summary)
        if args.json:
            print(f"wrote     {args.json}")
        bad = [r for r in results if r.error or (r.check and r.check.get("ok") is False)]
        if bad:
            first = bad[0].error or "its output does not match the host run"
            raise RemoteError(f"{len(bad)} of {len(results)} boards with key '{args.key}' failed; "
                              f"board {bad[0].board or '?'}: {first}")
        return 0

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
