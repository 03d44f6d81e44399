"""The data options of ``eval`` and ``adapt``: a built-in data set or a folder of images, and the
samples they give."""

from __future__ import annotations

from ..errors import ConfigError

FASHION = "fashion-mnist"
FASHION_UNLABELLED = "fashion-mnist-unlabelled"


def input_shape(model_path: str) -> list[int]:
    from ..frontend.onnx import load_onnx

    loaded = load_onnx(model_path)
    return list(next(iter(loaded.input_shapes.values()))[1:])


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
    p.add_argument("--crops", type=int, default=default_crops,
                   help=f"random crops per image with --images (default {default_crops})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")


def images(args, model):
    from ..accuracy.images import label_from_name, list_images, load_images

    if args.crops < 0:
        raise ConfigError(f"--crops {args.crops}: must be >= 0")
    x, names, src = load_images(args.images, input_shape(model), args.crops, args.seed)
    return x, names, src, [label_from_name(p) for p in list_images(args.images)]
