"""``dsconv-tvm``: the command line (verbs after tvmc: compile, run, targets).

Exit codes: 0 success; 2 a problem with the input (bad file, option, target, output path: one
line on stderr, no traceback); 1 an unexpected internal error (traceback shown).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from .errors import DSConvError, ModelError, NumericsError
from .outputs import atomic_write, check_output_path

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


def _add_scheme_options(p: argparse.ArgumentParser) -> None:
    from .config import DSConvConfig

    d = DSConvConfig()
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


def _config_from_args(args):
    from .config import DSConvConfig

    return DSConvConfig(bits=args.bits, block=args.block, mantissa=args.mantissa, fit=args.fit,
                        scale_dtype=args.scale_dtype, first_layer=args.first_layer,
                        unsigned_after_relu=not args.signed_mantissa, skip=tuple(args.skip),
                        dense=args.dense)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsconv-tvm",
        description="Compile pre-trained ONNX CNNs with DSConv: low-bit block-scaled integer "
                    "convolutions, through Apache TVM, into a .so for x86 or ARM.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"dsconv-tvm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    c = sub.add_parser("compile", help="ONNX model -> DSConv .so for a target",
                       description="Rewrite every eligible conv of an ONNX model into DSConv and "
                                   "compile it into a .so for TARGET (cross-compiling for ARM).")
    c.add_argument("model", help="the ONNX model file")
    c.add_argument("--target", "-t", default="x86",
                   help="target name (see `dsconv-tvm targets`; default x86 = this host)")
    c.add_argument("-o", "--output", required=True, help="the .so file to write")
    c.add_argument("--input-shapes", default=None,
                   help='static input shapes, e.g. "input:[1,1,28,28]" (default: batch 1)')
    _add_scheme_options(c)
    c.add_argument("--no-check", action="store_true",
                   help="skip the fp32-vs-DSConv agreement check on a sample input")
    c.add_argument("--report-json", default=None, help="also write the per-layer report as JSON")
    c.add_argument("--tuning-db", default=None, metavar="DIR",
                   help="MetaSchedule database from `dsconv-tvm tune` (default: the shipped "
                        "schedules/<target>/ if any, else the default schedules)")
    c.add_argument("--bundle", default=None, metavar="DIR",
                   help="also write DIR to copy to the board: the .so, the TVM runtime libraries for "
                        "the target, the C++ example's source, a sample input and a README.txt")
    c.add_argument("--force", action="store_true", help="with --bundle: replace a non-empty DIR")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a host .so on inputs from a .npy file",
                       description="Run a .so compiled for this host on X.npy. X's leading "
                                   "dimension may be any multiple of the compiled batch.")
    r.add_argument("library", help="the compiled .so")
    r.add_argument("--input", "-i", required=True, help="input tensor (.npy, float32)")
    r.add_argument("--output", "-o", default=None, help="write the outputs to this .npy")
    r.add_argument("--top-k", type=int, default=5, help="classes printed per sample (default 5)")
    r.set_defaults(func=cmd_run)

    tu = sub.add_parser("tune", help="auto-tune a model for a target (MetaSchedule + XGBoost)",
                        description="Tune every TensorIR task of the DSConv model (DSConv layers and "
                                    "the ops kept in fp32) with MetaSchedule's evolutionary search and "
                                    "XGBoost cost model. Records are appended to the database in "
                                    "--work-dir as they are measured (an interrupted run keeps them); "
                                    "compile with --tuning-db WORK_DIR to use them.")
    tu.add_argument("model", help="the ONNX model file")
    tu.add_argument("--target", "-t", default="x86", help="target name (default x86 = this host)")
    tu.add_argument("--trials", type=int, default=64, help="measurement trials in total (default 64)")
    tu.add_argument("--trials-per-task", type=int, default=None, metavar="K",
                    help="instead of --trials: K trials for each task tuned (a budget that grows "
                         "with the number of distinct layers; about 8-16 is enough for DSConv)")
    tu.add_argument("--trials-per-iter", type=int, default=16, help="candidates per search round")
    tu.add_argument("--work-dir", default="tuning", help="database directory (default ./tuning)")
    tu.add_argument("--input-shapes", default=None, help='static input shapes, e.g. "input:[1,1,28,28]"')
    tu.add_argument("--tracker", default=None, metavar="HOST:PORT",
                    help="measure on a board registered at this TVM RPC tracker")
    tu.add_argument("--key", default=None, help="the board's key at the tracker")
    tu.add_argument("--timeout", type=float, default=120, help="RPC session timeout, seconds")
    tu.add_argument("--fp32", action="store_true",
                    help="tune the fp32 model as imported (no DSConv rewrite): the baseline, tuned "
                         "with the same tuner; build it with tools/benchmark.py")
    _add_scheme_options(tu)
    tu.set_defaults(func=cmd_tune)

    t = sub.add_parser("targets", help="list the known targets",
                       description="List the targets (targets/*.json) and their toolchains.")
    t.set_defaults(func=cmd_targets)

    ri = sub.add_parser("runtime-info", help="where the TVM runtime (headers, libraries) for C++ is",
                        description="Print where the TVM runtime headers and libraries for TARGET are "
                                    "(downloading the aarch64 runtime once), for building C++ programs "
                                    "that load the compiled .so (see tools/cpp_example).")
    ri.add_argument("--target", "-t", default="x86", help="target name (default x86 = this host)")
    what = ri.add_mutually_exclusive_group()
    for flag, dest_value, text in (("--cmake-dir", "cmake_dir", "the directory for -DDSCONV_TVM_RUNTIME_DIR "
                                                                "(holds DSConvTVMRuntimeConfig.cmake)"),
                                   ("--include-dir", "include_dir", "the include directory"),
                                   ("--lib-dir", "lib_dir", "the directory of libtvm_runtime.so, libtvm_ffi.so"),
                                   ("--json", "json", "everything as JSON")):
        what.add_argument(flag, dest="what", action="store_const", const=dest_value, help=text)
    ri.set_defaults(func=cmd_runtime_info)

    from .remote import add_parsers as _add_remote_parsers
    _add_remote_parsers(sub)  # bench, tracker, board-server (dsconv_tvm/remote.py)
    from .cli_accuracy import add_parsers as _add_accuracy_parsers
    _add_accuracy_parsers(sub, _add_scheme_options)  # eval, adapt (dsconv_tvm/cli_accuracy.py)
    return parser


# ---------------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_summary(result) -> str:
    cfg = result.config
    rep = result.report
    lines = [f"target    {result.target}",
             "inputs    " + ", ".join(f"{k} {v}" for k, v in result.input_shapes.items()),
             f"scheme    W{cfg.bits} B={cfg.block} m={cfg.mantissa} (fit {cfg.fit}, scales {cfg.scale_dtype}, "
             f"first layer {cfg.first_layer}, depthwise {cfg.depthwise})"]
    if result.folded_bn:
        lines.append(f"BN        {len(result.folded_bn)} BatchNormalization folded into convs")
    lines.append(f"layers    {len(rep.converted)} converted to DSConv, {len(rep.kept)} kept in fp32")
    hdr = f"  {'layer':<28} {'weight':<16} {'status':<8} {'input':<9} {'SQNR dB':>8} {'fp32':>9} {'deployed':>9}  note"
    lines.append(hdr)
    for layer in rep.layers:
        shape = "x".join(str(d) for d in layer.weight_shape)
        status = "dsconv" if layer.converted else "fp32"
        mant = ("u" if layer.unsigned else "s") + str(cfg.mantissa) if layer.converted else "-"
        sq = f"{layer.sqnr_db:8.2f}" if layer.converted else f"{'-':>8}"
        note = "+".join(layer.fused) if layer.converted else layer.reason
        if layer.converted and result.tuned_functions:
            note += (" " if note else "") + ("[tuned]" if _layer_tuned(layer, result) else "[default]")
        lines.append(f"  {layer.name[:28]:<28} {shape:<16} {status:<8} {mant:<9} {sq} "
                     f"{_fmt_bytes(layer.fp32_bytes):>9} {_fmt_bytes(layer.deployed_bytes):>9}  {note}")
    fp32 = sum(layer.fp32_bytes for layer in rep.layers)
    dep = sum(layer.deployed_bytes for layer in rep.layers)
    conv_fp32 = sum(layer.fp32_bytes for layer in rep.converted)
    conv_dep = sum(layer.deployed_bytes for layer in rep.converted)
    if rep.layers:
        lines.append(f"weights   conv weights fp32 {_fmt_bytes(fp32)} -> deployed {_fmt_bytes(dep)} "
                     f"({dep / max(fp32, 1):.3f}x); converted layers alone {conv_dep / max(conv_fp32, 1):.3f}x")
    for note in result.notes:
        lines.append(note)
    tuned = sum(_layer_tuned(layer, result) for layer in rep.converted)
    lines.append(f"schedules {result.schedules}: {tuned} of {len(rep.converted)} DSConv layers tuned, "
                 f"{len(rep.converted) - tuned} with the default schedule")
    a = result.agreement
    if a is not None:
        lines.append(f"agreement fp32 (TVM) vs DSConv on a sample input, run with {a.where}: "
                     f"top-1 agree {a.top1_agree:.2f}, max |diff| {a.max_abs_diff:.4g}, "
                     f"rel. L2 error {a.rel_l2:.4g}")
    size = os.path.getsize(result.output) if os.path.exists(result.output) else 0
    lines.append(f"wrote     {result.output} ({_fmt_bytes(size)}) in {result.seconds:.1f} s")
    return "\n".join(lines)


def _layer_tuned(layer, result) -> bool:
    return layer.func_name in result.tuned_functions


def report_json(result) -> dict:
    return {
        "target": result.target, "config": result.config.to_dict(), "input_shapes": result.input_shapes,
        "layers": [{"name": l.name, "converted": l.converted, "reason": l.reason,
                    "weight_shape": list(l.weight_shape), "fp32_bytes": l.fp32_bytes,
                    "deployed_bytes": l.deployed_bytes,
                    "sqnr_db": None if not l.converted else round(l.sqnr_db, 3),
                    "unsigned_mantissa": l.unsigned, "fused": list(l.fused)} for l in result.report.layers],
        "agreement": None if result.agreement is None else vars(result.agreement),
    }


def cmd_compile(args) -> int:
    from .compiler import compile_model
    from .frontend import parse_input_shapes

    config = _config_from_args(args)
    shapes = parse_input_shapes(args.input_shapes)
    bundle = None
    if args.bundle:  # check DIR and fetch the target's runtime before the (long) compile
        from .bundle import prepare_bundle
        bundle = prepare_bundle(args.bundle, args.target, force=args.force, output=args.output,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.report_json:
        check_output_path(args.report_json)
    result = compile_model(args.model, args.target, args.output, config, shapes,
                           check=not args.no_check,
                           log=lambda m: print(m, file=sys.stderr, flush=True),
                           tuning_db=args.tuning_db)
    for note in result.notes:
        print(note, file=sys.stderr)
    result.notes = []
    print(format_summary(result))
    if args.report_json:
        data = json.dumps(report_json(result), indent=2).encode()
        atomic_write(args.report_json, lambda f: f.write(data))
    if bundle is not None:
        print(f"bundle    {bundle.write(result.output, result.input_shapes)}")
    return EXIT_OK


def cmd_tune(args) -> int:
    from .errors import ConfigError
    from .frontend import parse_input_shapes
    from .tuning import tune_model

    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: must be >= 1")
    if args.trials_per_task is not None and args.trials_per_task < 1:
        raise ConfigError(f"--trials-per-task {args.trials_per_task}: must be >= 1")
    if args.tracker and not args.key:
        raise ConfigError("--tracker needs --key (the board's key at the tracker)")
    if args.tracker and ":" not in args.tracker:
        raise ConfigError(f"--tracker {args.tracker!r}: expected HOST:PORT")
    result = tune_model(args.model, args.target, args.work_dir, _config_from_args(args),
                        parse_input_shapes(args.input_shapes), trials=args.trials,
                        trials_per_iter=args.trials_per_iter, trials_per_task=args.trials_per_task,
                        tracker=args.tracker, key=args.key,
                        timeout=args.timeout, log=lambda m: print(m, file=sys.stderr, flush=True),
                        dsconv=not args.fp32)
    if result.failures:
        lines = [l for l in result.first_error.splitlines() if l.strip()]
        print(f"warning: {result.failures} of {result.trials} candidates failed to build or run; first error: "
              f"{(lines[-1] if lines else '?')[:300]}", file=sys.stderr)
    from .tuning import convergence
    final, reach, n10 = convergence(result.history)
    print(f"tuned {len(result.tasks)} tasks with {result.trials} trials in {result.seconds:.0f} s; best total "
          f"{final:.3f} ms (the tasks' best kernels x calls per run), within 10 % of it after {n10} trials / "
          f"{reach:.0f} s")
    print(f"database  {os.path.abspath(result.work_dir)}  (compile with --tuning-db {result.work_dir})")
    return EXIT_OK


def cmd_run(args) -> int:
    import tvm

    from .evaluate import load_library
    from .targets import host_machine, library_machine

    machine = library_machine(args.library)
    if args.output:
        check_output_path(args.output)          # fail before running, not after
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
    if not np.all(np.isfinite(x)):
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise NumericsError(f"{args.input}: contains {x[idx]} at index {idx}; inputs must be finite")
    vm, shape = load_library(args.library)
    batch = shape[0]
    if x.ndim == len(shape) - 1 and list(x.shape) == list(shape[1:]):
        x = x[None]
    if x.ndim != len(shape) or list(x.shape[1:]) != list(shape[1:]) or x.shape[0] % batch:
        raise ModelError(f"{args.input}: shape {list(x.shape)} does not fit the compiled input "
                         f"{list(shape)} (the leading dimension must be a multiple of {batch})")
    outs = []
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch):
        y = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i:i + batch])))
        outs.append(y.numpy())
    secs = time.perf_counter() - t0
    y = np.concatenate(outs, axis=0)
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


def cmd_runtime_info(args) -> int:
    from .runtime import main_info

    return main_info(args)


def cmd_targets(_args) -> int:
    from .targets import get_target, list_targets

    for name in list_targets():
        spec = get_target(name)
        cc = spec.cross_compiler or "host g++"
        print(f"{name:<12} {spec.description}  [{cc}]")
    return EXIT_OK


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
