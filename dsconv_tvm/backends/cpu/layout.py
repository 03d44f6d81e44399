"""The CPU kernels' data layout (numpy, no TVM): packed weights, scales, mantissa storage.

Weight layout in the .so (:func:`pack_weights`), built for 4-channel integer dot-product
instructions (x86 vpmaddubsw / vpdpbusd, ARM sdot).  A weight of ``b`` bits takes a field of
:func:`field_bits` (2 bits for b = 2, a nibble for b = 3, 4, a byte above), ``p`` = 8 / field fields
per byte.  Within a block, channel ``c = 4p*k + 4*h + t`` of output channel ``o`` lives at
``wp[G, KH, KW, k, o, t]``: for p > 1 field ``h`` of that byte (bits ``field*h ..``) holds, on x86,
``w + 2^(field-1)`` (offset binary: 0..3 in a crumb, 0..15 in a nibble) or, on ARM
(:func:`signed_dot`), ``w`` in two's complement (sign-extended in registers with byte shifts), and
the array is uint8 ``[G, KH, KW, Bp/(4p), CO, 4]``; for p = 1 it is int8 ``[G, KH, KW, Bp/4, CO, 4]``.
``Bp`` = the block rounded up to :func:`group_channels` (16 channels for crumbs, 8 otherwise).
Slots beyond the real channels hold zero weights.  Scales ``xi[G, KH, KW, CO]``.

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


def field_bits(bits: int) -> int:
    """Bits of the field one weight of ``bits`` bits takes in the packed bytes: 2, 4 or 8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def per_byte(bits: int) -> int:
    """Weights per stored byte: 4 (2-bit), 2 (3- and 4-bit), 1 (5..8-bit, int8)."""
    return 8 // field_bits(bits)


def weight_offset(bits: int, signed: bool = False) -> int:
    """The offset a packed field adds to a weight (offset binary): 2^(field-1); 0 for int8 bytes
    and for two's complement fields (``signed``, :func:`signed_dot`)."""
    return 1 << (field_bits(bits) - 1) if per_byte(bits) > 1 and not signed else 0


def group_channels(bits: int) -> int:
    """Channels the kernel unpacks in one step: one packed byte per lane and 4-channel lane group,
    at least the 8 channels of one dot-product call."""
    return max(2, per_byte(bits)) * TAP


