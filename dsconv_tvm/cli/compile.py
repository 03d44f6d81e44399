"""``dsconv-tvm compile``: ONNX model -> DSConv .so for a target (:func:`dsconv_tvm.driver.compile.compile_model`)."""

from __future__ import annotations

import json
import os

from ..errors import ConfigError
from ..fileio import atomic_write, check_output_name, check_output_path
from .common import EXIT_OK, add_scheme_options, config_from_args, fmt_bytes, log


def add_parser(sub) -> None:
    c = sub.add_parser("compile", help="ONNX model -> DSConv .so for a target",
                       description="Rewrite every eligible conv of an ONNX model into DSConv and "
                                   "compile it into a .so for TARGET (cross-compiling for ARM).")
    c.add_argument("model", help="the ONNX model file")
    c.add_argument("--target", "-t", default="x86",
                   help="target name (see `dsconv-tvm targets`; default x86 = this host)")
    c.add_argument("-o", "--output", required=True, help="the .so file to write")
    c.add_argument("--input-shapes", default=None,
                   help='static input shapes, e.g. "input:[1,1,28,28]" (default: batch 1)')
    add_scheme_options(c, mixed=True)
    c.add_argument("--calibration", default=None, metavar="X.npy",
                   help="with --bits auto: unlabelled model inputs (an array the model's input accepts) "
                        "for the per-layer sensitivity; without it the sensitivity is data-free")
    c.add_argument("--no-check", action="store_true",
                   help="skip the fp32-vs-DSConv agreement check on a sample input")
    c.add_argument("--report-json", default=None, help="also write the per-layer report as JSON")
    c.add_argument("--tuning-db", default=None, metavar="DIR",
                   help="MetaSchedule database from `dsconv-tvm tune` (default: the shipped "
                        "schedules/<key>/ for the target's kernels if any, else the default schedules)")
    c.add_argument("--bundle", default=None, metavar="DIR",
                   help="also write DIR to copy to the board: the .so, the TVM runtime libraries for "
                        "the target, the C++ example's source, a sample input and a README.txt")
    c.add_argument("--force", action="store_true", help="with --bundle: replace a non-empty DIR")
    c.set_defaults(func=cmd_compile)


def format_summary(result) -> str:
    cfg = result.config
    rep = result.report
    mixed = sorted({layer.bits for layer in rep.converted}) if cfg.layer_bits else []
    bits = ("mixed W" + "/W".join(map(str, mixed))) if mixed else f"W{cfg.bits}"
    lines = [f"target    {result.target}",
             "inputs    " + ", ".join(f"{k} {v}" for k, v in result.input_shapes.items()),
             f"scheme    {bits} B={cfg.block} m={cfg.mantissa} (fit {cfg.fit}, scales {cfg.scale_dtype}, "
             f"first layer {cfg.first_layer}, depthwise {cfg.depthwise})"]
    if result.folded_bn:
        lines.append(f"BN        {len(result.folded_bn)} BatchNormalization folded into convs")
    lines.append(f"layers    {len(rep.converted)} converted to DSConv, {len(rep.kept)} kept in fp32")
    hdr = (f"  {'layer':<28} {'weight':<16} {'status':<8} {'input':<9} {'SQNR dB':>8} {'fp32':>9} "
           f"{'deployed':>9} {'bits':>4}  note")
    lines.append(hdr)
    for layer in rep.layers:
        shape = "x".join(str(d) for d in layer.weight_shape)
        status = "dsconv" if layer.converted else "fp32"
        mant = ("u" if layer.unsigned else "s") + str(cfg.mantissa) if layer.converted else "-"
        sq = f"{layer.sqnr_db:8.2f}" if layer.converted else f"{'-':>8}"
        note = "+".join(layer.fused + tuple("bfp-" + b for b in layer.bfp)) if layer.converted else layer.reason
        if layer.converted and result.tuned_functions:
            note += (" " if note else "") + ("[tuned]" if _layer_tuned(layer, result) else "[default]")
        wbits = f"W{layer.bits}" if layer.converted else "-"
        lines.append(f"  {layer.name[:28]:<28} {shape:<16} {status:<8} {mant:<9} {sq} "
                     f"{fmt_bytes(layer.fp32_bytes):>9} {fmt_bytes(layer.deployed_bytes):>9} {wbits:>4}  {note}")
    fp32 = sum(layer.fp32_bytes for layer in rep.layers)
    dep = sum(layer.deployed_bytes for layer in rep.layers)
    conv_fp32 = sum(layer.fp32_bytes for layer in rep.converted)
    conv_dep = sum(layer.deployed_bytes for layer in rep.converted)
    if rep.layers:
        lines.append(f"weights   conv weights fp32 {fmt_bytes(fp32)} -> deployed {fmt_bytes(dep)} "
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
    lines.append(f"wrote     {result.output} ({fmt_bytes(size)}) in {result.seconds:.1f} s")
    return "\n".join(lines)


def _layer_tuned(layer, result) -> bool:
    return layer.func_name in result.tuned_functions


def report_json(result) -> dict:
    return {
        "target": result.target, "config": result.config.to_dict(), "input_shapes": result.input_shapes,
        "layers": [{"name": l.name, "converted": l.converted, "reason": l.reason,
                    "weight_shape": list(l.weight_shape), "fp32_bytes": l.fp32_bytes,
                    "deployed_bytes": l.deployed_bytes, "bits": l.bits if l.converted else None,
                    "sqnr_db": None if not l.converted else round(l.sqnr_db, 3),
                    "unsigned_mantissa": l.unsigned, "fused": list(l.fused),
                    "bfp": list(l.bfp)} for l in result.report.layers],
        "agreement": None if result.agreement is None else vars(result.agreement),
        "mixed_precision": None if result.allocation is None else result.allocation.to_dict(),
    }


def cmd_compile(args) -> int:
    from ..accuracy.inputs import load_inputs
    from ..accuracy.mixed import check_budget
    from ..driver.compile import compile_model
    from ..frontend.onnx import load_onnx, parse_input_shapes
    from .mixed import resolve_bits

    config = config_from_args(args)
    shapes = parse_input_shapes(args.input_shapes)
    check_output_name(args.output, inputs=[args.model], suffixes=[".so"])
    calibration = None
    if args.calibration:
        if args.bits != "auto":
            raise ConfigError("--calibration is used by --bits auto (the per-layer sensitivity); add --bits auto")
        loaded = load_onnx(args.model, shapes)
        name = next(iter(loaded.input_shapes))
        calibration = load_inputs(args.calibration, loaded.input_shapes[name], loaded.input_dtypes[name],
                                  "--calibration")
    config, allocation = resolve_bits(args, args.model, config, calibration, args.target, shapes)
    bundle = None
    if args.bundle:  # check DIR and fetch the target's runtime before the (long) compile
        from ..deploy.bundle import prepare_bundle
        bundle = prepare_bundle(args.bundle, args.target, force=args.force, output=args.output, log=log)
    if args.report_json:
        check_output_path(args.report_json, inputs=[args.model, args.output])
    result = compile_model(args.model, args.target, args.output, config, shapes,
                           check=not args.no_check,
                           log=log, tuning_db=args.tuning_db)
    result.allocation = allocation
    if allocation is not None:
        check_budget(result.report, allocation)
    for note in result.notes:
        log(note)
    result.notes = []
    print(format_summary(result))
    if args.report_json:
        data = json.dumps(report_json(result), indent=2).encode()
        atomic_write(args.report_json, lambda f: f.write(data))
    if bundle is not None:
        print(f"bundle    {bundle.write(result.output, result.input_shapes)}")
    return EXIT_OK
