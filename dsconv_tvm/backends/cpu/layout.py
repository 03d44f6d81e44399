"""The CPU kernels' data layout (numpy, no TVM): packed weights, scales, mantissa storage.

Weight layout in the .so (:func:`pack_weights`), built for 4-channel integer dot-product
instructions (x86 vpmaddubsw / vpdpbusd, ARM sdot): within a block, channel ``c = 8*k + 4*h + t``
of output channel ``o`` lives at ``wp[G, KH, KW, k, o, t]``; for b <= 4 the byte holds ``w + 8``
(offset binary, 0..15; x86) or ``w`` in two's complement (ARM, :func:`signed_dot`) of ``h = 0``
in its low nibble and of ``h = 1`` in its high nibble (shape
``[G, KH, KW, Bp/8, CO, 4]`` uint8, ``Bp`` = block rounded up to 8); for b > 4 it is
``[G, KH, KW, Bp/4, CO, 4]`` int8.  Slots beyond the real channels hold zero weights.  Scales
``xi[G, KH, KW, CO]``.

Mantissa storage: the instruction sets multiply unsigned x signed bytes (x86) or signed x signed
(ARM).  A layer stores its mantissas in ``act_dtype`` with an offset ``z`` that maps the
mantissa range into that type (0 when it already fits, +128 for signed mantissas stored as uint8,
-128 for unsigned ones stored as int8); the kernel then subtracts the exact integer correction
``corr[G, KH, KW, CO] = z * sum_c w`` (a compile-time constant), so the result is unchanged.
"""

from __future__ import annotations

import numpy as np

from ...scheme.bfp import bfp_quantize, mantissa_range
from ...scheme.layer import BFPFormat, DSConvLayer
from ..common import pack_scales, slot_weights

TAP = 4          # channels per byte-dot-product lane (vpmaddubsw pairs x2, vpdpbusd, sdot)


