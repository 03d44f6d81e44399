"""DSConv weight quantization (VQK + KDS): the numpy reference the compiled kernels are tested against.

A conv weight ``W[co, ci, kh, kw]`` is cut into *slices*: for every output channel ``co``, block
``g`` of ``B`` input channels (``[g*B, min((g+1)*B, CI))``, the last block may be partial) and
kernel tap ``(kh, kw)``.  Each slice ``w`` (a vector of at most ``B`` numbers) becomes

    w ~= xi * q,    q integers clamped to [-2**(b-1), 2**(b-1) - 1]   (VQK, int8 storage)
                    xi one float per slice                            (KDS, float32 storage)

Given ``q`` the best ``xi`` is the closed-form least-squares solution ``xi = <w, q> / <q, q>``, and
given ``xi`` the best ``q`` is ``clip(rint(w / xi))`` (elementwise nearest representable integer).

* ``fit="l2"`` (the paper's, the default): the grid step ``t0 = -a / 2**(b-1)`` maps the largest-magnitude
  element ``a`` onto ``-2**(b-1)`` (sign absorbed into xi), ``q = clip(rint(w / t0))``, then the
  least-squares ``xi``.
* ``fit="mse"``: the same with a clipped step ``t = alpha * t0`` for every ``alpha`` in
  :func:`alpha_grid` (alpha = 1 is the l2 solution), keeping per slice the alpha with the smallest
  ``||w - xi q||^2``, then :data:`REFINE_STEPS` alternating refinements (``q <- clip(rint(w/xi))``,
  ``xi <- LS``), each of which cannot increase the error.  Per slice the result is never worse than
  ``fit="l2"`` (both are evaluated with the deployed xi and the better one is kept).

All slices are processed at once (vectorized), in chunks of output channels to bound memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import BITS_RANGE, FITS, SCALE_DTYPES
from ..errors import ConfigError, NumericsError
from .metrics import check_finite

# Clipping-scale grid of fit="mse": ALPHA_POINTS values linspace(alpha_min(b), 1, 40) with
# alpha_min(b) = max(0.25, 1 - 4 / 2**(b-1)), i.e. the largest-magnitude element is clipped by at most
# ~4 integer steps (b=2,3: [0.25, 1]; b=4: [0.5, 1]; b=6: [0.875, 1]; b=8: [0.969, 1]).  Measured
# (Gaussian/Laplacian slices, b=2..8, B=8..128): per-slice optima sit in [0.26, 1] (1st percentile) and
# shrink towards 1 as 1 - O(2**-b); this grid is within 0.01 % of a 0.001-step search over [0.1, 1],
# while a uniform 0.02-step grid over [0.3, 1] is up to 2 % worse at 6-8 bits.
ALPHA_POINTS = 40
ALPHA_MAX_CLIP_STEPS = 4.0
ALPHA_FLOOR = 0.25
REFINE_STEPS = 2  # alternating (q, xi) refinements after the grid search; ~0.5-1 % less error at 6-8 bits
_CHUNK_ELEMS = 1 << 20  # elements of W per chunk (~8 MiB of float64)


def alpha_grid(bits: int) -> np.ndarray:
    """The clipping scales tried by fit="mse" for ``bits`` (always ends with alpha = 1, the l2 grid)."""
    lo = max(ALPHA_FLOOR, 1.0 - ALPHA_MAX_CLIP_STEPS / (1 << (bits - 1)))
    return np.linspace(lo, 1.0, ALPHA_POINTS)


@dataclass(frozen=True)
class QuantizedWeight:
    """``q`` int8 (CO, CI, KH, KW) and ``xi`` float32 (CO, G, KH, KW); ``W ~= xi (per block) * q``."""

    q: np.ndarray
    xi: np.ndarray
    bits: int
    block: int

    @property
    def groups(self) -> int:
        """G = ceil(CI / block): the number of input-channel blocks."""
        return int(self.xi.shape[1])

    def dequantize(self) -> np.ndarray:
        """float32 (CO, CI, KH, KW): ``q * xi`` with xi repeated over its block (last may be partial)."""
        ci = self.q.shape[1]
        xi_full = np.repeat(self.xi, self.block, axis=1)[:, :ci]
        return self.q.astype(np.float32) * xi_full.astype(np.float32)

    def deployed_bytes(self, scale_dtype: str = "float32") -> int:
        """Packed bytes: ``ceil(q.size * bits / 8)`` for the integers + one ``scale_dtype`` per xi."""
        if scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype={scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")
        return -(-self.q.size * self.bits // 8) + self.xi.size * np.dtype(scale_dtype).itemsize


def _validate(w, bits, block, fit, scale_dtype) -> np.ndarray:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) \
            or not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        raise ConfigError(f"bits={bits!r} is out of range: weight bits must be "
                          f"{BITS_RANGE[0]}..{BITS_RANGE[1]}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ConfigError(f"block={block!r} is out of range: the block size must be an integer >= 1")
    if fit not in FITS:
        raise ConfigError(f"fit={fit!r} is not one of {', '.join(FITS)}")
    if scale_dtype not in SCALE_DTYPES:
        raise ConfigError(f"scale_dtype={scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")
    w = np.asarray(w)
    if w.ndim != 4:
        raise ConfigError(f"weight tensor must be 4-D (CO, CI, KH, KW), got shape {w.shape}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ConfigError(f"weight tensor must be numeric, got dtype {w.dtype}")
    check_finite(w, "weight tensor")
    return w


def _ls(x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: least-squares xi = <x,q>/<q,q> (0 if q == 0) and its error ||x - xi q||^2."""
    swq = np.einsum("bs,bs->s", x, q)
    sqq = np.einsum("bs,bs->s", q, q)
    xi = np.divide(swq, sqq, out=np.zeros_like(swq), where=sqq > 0)
    r = x - xi * q
    return xi, np.einsum("bs,bs->s", r, r)


