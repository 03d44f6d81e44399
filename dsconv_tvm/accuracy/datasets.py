"""Numpy-only reader for the Fashion-MNIST data set (IDX files, gzip-compressed).

The Debian package ``dataset-fashion-mnist`` installs the four files under
``/usr/share/datasets/fashion-mnist``; the environment variable ``DSCONV_FASHION_MNIST`` overrides it.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from ..errors import DSConvError, ModelError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Read one gzip-compressed IDX file and return its uint8 array with the stored shape."""
    if not os.path.isfile(path):
        raise DSConvError(f"Fashion-MNIST file {path} is missing; install it with: "
                          "apt-get install dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = magic & 0xFF
    if len(data) < 4 * (1 + ndim) or int(np.frombuffer(data, dtype=">u4", count=1)[0]) != magic:
        raise DSConvError(f"{path} is not an IDX file with magic number {magic:#010x}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 * (1 + ndim))
    if body.size != int(np.prod(shape)):
        raise DSConvError(f"{path} holds {body.size} bytes of data, expected {int(np.prod(shape))} for shape {shape}")
    return body.reshape(shape)


def _check_split(split: str) -> None:
    if split not in _PREFIX:
        raise DSConvError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")


def _root(root: str | None) -> str:
    return root or os.environ.get("DSCONV_FASHION_MNIST") or DEFAULT_ROOT


def load_fashion_mnist_images(split: str = "train", root: str | None = None) -> np.ndarray:
    """The images of one split only, float32 (N, 1, 28, 28) in [0, 1]: the label file is never opened
    (what unlabelled adaptation reads)."""
    _check_split(split)
    images = _read_idx(os.path.join(_root(root), f"{_PREFIX[split]}-images-idx3-ubyte.gz"), _IMAGES_MAGIC)
    return (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def load_fashion_mnist(split: str = "test", root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of Fashion-MNIST.

    Returns ``(images, labels)``: images float32 of shape (N, 1, 28, 28) scaled to [0, 1], labels int64 (N,).
    ``split`` is ``"train"`` (60 000 images) or ``"test"`` (10 000 images).
    """
    x = load_fashion_mnist_images(split, root)
    labels = _read_idx(os.path.join(_root(root), f"{_PREFIX[split]}-labels-idx1-ubyte.gz"), _LABELS_MAGIC)
    if x.shape[0] != labels.shape[0]:
        raise DSConvError(f"Fashion-MNIST {split}: {x.shape[0]} images but {labels.shape[0]} labels")
    return x, labels.astype(np.int64)


def check_samples(model_path: str, loaded, x: np.ndarray) -> tuple[str, list[int]]:
    """(input name, sample shape) of a loaded model's first input; one clear error when the samples
    ``x`` do not have that shape."""
    in_name = next(iter(loaded.input_shapes))
    want = list(loaded.input_shapes[in_name][1:])
    if list(x.shape[1:]) != want:
        raise ModelError(f"{model_path}: input {in_name!r} takes samples of shape {want}, "
                         f"the data has {list(x.shape[1:])}")
    return in_name, want