def slots(layer: DSConvLayer) -> int:
    """Bp: channel slots per block (the block rounded up to 8: one dot-product group)."""
    return -(-layer.block // (2 * TAP)) * 2 * TAP


def act_offset(layer: DSConvLayer) -> int:
    """z: stored mantissa = mantissa + z (0 when the mantissa range fits ``layer.act_dtype``)."""
    lo, hi = mantissa_range(layer.mantissa, layer.unsigned)
    tlo, thi = (0, 255) if layer.act_dtype == "uint8" else (-128, 127)
    if tlo <= lo and hi <= thi:
        return 0
    return 128 if layer.act_dtype == "uint8" else -128


def weight_shape(layer: DSConvLayer) -> tuple[int, ...]:
    kh, kw = layer.kernel
    unit = 2 * TAP if layer.packed else TAP
    return (layer.groups, kh, kw, slots(layer) // unit, layer.out_channels, TAP)


def signed_dot(layer: DSConvLayer) -> bool:
    """Whether the layer's kernel multiplies signed mantissa bytes by signed weight bytes (the ARM
    dot products: mantissas stored as int8).  Its 4-bit weights are then stored in two's
    complement (sign-extended in registers with byte shifts, which x86 lacks: there, ``w + 8``
    and 8 x the mantissa sum subtracted)."""
    return layer.act_dtype == "int8"


def needs_sums(layer: DSConvLayer) -> bool:
    """Whether the layer's kernel subtracts 8 x the per-pixel sum of its stored mantissas (4-bit
    weights stored as ``w + 8``: x86; not the two's complement nibbles of :func:`signed_dot`)."""
    return layer.packed and not signed_dot(layer)


def bfp_format(layer: DSConvLayer) -> BFPFormat:
    """The BFP format in which ``layer`` reads its input from a fused producer (the sums only
    where :func:`needs_sums`)."""
    return BFPFormat(layer.block, layer.mantissa, layer.unsigned, needs_sums(layer))


def pack_weights(q: np.ndarray, bits: int, block: int, signed: bool = False) -> np.ndarray:
    """int (CO, CI, KH, KW) weights -> the kernel's packed layout (see the module docstring);
    ``signed``: 4-bit weights as two's complement nibbles (:func:`signed_dot`), else ``w + 8``."""
    sl = slot_weights(q, bits, block, 2 * TAP)
    g, kh, kw, bp, co = sl.shape
    if bits > 4:                                                # [G, KH, KW, Bp/4, CO, 4] int8
        return np.ascontiguousarray(
            sl.reshape(g, kh, kw, bp // TAP, TAP, co).transpose(0, 1, 2, 3, 5, 4).astype(np.int8))
    nib = ((sl & 0xF) if signed else sl + 8).reshape(g, kh, kw, bp // (2 * TAP), 2, TAP, co)   # k, h, t
    byte = nib[:, :, :, :, 0] | (nib[:, :, :, :, 1] << 4)                     # G, KH, KW, k, t, CO
    return np.ascontiguousarray(byte.transpose(0, 1, 2, 3, 5, 4).astype(np.uint8))


def unpack_weights(wp: np.ndarray, bits: int, block: int, in_channels: int, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_weights` (for tests and reports)."""
    g, kh, kw, _, co, _ = wp.shape
    if bits <= 4:
        b = wp.astype(np.int64)
        lo, hi = b & 0xF, b >> 4
        lo, hi = ((lo ^ 8) - 8, (hi ^ 8) - 8) if signed else (lo - 8, hi - 8)
        groups = np.stack([lo, hi], axis=4)                     # G, KH, KW, k, h, CO, t
        sl = groups.transpose(0, 1, 2, 3, 4, 6, 5).reshape(g, kh, kw, -1, co)
    else:
        sl = wp.astype(np.int64).transpose(0, 1, 2, 3, 5, 4).reshape(g, kh, kw, -1, co)
    sl = sl[:, :, :, :block]                                    # G, KH, KW, B, CO
    full = sl.transpose(4, 0, 3, 1, 2).reshape(co, g * block, kh, kw)
    return full[:, :in_channels].astype(np.int8)


def offset_correction(layer: DSConvLayer, q: np.ndarray) -> np.ndarray:
    """corr[G, KH, KW, CO] = z * (sum of the block's weights), int32 (see the module docstring)."""
    sl = slot_weights(q, layer.bits, layer.block, 2 * TAP)     # G, KH, KW, Bp, CO
    return np.ascontiguousarray((act_offset(layer) * sl.sum(axis=3)).astype(np.int32))


def layer_params(layer: DSConvLayer, q: np.ndarray, xi: np.ndarray,
                 bias: np.ndarray | None = None) -> list[np.ndarray]:
    """The constant arguments of the layer's PrimFunc, in order (after the input ``x``):
    packed weights, scales, [offset correction], [bias].  A residual, if any, comes last and is
    not a constant."""
    out = [pack_weights(q, layer.bits, layer.block, signed_dot(layer)), pack_scales(xi, layer.scale_dtype)]
    if act_offset(layer):
        out.append(offset_correction(layer, q))
    if layer.has_bias:
        if bias is None:
            raise ValueError("layer has a bias but none was given")
        out.append(np.ascontiguousarray(np.asarray(bias, np.float32).reshape(layer.out_channels)))
    return out


def bfp_input_arrays(x: np.ndarray, layer: DSConvLayer) -> list[np.ndarray]:
    """numpy: the BFP form of ``layer``'s float input ``x`` [N, C, H, W] as a layer with
    ``bfp_input`` reads it (and a producer with ``bfp_output`` writes it): stored mantissas
    ``[N, G, H, W, Bp]`` (``act_dtype``, offset ``z``, ``z`` in the empty slots), exponents
    ``[N, G, H, W]`` int32 and, where :func:`needs_sums`, the sums of the stored mantissas."""
    n, _, h, w = x.shape
    g, bsz, bp = layer.groups, layer.block, slots(layer)
    m, e = bfp_quantize(x, bsz, layer.mantissa, layer.unsigned)          # N, G*B, H, W
    stored = np.zeros((n, g, h, w, bp), np.int64)
    stored[..., :bsz] = m.reshape(n, g, bsz, h, w).transpose(0, 1, 3, 4, 2)
    stored += act_offset(layer)
    out = [stored.astype(layer.act_dtype), e.astype(np.int32)]
    if needs_sums(layer):
        out.append(stored.sum(axis=-1).astype(np.int32))
    return out
