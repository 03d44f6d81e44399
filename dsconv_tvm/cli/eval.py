"""``dsconv-tvm eval``: accuracy of the compiled DSConv model vs fp32 on data
(:func:`dsconv_tvm.accuracy.evaluate.evaluate`)."""

from __future__ import annotations

import json

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_write, check_output_path
from .common import add_scheme_options, config_from_args, log
from .data import add_data_options, builtin, images, model_input, preprocess, take_first, user_inputs
from .mixed import resolve_bits


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="accuracy of the compiled DSConv model vs fp32 on data",
                       description="Compile MODEL for this host with the given scheme, run the fp32 "
                                   "model (ONNX Runtime) and the DSConv .so (the real integer kernels) "
                                   "on the data, and report top-1/top-5 (with labels), top-1 agreement, "
                                   "fp32 top-1 within DSConv top-5 and the per-layer output SQNR.")
    e.add_argument("model", help="the ONNX model file")
    add_data_options(e, ["fashion-mnist", "fashion-mnist-train"], 0)
    e.add_argument("--labels-from-names", action="store_true",
                   help="with --images: the class index is the last _<int> of each file name "
                        "(e.g. imagenet_03_990.jpg)")
    e.add_argument("--reference", default=None, metavar="FP32.onnx",
                   help="the fp32 model to compare with (default MODEL; give the original model "
                        "when MODEL is the output of `adapt`)")
    e.add_argument("--batch", type=int, default=50, help="compiled batch size (default 50)")
    e.add_argument("--sqnr-images", type=int, default=32,
                   help="samples for the per-layer SQNR (a second, probe library; 0 = skip; default 32)")
    e.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    e.add_argument("--labels", default=None, metavar="Y.npy",
                   help="with --inputs: integer class labels, one per sample (top-1/top-5 against them)")
    e.add_argument("--calibration", default=None, metavar="X.npy",
                   help="with --bits auto: unlabelled model inputs for the per-layer sensitivity "
                        "(default: data-free, from the weights)")
    add_scheme_options(e, mixed=True)
    e.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..accuracy.evaluate import evaluate, format_eval
    from ..accuracy.inputs import load_inputs
    from ..accuracy.probes import require_onnxruntime

    require_onnxruntime()
    config = config_from_args(args)
    if args.json:
        check_output_path(args.json, inputs=[args.model, args.reference])
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be >= 1")
    labels = None
    if args.labels and not args.inputs:
        raise ConfigError("--labels goes with --inputs (the built-in data sets and --labels-from-names "
                          "bring their own labels)")
    if args.inputs:
        from ..accuracy.inputs import load_labels

        x = user_inputs(args, args.model)
        if args.labels:
            labels = take_first(load_labels(args.labels, len(x)), args.limit, "labels")
        x = take_first(x, args.limit, "samples")
        name = f"{args.inputs} ({len(x)} samples)"
    elif args.data:
        from ..accuracy.datasets import load_fashion_mnist

        x, labels = load_fashion_mnist("train" if args.data.endswith("train") else "test")
        x, labels = take_first(x, args.limit, "samples"), take_first(labels, args.limit, "labels")
        x = builtin(x, args, args.model)
        name = args.data + (f" ({preprocess(args).describe()})" if not preprocess(args).is_default else "")
    else:
        x, _, src, file_labels = images(args, args.model)
        if args.labels_from_names:
            missing = [i for i, lab in enumerate(file_labels) if lab is None]
            if missing:
                raise ConfigError(f"--labels-from-names: image #{missing[0]} of {args.images} has no "
                                  f"_<int> at the end of its name")
            labels = np.asarray(file_labels, np.int64)[src]
        x = take_first(x, args.limit, "samples")
        labels = None if labels is None else labels[:len(x)]
        name = f"{args.images} ({args.crops} random crops per image, seed {args.seed})"
    calibration = None
    if args.calibration:
        if args.bits != "auto":
            raise ConfigError("--calibration is used by --bits auto (the per-layer sensitivity); add --bits auto")
        shape, dtype = model_input(args.model)
        calibration = load_inputs(args.calibration, shape, dtype, "--calibration")
    config, _ = resolve_bits(args, args.model, config, calibration)
    res = evaluate(args.model, x, labels, config, name, batch=args.batch,
                   sqnr_images=args.sqnr_images, log=log, reference=args.reference)
    print(format_eval(res))
    if args.json:
        data = json.dumps(res.to_dict(), indent=2).encode()
        atomic_write(args.json, lambda f: f.write(data))
    return 0
