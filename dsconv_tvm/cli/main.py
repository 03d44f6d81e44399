"""``dsconv-tvm``: the parser of every verb and the error handling.

Exit codes: 0 success; 2 a problem with the input (bad file, option, target, output path: one
line on stderr, no traceback); 1 an unexpected internal error (traceback shown); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import DSConvError
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except DSConvError as exc:
        print(f"dsconv-tvm {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