def slots(layer: DSConvLayer) -> int:
    """Bp: channel slots per block (the block rounded up to :func:`group_channels`)."""
    unit = group_channels(layer.bits)
    return -(-layer.block // unit) * unit


def act_offset(layer: DSConvLayer) -> int:
    """z: stored mantissa = mantissa + z (0 when the mantissa range fits ``layer.act_dtype``)."""
    lo, hi = mantissa_range(layer.mantissa, layer.unsigned)
    tlo, thi = (0, 255) if layer.act_dtype == "uint8" else (-128, 127)
    if tlo <= lo and hi <= thi:
        return 0
    return 128 if layer.act_dtype == "uint8" else -128


def weight_dtype(bits: int) -> str:
    """Storage dtype of the packed weights: uint8 fields, or int8 for one weight per byte."""
    return "uint8" if per_byte(bits) > 1 else "int8"


def weight_shape(layer: DSConvLayer) -> tuple[int, ...]:
    kh, kw = layer.kernel
    return (layer.groups, kh, kw, slots(layer) // (per_byte(layer.bits) * TAP), layer.computed_channels, TAP)


def signed_dot(layer: DSConvLayer) -> bool:
    """Whether the layer's kernel multiplies signed mantissa bytes by signed weight bytes (the ARM
    dot products: mantissas stored as int8).  Its 2- to 4-bit weights are then stored in two's
    complement fields (sign-extended in registers with byte shifts, which x86 lacks: there,
    ``w + 2^(field-1)`` and that offset x the mantissa sum subtracted)."""
    return layer.act_dtype == "int8"


def bfp_format(layer: DSConvLayer) -> BFPFormat:
    """The BFP format in which ``layer`` reads its input from a fused producer: its slots per block
    (:func:`slots`, 16-channel steps for 2-bit weights)."""
    return BFPFormat(layer.block, layer.mantissa, layer.unsigned, slots(layer))


def pack_weights(q: np.ndarray, bits: int, block: int, signed: bool = False) -> np.ndarray:
    """int (CO, CI, KH, KW) weights -> the kernel's packed layout (see the module docstring);
    ``signed``: 2- to 4-bit weights as two's complement fields (:func:`signed_dot`), else offset
    binary (:func:`weight_offset`)."""
    p, field = per_byte(bits), field_bits(bits)
    sl = slot_weights(q, bits, block, group_channels(bits))
    g, kh, kw, bp, co = sl.shape
    if p > 1:                                   # w + offset, or w's low field bits (two's complement)
        sl = (sl + weight_offset(bits, signed)) & ((1 << field) - 1)
    fields = sl.reshape(g, kh, kw, bp // (p * TAP), p, TAP, co)                          # k, h, t
    byte = sum(fields[:, :, :, :, h] << (field * h) for h in range(p))                  # G, KH, KW, k, t, CO
    return np.ascontiguousarray(byte.transpose(0, 1, 2, 3, 5, 4).astype(weight_dtype(bits)))


def unpack_weights(wp: np.ndarray, bits: int, block: int, in_channels: int, signed: bool = False) -> np.ndarray:
    """Inverse of :func:`pack_weights` (for tests and reports)."""
    g, kh, kw, _, co, _ = wp.shape
    p, field = per_byte(bits), field_bits(bits)
    b = wp.astype(np.int64)
    if p > 1:
        mask, half = (1 << field) - 1, 1 << (field - 1)
        b = np.stack([(b >> (field * h)) & mask for h in range(p)], axis=4)
        b = (b ^ half) - half if signed else b - half          # sign-extended, or the offset removed
    else:
        b = b[:, :, :, :, None]                                 # G, KH, KW, k, h, CO, t
    sl = b.transpose(0, 1, 2, 3, 4, 6, 5).reshape(g, kh, kw, -1, co)
    sl = sl[:, :, :, :block]                                    # G, KH, KW, B, CO
    full = sl.transpose(4, 0, 3, 1, 2).reshape(co, g * block, kh, kw)
    return full[:, :in_channels].astype(np.int8)


def offset_correction(layer: DSConvLayer, q: np.ndarray) -> np.ndarray:
    """corr[G, KH, KW, CO] = z * (sum of the block's weights), int32 (see the module docstring)."""
    sl = slot_weights(q, layer.bits, layer.block, group_channels(layer.bits))     # G, KH, KW, Bp, CO
    return np.ascontiguousarray((act_offset(layer) * sl.sum(axis=3)).astype(np.int32))


def layer_params(layer: DSConvLayer, q: np.ndarray, xi: np.ndarray,
                 bias: np.ndarray | None = None) -> list[np.ndarray]:
    """The constant arguments of the layer's PrimFunc, in order (after the input ``x``):
    packed weights, scales, [offset correction], [bias].  A residual, if any, comes last and is
    not a constant.  With ``layer.out_slots``, the output channels beyond ``out_channels`` get
    zero weights, scales and bias."""
    extra = layer.computed_channels - layer.out_channels
    if extra:
        q, xi = (np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)]) for a in (q, xi))
        if bias is not None:
            bias = np.concatenate([np.asarray(bias, np.float32).reshape(-1), np.zeros(extra, np.float32)])
    out = [pack_weights(q, layer.bits, layer.block, signed_dot(layer)), pack_scales(xi, layer.scale_dtype)]
    if act_offset(layer):
        out.append(offset_correction(layer, q))
    if layer.has_bias:
        if bias is None:
            raise ValueError("layer has a bias but none was given")
        out.append(np.ascontiguousarray(np.asarray(bias, np.float32).reshape(layer.computed_channels)))
    return out


def bfp_input_arrays(x: np.ndarray, layer: DSConvLayer) -> list[np.ndarray]:
    """numpy: the BFP form of ``layer``'s float input ``x`` [N, C, H, W] as a layer with
    ``bfp_input`` reads it (and a producer with ``bfp_output`` = :func:`bfp_format` of it writes
    it): stored mantissas ``[N, G, H, W, Bp]`` (``act_dtype``, offset ``z``, ``z`` in the empty
    slots) and exponents ``[N, G, H, W]`` int32."""
    n, _, h, w = x.shape
    g, bsz, bp = layer.groups, layer.block, slots(layer)
    m, e = bfp_quantize(x, bsz, layer.mantissa, layer.unsigned)          # N, G*B, H, W
    stored = np.zeros((n, g, h, w, bp), np.int64)
    stored[..., :bsz] = m.reshape(n, g, bsz, h, w).transpose(0, 1, 3, 4, 2)
    stored += act_offset(layer)
    return [stored.astype(layer.act_dtype), e.astype(np.int32)]
