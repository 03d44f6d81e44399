"""``dsconv-tvm adapt``: fit the KDS scales to the fp32 model on unlabelled data
(:func:`dsconv_tvm.accuracy.adapt.adapt_model`)."""

from __future__ import annotations

from ..fileio import check_output_path
from .common import add_scheme_options, config_from_args, log
from .data import FASHION_UNLABELLED, add_data_options, builtin, images, take_first, user_inputs
from .mixed import resolve_bits


def add_parser(sub) -> None:
    a = sub.add_parser("adapt", help="fit the KDS scales to the fp32 model on unlabelled data",
                       description="Layer by layer, re-round the integer weights (GPTQ-style) and fit "
                                   "the KDS scales and bias by least squares so that each DSConv layer's "
                                   "output matches the fp32 teacher's on unlabelled inputs (no label is "
                                   "read; --data fashion-mnist-unlabelled uses the first --limit "
                                   "(default 1024) training images). Writes an ONNX model: compile it with the "
                                   "same --bits/--block/--mantissa (and --fit l2) to get the adapted "
                                   "DSConv model; the packed integer format is unchanged. With --bits "
                                   "auto the per-layer bits are chosen on the same samples and stored "
                                   "in the model: compile/eval it with --bits auto to use them.")
    a.add_argument("model", help="the ONNX model file")
    add_data_options(a, [FASHION_UNLABELLED], 4)
    a.add_argument("-o", "--output", required=True, help="the adapted ONNX model to write")
    a.add_argument("--rounding", default="gptq", choices=["gptq", "nearest"],
                   help="the integer weights: gptq = re-round each layer's weights against its input's "
                        "second moment (kept per layer only where the fitted error is lower; default), "
                        "nearest = keep the l2 fit's integers and fit the scales only")
    add_scheme_options(a, mixed=True)
    a.set_defaults(func=cmd_adapt, limit_default=1024)


def cmd_adapt(args) -> int:
    from ..accuracy.adapt import adapt_model, format_adapt
    from ..accuracy.probes import require_onnxruntime

    require_onnxruntime()
    config = config_from_args(args)
    check_output_path(args.output, inputs=[args.model, getattr(args, "images", None),
                                           getattr(args, "inputs", None)])
    limit = args.limit
    if args.inputs:
        x = take_first(user_inputs(args, args.model), limit, "samples")
    elif args.data:
        from ..accuracy.datasets import load_fashion_mnist_images

        x = load_fashion_mnist_images("train")          # images only: the label file is never opened
        x = take_first(x, limit if limit is not None else args.limit_default, "images")
        x = builtin(x, args, args.model)
    else:
        x, _, _, _ = images(args, args.model)
        x = take_first(x, limit, "images")
    # --bits auto: the sensitivity is measured on the same unlabelled samples adapt fits on
    config, _ = resolve_bits(args, args.model, config, x)
    res = adapt_model(args.model, x, config, args.output, log=log, rounding=args.rounding)
    print(format_adapt(res))
    return 0
