"""What every verb shares: exit codes, the DSConv scheme options and the config they make, logging
to stderr, byte sizes."""

from __future__ import annotations

import argparse
import sys

from ..config import DSConvConfig

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the verb's result)."""
    print(msg, file=sys.stderr, flush=True)


def bits_arg(text: str):
    """``--bits``: an integer, or ``auto`` (mixed precision, per-layer bits under ``--weight-bytes``)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor 'auto'") from exc


def add_scheme_options(p: argparse.ArgumentParser, mixed: bool = False) -> None:
    """The options of the DSConv scheme (bits, block, mantissa, fit, ...), as ``compile`` has them;
    ``mixed``: also ``--bits auto`` with ``--weight-bytes`` and ``--sensitivity``."""
    d = DSConvConfig()
    if mixed:
        p.add_argument("--bits", type=bits_arg, default=d.bits,
                       help=f"weight bits, 2..8 (default {d.bits}), or auto: per-layer bits chosen by "
                            "sensitivity under --weight-bytes")
        p.add_argument("--weight-bytes", type=float, default=None, metavar="R",
                       help="with --bits auto: the deployed conv weight bytes may be at most R x their "
                            "fp32 bytes (e.g. 0.18)")
        p.add_argument("--sensitivity", default=None, metavar="OUT",
                       help="with --bits auto: write the per-layer sensitivity table OUT.md and plot OUT.png")
    else:
        p.add_argument("--bits", type=int, default=d.bits, help=f"weight bits, 2..8 (default {d.bits})")
    p.add_argument("--block", type=int, default=d.block,
                   help=f"input channels per KDS scale / BFP exponent block, >= 1 (default {d.block})")
    p.add_argument("--mantissa", type=int, default=d.mantissa,
                   help=f"BFP activation mantissa bits, 2..8 (default {d.mantissa})")
    p.add_argument("--fit", default=d.fit, choices=["l2", "mse"],
                   help="KDS scale fit: l2 = the paper's closed form (default), mse = clipping grid "
                        "search (lower weight error, not better top-1 on the example models)")
    p.add_argument("--scale-dtype", default=d.scale_dtype, choices=["float32", "float16"],
                   help="dtype of the KDS scales in the .so (default float32)")
    p.add_argument("--first-layer", default=d.first_layer, choices=["keep", "dsconv"],
                   help="the conv fed by the image: keep fp32 (default) or convert")
    p.add_argument("--dense", default=d.dense, choices=["keep", "dsconv"],
                   help="fully connected layers (Gemm/MatMul with constant weights): keep fp32 "
                        "(default) or run them as 1x1 DSConv layers")
    p.add_argument("--signed-mantissa", action="store_true",
                   help="use signed mantissas even for inputs known to be >= 0 (after ReLU)")
    p.add_argument("--skip", nargs="+", default=[], metavar="NAME",
                   help="ONNX Conv node names to keep in fp32")


def config_from_args(args) -> DSConvConfig:
    """The :class:`DSConvConfig` of the scheme options."""
    bits = DSConvConfig().bits if args.bits == "auto" else args.bits     # auto: resolved per layer later
    return DSConvConfig(bits=bits, block=args.block, mantissa=args.mantissa, fit=args.fit,
                        scale_dtype=args.scale_dtype, first_layer=args.first_layer,
                        unsigned_after_relu=not args.signed_mantissa, skip=tuple(args.skip),
                        dense=args.dense)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
