"""Error metrics and value checks shared by the whole package (each formula written once)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import NumericsError


def first_non_finite(x: np.ndarray):
    """(index, value, count) of the first NaN/Inf of ``x`` and how many there are; None if none."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return idx, x[idx], int(bad.sum())


def check_finite(x: np.ndarray, what: str) -> None:
    """Raise :class:`NumericsError` naming the first NaN/Inf of ``x`` (``what`` names the tensor)."""
    found = first_non_finite(x)
    if found is not None:
        idx, value, _ = found
        raise NumericsError(f"{what} contains NaN/Inf at index {idx} (value {value!r}); "
                            "values must be finite")


def sqnr_db(ref, out) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - out)^2)``;
    +inf if exact, -inf if the reference is all zeros (and the output is not)."""
    ref64, out64 = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    if ref64.shape != out64.shape:
        raise NumericsError(f"shapes differ: {ref64.shape} vs {out64.shape}")
    noise = float(np.sum((ref64 - out64) ** 2))
    if noise == 0.0:
        return math.inf
    sig = float(np.sum(ref64 * ref64))
    return -math.inf if sig == 0.0 else 10.0 * math.log10(sig / noise)
