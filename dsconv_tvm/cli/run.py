"""``dsconv-tvm run``: a host .so on inputs from a .npy file (:mod:`dsconv_tvm.execute.runner`)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from ..errors import ModelError
from ..fileio import atomic_write, check_output_path
from ..scheme.metrics import check_finite
from .common import EXIT_OK


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="run a host .so on inputs from a .npy file",
                       description="Run a .so compiled for this host on X.npy. X's leading "
                                   "dimension may be any multiple of the compiled batch.")
    r.add_argument("library", help="the compiled .so")
    r.add_argument("--input", "-i", required=True, help="input tensor (.npy, float32)")
    r.add_argument("--output", "-o", default=None, help="write the outputs to this .npy")
    r.add_argument("--top-k", type=int, default=5, help="classes printed per sample (default 5)")
    r.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from ..execute.runner import load_library, run_batches
    from ..host import host_machine, library_machine

    machine = library_machine(args.library)
    if args.output:
        check_output_path(args.output, inputs=[args.library, args.input])  # fail before running
    host = host_machine()
    if machine != host:
        raise ModelError(f"{args.library} is an {machine} library; `run` executes libraries built for "
                         f"this host ({host}) only")
    if not os.path.isfile(args.input):
        raise ModelError(f"{args.input}: no such file")
    try:
        x = np.load(args.input, allow_pickle=False)
    except Exception as exc:
        raise ModelError(f"{args.input}: not a .npy file ({exc})") from exc
    if x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.number):
            raise ModelError(f"{args.input}: dtype {x.dtype} is not numeric")
        x = x.astype(np.float32)
    check_finite(x, args.input)
    vm, shape = load_library(args.library)
    batch = shape[0]
    if x.ndim == len(shape) - 1 and list(x.shape) == list(shape[1:]):
        x = x[None]
    if x.ndim != len(shape) or list(x.shape[1:]) != list(shape[1:]) or x.shape[0] % batch:
        raise ModelError(f"{args.input}: shape {list(x.shape)} does not fit the compiled input "
                         f"{list(shape)} (the leading dimension must be a multiple of {batch})")
    t0 = time.perf_counter()
    y = run_batches(vm, batch, x)
    secs = time.perf_counter() - t0
    if args.output:
        atomic_write(args.output, lambda f: np.save(f, y))
        print(f"wrote {args.output} {list(y.shape)} ({x.shape[0]} samples, {secs * 1e3:.1f} ms)")
        return EXIT_OK
    flat = y.reshape(y.shape[0], -1)
    k = max(1, min(args.top_k, flat.shape[1]))
    for n, row in enumerate(flat):
        top = np.argsort(-row, kind="stable")[:k]
        print(f"sample {n}: " + "  ".join(f"{int(c)}:{row[c]:.4f}" for c in top))
    print(f"{x.shape[0]} samples in {secs * 1e3:.1f} ms", file=sys.stderr)
    return EXIT_OK
