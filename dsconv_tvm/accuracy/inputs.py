"""The user's own data: ``--inputs X.npy`` / ``--labels Y.npy`` arrays, and the preprocessing of image
folders and built-in data sets (``--scale``, ``--mean``, ``--std``, ``--size``, ``--layout``).

Images (folders, Fashion-MNIST) are first decoded to float32 NCHW in [0, 1]; then, in this order,

    resized to --size (bilinear; default: the model's input size),
    x = x * scale                      (--scale, default 1: a model that takes [0, 255] uses 255)
    x = (x - mean[c]) / std[c]         (--mean/--std: one value or one per channel; default 0 / 1)
    transposed to NHWC                 (--layout NHWC; default NCHW)

``--inputs X.npy`` is taken as it is (no preprocessing: it is what the model's input accepts); its
rank, its non-batch dimensions, its dtype and its values are checked against the model.  Every
problem is one :class:`DataError` sentence.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from ..scheme.metrics import first_non_finite

LAYOUTS = ("NCHW", "NHWC")


def _floats(text, what: str) -> tuple[float, ...]:
    if isinstance(text, (int, float)):
        return (float(text),)
    if isinstance(text, (list, tuple)):
        vals = tuple(float(v) for v in text)
    else:
        try:
            vals = tuple(float(v) for v in str(text).replace(",", " ").split())
        except ValueError as exc:
            raise DataError(f"{what} {text!r}: expected a number or a comma-separated list of numbers") from exc
    if not vals or not all(math.isfinite(v) for v in vals):
        raise DataError(f"{what} {text!r}: expected finite numbers")
    return vals


@dataclass(frozen=True)
class Preprocess:
    """How decoded images in [0, 1] (NCHW) become the model's input."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    size: tuple[int, int] | None = None
    layout: str = "NCHW"

    @classmethod
    def from_options(cls, mean=None, std=None, scale=None, size=None, layout=None) -> "Preprocess":
        m = _floats(mean, "--mean") if mean is not None else (0.0,)
        s = _floats(std, "--std") if std is not None else (1.0,)
        if any(v == 0 for v in s):
            raise DataError(f"--std {std!r}: must not be 0")
        sc = 1.0 if scale is None else float(scale)
        if not math.isfinite(sc) or sc == 0:
            raise DataError(f"--scale {scale!r}: must be a finite non-zero number")
        hw = None
        if size is not None:
            try:
                vals = [int(v) for v in str(size).lower().replace("x", ",").split(",") if v.strip()]
            except ValueError as exc:
                raise DataError(f"--size {size!r}: expected H or H,W (e.g. 224 or 224,224)") from exc
            if len(vals) not in (1, 2) or any(v < 1 for v in vals):
                raise DataError(f"--size {size!r}: expected H or H,W with positive integers")
            hw = (vals[0], vals[-1])
        lay = (layout or "NCHW").upper()
        if lay not in LAYOUTS:
            raise DataError(f"--layout {layout!r}: must be NCHW or NHWC")
        return cls(m, s, sc, hw, lay)

    @property
    def is_default(self) -> bool:
        return self == Preprocess()

    def image_shape(self, model_shape) -> tuple[int, int, int]:
        """(C, H, W) to decode images to, from the model's per-sample input shape and the options."""
        dims = [int(d) for d in model_shape]
        if len(dims) != 3:
            raise DataError(f"the model's input has per-sample shape {dims}; images need 3 dims "
                            f"({'C,H,W' if self.layout == 'NCHW' else 'H,W,C'})")
        c, h, w = dims if self.layout == "NCHW" else (dims[2], dims[0], dims[1])
        if self.size is not None:
            h, w = self.size
        return c, h, w

    def apply(self, x: np.ndarray) -> np.ndarray:
        """NCHW float32 images in [0, 1] -> the model input (resize, scale, normalise, layout)."""
        x = np.asarray(x, np.float32)
        if self.size is not None and tuple(x.shape[2:]) != tuple(self.size):
            x = resize(x, self.size)
        c = x.shape[1]
        for what, vals in (("--mean", self.mean), ("--std", self.std)):
            if len(vals) not in (1, c):
                raise DataError(f"{what} has {len(vals)} values; the images have {c} channels (give 1 or {c})")
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        x = ((x * np.float32(self.scale) - mean) / std).astype(np.float32)
        if self.layout == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return x

    def describe(self) -> str:
        parts = []
        if self.size is not None:
            parts.append(f"resized to {self.size[0]}x{self.size[1]}")
        if self.scale != 1.0:
            parts.append(f"x {self.scale:g}")
        if self.mean != (0.0,) or self.std != (1.0,):
            parts.append(f"(x - {','.join(f'{v:g}' for v in self.mean)}) / {','.join(f'{v:g}' for v in self.std)}")
        if self.layout != "NCHW":
            parts.append(self.layout)
        return ", ".join(parts) or "[0, 1], NCHW"


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of NCHW float32 images (Pillow, per channel, in float)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError("--size needs Pillow: pip install pillow") from exc
    h, w = size
    out = np.empty((x.shape[0], x.shape[1], h, w), np.float32)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[n, c] = np.asarray(Image.fromarray(x[n, c], mode="F").resize((w, h), Image.BILINEAR))
    return out


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"{what} {path}: no such file")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001  (ValueError, OSError, pickle refusal ...)
        raise DataError(f"{what} {path}: not a numpy .npy array ({type(exc).__name__}: {exc})") from exc
    if isinstance(a, np.lib.npyio.NpzFile):
        raise DataError(f"{what} {path}: an .npz archive; save one array with numpy.save")
    return a


def load_inputs(path: str, model_shape, model_dtype: str = "float32", what: str = "--inputs") -> np.ndarray:
    """An array of model inputs, checked: rank = the model input's, every non-batch dimension equal
    to the model's, a floating dtype (cast to ``model_dtype``), at least one sample, no NaN/Inf."""
    a = _load_npy(path, what)
    want = [int(d) for d in model_shape]
    if a.ndim != len(want):
        raise DataError(f"{what} {path}: shape {list(a.shape)} has rank {a.ndim}; the model's input is rank "
                        f"{len(want)} (N, {', '.join(map(str, want[1:]))})")
    if list(a.shape[1:]) != want[1:]:
        raise DataError(f"{what} {path}: shape {list(a.shape)} does not fit the model's input "
                        f"(N, {', '.join(map(str, want[1:]))})")
    if a.shape[0] < 1:
        raise DataError(f"{what} {path}: holds no samples (shape {list(a.shape)})")
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(f"{what} {path}: dtype {a.dtype}; the model takes {model_dtype}: give floating-point "
                        f"values, preprocessed as the model expects")
    found = first_non_finite(a)
    if found is not None:
        idx, value, count = found
        raise DataError(f"{what} {path}: contains {value} at index {list(idx)} ({count} non-finite values)")
    return np.ascontiguousarray(a.astype(model_dtype, copy=False))


def load_labels(path: str, count: int) -> np.ndarray:
    """Integer class labels, one per input sample."""
    a = _load_npy(path, "--labels")
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DataError(f"--labels {path}: shape {list(a.shape)}; expected one integer label per sample (N,)")
    if len(a) != count:
        raise DataError(f"--labels {path}: {len(a)} labels for {count} input samples")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise DataError(f"--labels {path}: dtype {a.dtype} with non-integer values; expected class indices")
    elif not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"--labels {path}: dtype {a.dtype}; expected integer class indices")
    if (a < 0).any():
        raise DataError(f"--labels {path}: negative label {int(a.min())}")
    return a.astype(np.int64)
