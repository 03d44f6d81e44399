"""The data options of ``eval`` and ``adapt``: a built-in data set, a folder of images or the user's
own array (``--inputs X.npy``), the preprocessing of images (``--mean/--std/--scale/--size/--layout``),
and the samples they give."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError

FASHION = "fashion-mnist"
FASHION_UNLABELLED = "fashion-mnist-unlabelled"


def model_input(model_path: str) -> tuple[list[int], str]:
    """(full input shape incl. the batch, dtype) of the model's first input."""
    from ..frontend.onnx import load_onnx

    loaded = load_onnx(model_path)
    name = next(iter(loaded.input_shapes))
    return list(loaded.input_shapes[name]), loaded.input_dtypes[name]


def input_shape(model_path: str) -> list[int]:
    return model_input(model_path)[0][1:]


def take_first(x, limit, what):
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: must be >= 1")
        x = x[:limit]
    return x


def add_data_options(p, choices, default_crops):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", choices=choices,
                     help=f"a built-in data set ({', '.join(choices)})")
    src.add_argument("--images", metavar="DIR",
                     help="a folder of images (jpg/png/...): centre crop + --crops seeded random crops "
                          "each, resized to the model's input")
    src.add_argument("--inputs", metavar="X.npy",
                     help="your own samples: a .npy array the model's input accepts (any leading count; "
                          "taken as it is, already preprocessed)")
    p.add_argument("--crops", type=int, default=default_crops,
                   help=f"random crops per image with --images (default {default_crops})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    g = p.add_argument_group("preprocessing of --data / --images (images decoded to [0, 1], then in this order)")
    g.add_argument("--size", default=None, metavar="H[,W]",
                   help="resize to H x W (bilinear; default: the model's input size)")
    g.add_argument("--scale", type=float, default=None, help="multiply by S (e.g. 255 for a [0, 255] model)")
    g.add_argument("--mean", default=None, metavar="M[,M2,M3]",
                   help="subtract the mean (one value, or one per channel)")
    g.add_argument("--std", default=None, metavar="S[,S2,S3]", help="divide by the std (one or per channel)")
    g.add_argument("--layout", default=None, type=str.upper, choices=["NCHW", "NHWC"],
                   help="the model's input layout (default NCHW)")


def preprocess(args):
    """The :class:`~dsconv_tvm.accuracy.inputs.Preprocess` of the options; they do not apply to --inputs."""
    from ..accuracy.inputs import Preprocess

    pre = Preprocess.from_options(args.mean, args.std, args.scale, args.size, args.layout)
    if getattr(args, "inputs", None) and not pre.is_default:
        raise DataError("--mean/--std/--scale/--size/--layout preprocess --data and --images; "
                        "--inputs arrays are taken as they are (preprocess them before saving)")
    return pre


def builtin(x: np.ndarray, args, model_path: str) -> np.ndarray:
    """A built-in data set's images (NCHW in [0, 1]) through the preprocessing options, checked
    against the model's input."""
    pre = preprocess(args)
    out = pre.apply(x) if not pre.is_default else x
    shape, _ = model_input(model_path)
    if list(out.shape[1:]) != shape[1:]:
        raise DataError(f"--data {args.data}: its samples have shape {list(out.shape[1:])} after preprocessing "
                        f"({pre.describe()}); the model takes {shape[1:]}: use --size/--layout")
    return out


def user_inputs(args, model_path: str, what: str = "--inputs") -> np.ndarray:
    from ..accuracy.inputs import load_inputs

    preprocess(args)
    shape, dtype = model_input(model_path)
    return load_inputs(args.inputs, shape, dtype, what)


def images(args, model):
    from ..accuracy.images import label_from_name, list_images, load_images

    if args.crops < 0:
        raise ConfigError(f"--crops {args.crops}: must be >= 0")
    pre = preprocess(args)
    x, names, src = load_images(args.images, pre.image_shape(input_shape(model)), args.crops, args.seed)
    if not pre.is_default:
        x = pre.apply(x)
    return x, names, src, [label_from_name(p) for p in list_images(args.images)]