def _round_q(x: np.ndarray, inv_t: np.ndarray, lo: int, hi: int) -> np.ndarray:
    q = np.multiply(x, inv_t)
    return np.clip(np.rint(q, out=q), lo, hi, out=q)


def _fit_slices(x: np.ndarray, bits: int, fit: str, sdt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """x float64 (B, S), one slice per column -> (q float64 (B, S), deployed xi float64 (S,))."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    a = x[np.argmax(np.abs(x), axis=0), np.arange(x.shape[1])]  # largest-magnitude element
    nz = np.abs(a) > 1e-300  # (sub)denormal-only slices are zero slices: q = 0, xi = 0
    inv_t0 = np.divide(float(lo), a, out=np.zeros_like(a), where=nz)  # 1 / t0, t0 = -a / 2**(b-1)
    q = _round_q(x, inv_t0, lo, hi)
    xi, _ = _ls(x, q)
    if fit == "mse":
        # Select alpha in float32 on u = x / t0 (values in [-2**(b-1), 2**(b-1)]; errors in units of
        # t0**2 per slice).  With v = u / alpha, q = clip(rint(v)), d = v - q, the LS error is
        # alpha**2 * (<d,d> - <d,q>**2 / <q,q>): no cancellation, so float32 sums suffice
        # (<q,q> is exact).  The winner is recomputed in float64.
        u = (x * inv_t0).astype(np.float32)
        v, q32, d = np.empty_like(u), np.empty_like(u), np.empty_like(u)
        best_err, best_alpha = np.full(u.shape[1], np.inf), np.ones(u.shape[1])
        for alpha in alpha_grid(bits):
            np.multiply(u, np.float32(1.0 / alpha), out=v)
            np.clip(np.rint(v, out=q32), lo, hi, out=q32)
            np.subtract(v, q32, out=d)
            sdd, sdq, sqq = (np.einsum("bs,bs->s", p, r).astype(np.float64)
                             for p, r in ((d, d), (d, q32), (q32, q32)))
            e = alpha * alpha * (sdd - np.divide(sdq * sdq, sqq, out=np.zeros_like(sdq),
                                                 where=sqq > 0))
            better = e < best_err
            best_err[better], best_alpha[better] = e[better], alpha
        q2 = _round_q(x, inv_t0 / best_alpha, lo, hi)
        xi2, err2 = _ls(x, q2)
        for _ in range(REFINE_STEPS):
            inv_xi = np.divide(1.0, xi2, out=np.zeros_like(xi2), where=xi2 != 0)
            q3 = _round_q(x, inv_xi, lo, hi)
            xi3, err3 = _ls(x, q3)
            take = err3 < err2
            for dst, src in ((q2, q3), (xi2, xi3), (err2, err3)):
                np.copyto(dst, src, where=take)
        # Keep per slice the better of l2 and mse, judged with the deployed (rounded) xi.
        xd, xd2 = _deploy(xi, sdt), _deploy(xi2, sdt)
        r1, r2 = x - xd * q, x - xd2 * q2
        take = np.einsum("bs,bs->s", r2, r2) < np.einsum("bs,bs->s", r1, r1)
        np.copyto(q, q2, where=take)
        np.copyto(xi, xi2, where=take)
    return q, _deploy(xi, sdt)


def _deploy(xi: np.ndarray, sdt: np.dtype) -> np.ndarray:
    """Round xi to the storage dtype; raise NumericsError if it does not fit."""
    with np.errstate(over="ignore"):
        r = xi.astype(sdt)
    if not np.isfinite(r).all():
        bad = xi[~np.isfinite(r)][0]
        raise NumericsError(f"KDS scale xi={float(bad):.6g} is outside the {sdt.name} range; "
                            f"use scale_dtype='float32' or rescale the weights")
    return r.astype(np.float64)


def quantize_weight(w: np.ndarray, bits: int = 4, block: int = 32, fit: str = "l2",
                    scale_dtype: str = "float32") -> QuantizedWeight:
    """Quantize a conv weight (CO, CI, KH, KW) into DSConv VQK integers ``q`` and KDS scales ``xi``."""
    w = _validate(w, bits, block, fit, scale_dtype)
    sdt = np.dtype(scale_dtype)
    co, ci, kh, kw = w.shape
    g = -(-ci // block) if ci else 0
    bp = min(block, ci) if g == 1 else block  # one block: no padding needed
    q_out = np.zeros(w.shape, np.int8)
    xi_out = np.zeros((co, g, kh, kw), np.float32)
    per_co = max(1, g * bp * kh * kw)
    step = max(1, _CHUNK_ELEMS // per_co)
    for c0 in range(0, co if g else 0, step):
        c1 = min(co, c0 + step)
        n = c1 - c0
        wp = np.zeros((n, g * bp, kh, kw), np.float64)
        wp[:, :ci] = w[c0:c1]
        # (n, G, B, KH, KW) -> (B, n, G, KH, KW): one slice per column, the reduction axis first.
        x = wp.reshape(n, g, bp, kh, kw).transpose(2, 0, 1, 3, 4).reshape(bp, -1)
        q, xi = _fit_slices(np.ascontiguousarray(x), bits, fit, sdt)
        qb = q.reshape(bp, n, g, kh, kw).transpose(1, 2, 0, 3, 4).reshape(n, g * bp, kh, kw)
        q_out[c0:c1] = qb[:, :ci].astype(np.int8)
        xi_out[c0:c1] = xi.reshape(n, g, kh, kw).astype(np.float32)
    return QuantizedWeight(q=q_out, xi=xi_out, bits=int(bits), block=int(block))


def fit_error(w, qw: QuantizedWeight) -> float:
    """Relative squared error ``||w - qw.dequantize()||^2 / ||w||^2`` (0 if both are 0)."""
    w64 = np.asarray(w, np.float64)
    noise = float(np.sum((w64 - qw.dequantize().astype(np.float64)) ** 2))
    sig = float(np.sum(w64 * w64))
    if sig == 0.0:
        return 0.0 if noise == 0.0 else math.inf
    return noise / sig
