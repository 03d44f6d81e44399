"""Block floating point (BFP) activations, in numpy: the reference the compiled kernels must match.

For an activation X[n, c, y, x] and block size B, block g holds channels [g*B, min((g+1)*B, C)).
Every pixel (n, y, x) and block g share one exponent

    e[n, g, y, x] = clip(k, E_MIN, E_MAX)  where  max_{c in g} |X| in [2^(k-1), 2^k)

so every |x| < 2^e (a block of zeros gets E_MIN).  With f fractional bits the mantissa is

    M = clip(rint(X * 2^(f - e)), lo, hi),          X ~= M * 2^(e - f)

* signed mantissa (default): f = m - 1, M in [-2^(m-1), 2^(m-1) - 1];
* unsigned mantissa (input known to be >= 0, e.g. after ReLU): f = m, M in [0, 2^m - 1],
  which gives one more bit of precision at the same storage.

``rint`` rounds half to even (what ``llvm.nearbyint`` does in the compiled kernel).  Every step is
exact in float32 (the scale is a power of two), so the compiled kernel reproduces M and e bit for bit.
Channels are padded with zeros up to G*B so kernels never need a bounds check.
"""

from __future__ import annotations

import numpy as np

from ..errors import NumericsError
from .metrics import check_finite

E_MIN = -100  # exponents of tiny/zero blocks are raised to this (their mantissas round to 0)
E_MAX = 120   # exponents of absurdly large blocks are lowered to this (their mantissas saturate)


def fraction_bits(mantissa: int, unsigned: bool) -> int:
    """Number of fractional bits f of an m-bit mantissa (X ~= M * 2^(e - f))."""
    return mantissa if unsigned else mantissa - 1


def mantissa_range(mantissa: int, unsigned: bool) -> tuple[int, int]:
    """Inclusive integer range of an m-bit mantissa."""
    if unsigned:
        return 0, 2 ** mantissa - 1
    return -(2 ** (mantissa - 1)), 2 ** (mantissa - 1) - 1


def num_blocks(channels: int, block: int) -> int:
    return -(-channels // block)


def block_exponents(x: np.ndarray, block: int) -> np.ndarray:
    """Shared exponents e[n, g, y, x] (int32) of an NCHW float tensor."""
    n, c, h, w = x.shape
    g = num_blocks(c, block)
    a = np.abs(x.astype(np.float32))
    if g * block != c:
        a = np.concatenate([a, np.zeros((n, g * block - c, h, w), np.float32)], axis=1)
    amax = a.reshape(n, g, block, h, w).max(axis=2)
    _, k = np.frexp(amax)                       # amax = frac * 2^k, frac in [0.5, 1)
    k = np.where(amax > 0, k, E_MIN)
    return np.clip(k, E_MIN, E_MAX).astype(np.int32)


def bfp_quantize(x: np.ndarray, block: int, mantissa: int, unsigned: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Quantize an NCHW float tensor to BFP.

    Returns ``(M, e)``: integer mantissas int32 of shape (N, G*B, H, W) (channels >= C are 0) and
    exponents int32 of shape (N, G, H, W).
    """
    if x.ndim != 4:
        raise NumericsError(f"BFP quantization expects an NCHW tensor, got shape {x.shape}")
    check_finite(x, "activation tensor")
    n, c, h, w = x.shape
    g = num_blocks(c, block)
    e = block_exponents(x, block)
    f = fraction_bits(mantissa, unsigned)
    lo, hi = mantissa_range(mantissa, unsigned)
    xp = x.astype(np.float32)
    if g * block != c:
        xp = np.concatenate([xp, np.zeros((n, g * block - c, h, w), np.float32)], axis=1)
    inv = np.ldexp(np.float32(1), (f - e)).astype(np.float32)          # exact power of two
    inv_c = np.repeat(inv, block, axis=1)
    m = np.clip(np.rint(xp * inv_c), lo, hi).astype(np.int32)
    return m, e


def block_scales(e: np.ndarray, mantissa: int, unsigned: bool) -> np.ndarray:
    """float32 scales 2^(e - f) of each block (exact powers of two)."""
    return np.ldexp(np.float32(1), e - fraction_bits(mantissa, unsigned)).astype(np.float32)


def bfp_dequantize(m: np.ndarray, e: np.ndarray, block: int, mantissa: int, unsigned: bool,
                   channels: int | None = None) -> np.ndarray:
    """Float32 values M * 2^(e - f), cut back to ``channels`` channels."""
    s = np.repeat(block_scales(e, mantissa, unsigned), block, axis=1)
    out = (m.astype(np.float32) * s).astype(np.float32)
    return out if channels is None else out[:, :channels]


def bfp_roundtrip(x: np.ndarray, block: int, mantissa: int, unsigned: bool = False) -> np.ndarray:
    """x -> BFP -> float32: the activation the DSConv operator actually sees."""
    m, e = bfp_quantize(x, block, mantissa, unsigned)
    return bfp_dequantize(m, e, block, mantissa, unsigned, x.shape[1])
