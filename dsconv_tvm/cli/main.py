"""``dsconv-tvm``: the parser of every verb and the error handling.

Exit codes: 0 success; 2 a problem with the input (bad file, option, target, output path: one
line on stderr, no traceback); 1 an unexpected internal error (traceback shown); 130 interrupted
(SIGINT, Ctrl-C), 143 terminated (SIGTERM): one line, nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile

from .. import __version__
from ..errors import DEFER_INTERRUPTS, PENDING_SIGNAL, DSConvError, Interrupted
from . import adapt, bench, run, services, targets, tune
from . import compile as compile_verb
from . import eval as eval_verb
from .common import EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsconv-tvm",
        description="Compile pre-trained ONNX CNNs with DSConv: low-bit block-scaled integer "
                    "convolutions, through Apache TVM, into a .so for x86 or ARM.")
    parser.add_argument("--version", action="version", version=f"dsconv-tvm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    compile_verb.add_parser(sub)
    run.add_parser(sub)
    tune.add_parser(sub)
    targets.add_parsers(sub)          # targets, runtime-info
    bench.add_parser(sub)
    services.add_parsers(sub)         # tracker, board-server
    eval_verb.add_parser(sub)
    adapt.add_parser(sub)
    return parser


#: verbs whose work makes temporary files (TVM's build folders, MetaSchedule's candidates): they
#: run with a private TMPDIR, removed when the verb ends, whatever the way it ends
_PRIVATE_TMP_VERBS = ("compile", "tune", "eval", "adapt")


def _install_signal_handlers(state: dict) -> dict:
    """SIGINT / SIGTERM raise :class:`Interrupted` once; a second one during the clean-up is
    ignored (so that removing temporary files is not cut short).  ``state["signum"]`` records it:
    whatever an interrupt becomes inside TVM (an FFI error, a wrapped exception), the verb ends as
    interrupted."""
    def handler(signum, _frame):
        if state.get("signum"):
            return
        state["signum"] = signum
        PENDING_SIGNAL[:] = [signum]
        if not DEFER_INTERRUPTS:         # else raised at the next check_interrupted()
            raise Interrupted(signum)
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, handler)
        except ValueError:                 # not the main thread (main() called from a thread)
            pass
    return old


@contextlib.contextmanager
def _private_tmpdir(enabled: bool):
    if not enabled:
        yield
        return
    saved_env, saved_mod = os.environ.get("TMPDIR"), tempfile.tempdir
    path = tempfile.mkdtemp(prefix="dsconv-tvm-")
    os.environ["TMPDIR"] = path           # child processes (TVM's workers, the linker) too
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = saved_mod
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    state: dict = {}
    old = _install_signal_handlers(state)
    try:
        with _private_tmpdir(args.verb in _PRIVATE_TMP_VERBS):
            return args.func(args)
    except BaseException as exc:  # noqa: BLE001  (mapped to one line and an exit code below)
        signum = state.get("signum") or (signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None)
        if signum:
            # TVM's worker pools, torn down by the interrupt, may complain in __del__ at exit
            # ("Exception ignored in ..."): the one line below is what the user gets
            sys.unraisablehook = lambda _u: None
            note = getattr(args, "interrupt_note", None)
            print(f"dsconv-tvm {args.verb}: interrupted ({signal.Signals(signum).name})"
                  + (f"; {note()}" if note else ""), file=sys.stderr)
            return 128 + int(signum)
        if isinstance(exc, DSConvError):
            print(f"dsconv-tvm {args.verb}: error: {exc}", file=sys.stderr)
            return exc.exit_code
        raise
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        PENDING_SIGNAL.clear()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
