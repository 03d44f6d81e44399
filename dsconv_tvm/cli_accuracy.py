"""The ``eval`` and ``adapt`` verbs of ``dsconv-tvm`` (added to the parser by :func:`add_parsers`)."""

from __future__ import annotations

import json
import sys

import numpy as np

from .errors import ConfigError
from .outputs import atomic_write, check_output_path

FASHION = "fashion-mnist"
FASHION_UNLABELLED = "fashion-mnist-unlabelled"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _input_shape(model_path: str) -> list[int]:
    from .frontend import load_onnx

    loaded = load_onnx(model_path)
    return list(next(iter(loaded.input_shapes.values()))[1:])


def _limit(x, limit, what):
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: must be >= 1")
        x = x[:limit]
    return x


def _add_data_options(p, choices, default_crops):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", choices=choices,
                     help=f"a built-in data set ({', '.join(choices)})")
    src.add_argument("--images", metavar="DIR",
                     help="a folder of images (jpg/png/...): centre crop + --crops seeded random crops "
                          "each, resized to the model's input")
    p.add_argument("--crops", type=int, default=default_crops,
                   help=f"random crops per image with --images (default {default_crops})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")


def add_parsers(sub, add_scheme_options) -> None:
    e = sub.add_parser("eval", help="accuracy of the compiled DSConv model vs fp32 on data",
                       description="Compile MODEL for this host with the given scheme, run the fp32 "
                                   "model (ONNX Runtime) and the DSConv .so (the real integer kernels) "
                                   "on the data, and report top-1/top-5 (with labels), top-1 agreement, "
                                   "fp32 top-1 within DSConv top-5 and the per-layer output SQNR.")
    e.add_argument("model", help="the ONNX model file")
    _add_data_options(e, ["fashion-mnist", "fashion-mnist-train"], 0)
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
    add_scheme_options(e)
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("adapt", help="fit the KDS scales to the fp32 model on unlabelled data",
                       description="Layer by layer, re-round the integer weights (GPTQ-style) and fit "
                                   "the KDS scales and bias by least squares so that each DSConv layer's "
                                   "output matches the fp32 teacher's on unlabelled inputs (no label is "
                                   "read; --data fashion-mnist-unlabelled uses the first --limit "
                                   "(default 1024) training images). Writes an ONNX model: compile it with the "
                                   "same --bits/--block/--mantissa (and --fit l2) to get the adapted "
                                   "DSConv model; the packed integer format is unchanged.")
    a.add_argument("model", help="the ONNX model file")
    _add_data_options(a, [FASHION_UNLABELLED], 4)
    a.add_argument("-o", "--output", required=True, help="the adapted ONNX model to write")
    a.add_argument("--rounding", default="gptq", choices=["gptq", "nearest"],
                   help="the integer weights: gptq = re-round each layer's weights against its input's "
                        "second moment (kept per layer only where the fitted error is lower; default), "
                        "nearest = keep the l2 fit's integers and fit the scales only")
    add_scheme_options(a)
    a.set_defaults(func=cmd_adapt, limit_default=1024)


def _images(args, model):
    from .images import label_from_name, list_images, load_images

    if args.crops < 0:
        raise ConfigError(f"--crops {args.crops}: must be >= 0")
    x, names, src = load_images(args.images, _input_shape(model), args.crops, args.seed)
    return x, names, src, [label_from_name(p) for p in list_images(args.images)]


def cmd_eval(args) -> int:
    from .accuracy import evaluate, format_eval
    from .cli import _config_from_args

    config = _config_from_args(args)
    if args.json:
        check_output_path(args.json)
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be >= 1")
    labels = None
    if args.data:
        from .datasets import load_fashion_mnist

        x, labels = load_fashion_mnist("train" if args.data.endswith("train") else "test")
        x, labels = _limit(x, args.limit, "samples"), _limit(labels, args.limit, "labels")
        name = args.data
    else:
        x, _, src, file_labels = _images(args, args.model)
        if args.labels_from_names:
            missing = [i for i, lab in enumerate(file_labels) if lab is None]
            if missing:
                raise ConfigError(f"--labels-from-names: image #{missing[0]} of {args.images} has no "
                                  f"_<int> at the end of its name")
            labels = np.asarray(file_labels, np.int64)[src]
        x = _limit(x, args.limit, "samples")
        labels = None if labels is None else labels[:len(x)]
        name = f"{args.images} ({args.crops} random crops per image, seed {args.seed})"
    res = evaluate(args.model, x, labels, config, name, batch=args.batch,
                   sqnr_images=args.sqnr_images, log=_log, reference=args.reference)
    print(format_eval(res))
    if args.json:
        data = json.dumps(res.to_dict(), indent=2).encode()
        atomic_write(args.json, lambda f: f.write(data))
    return 0


def cmd_adapt(args) -> int:
    from .adapt import adapt_model, format_adapt
    from .cli import _config_from_args

    config = _config_from_args(args)
    check_output_path(args.output)
    limit = args.limit
    if args.data:
        from .datasets import load_fashion_mnist_images

        x = load_fashion_mnist_images("train")          # images only: the label file is never opened
        x = _limit(x, limit if limit is not None else args.limit_default, "images")
    else:
        x, _, _, _ = _images(args, args.model)
        x = _limit(x, limit, "images")
    res = adapt_model(args.model, x, config, args.output, log=_log, rounding=args.rounding)
    print(format_adapt(res))
    return 0
