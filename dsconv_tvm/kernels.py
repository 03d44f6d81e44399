"""The DSConv operator as TensorIR: a few TE computes, one PrimFunc per converted layer.

One PrimFunc does the whole layer, so the activations are quantized *inside the compiled graph*
from the real input:

1. ``amax``   max |x| over each block of channels, per pixel                      (float32)
   ``bfp_e``  the block's shared exponent, from the bits of that float (int32, exact)
2. ``bfp_m``  integer mantissas, stored padded (channels to G*Bp, pixels to the conv padding)
   ``bfp_s``  the block scales 2^(e - f), exact powers of two built from exponent bits
3. ``dsconv_acc``  int32 dot products over the Bp channels of one block at one kernel tap,
   reading 4-bit weights straight from the packed bytes (two per byte, sign-extended by shifts)
4. ``dsconv_out``  float32 sum over blocks and taps of acc * xi * scale
5. ``dsconv_epilogue``  + bias, then the activation (none / relu)

Weight layout in the .so (``pack_weights``): ``wp[G, KH, KW, Bp/2, CO]`` uint8 for b <= 4 (channel
2k in the low nibble, 2k+1 in the high one), ``wp[G, KH, KW, Bp, CO]`` int8 for b > 4; ``Bp`` is the
block size rounded up to even when packed.  Slots beyond the real channels hold zero weights, and
the matching mantissas are zero too, so no kernel needs a bounds check.  Scales ``xi[G, KH, KW, CO]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bfp import E_MAX, E_MIN, fraction_bits, mantissa_range, num_blocks
from .reference import ConvGeometry

ACTIVATIONS = ("none", "relu")


@dataclass(frozen=True)
class DSConvLayer:
    """Everything the kernel of one converted layer is specialised on."""

    in_shape: tuple[int, int, int, int]        # N, C, H, W
    out_channels: int
    kernel: tuple[int, int]
    geom: ConvGeometry
    bits: int
    block: int
    mantissa: int
    unsigned: bool = False
    scale_dtype: str = "float32"
    has_bias: bool = False
    activation: str = "none"

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    @property
    def groups(self) -> int:
        return num_blocks(self.in_shape[1], self.block)

    @property
    def slots(self) -> int:
        """Bp: channel slots per block (block size rounded up to even when two weights share a byte)."""
        return self.block + (self.block % 2) if self.packed else self.block

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.in_shape
        oh, ow = self.geom.out_size(h, w, *self.kernel)
        return n, self.out_channels, oh, ow

    @property
    def mantissa_dtype(self) -> str:
        return "uint8" if self.unsigned else "int8"

    def weight_shape(self) -> tuple[int, ...]:
        kh, kw = self.kernel
        inner = self.slots // 2 if self.packed else self.slots
        return (self.groups, kh, kw, inner, self.out_channels)


def pack_weights(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """int (CO, CI, KH, KW) weights -> the kernel's packed layout (see module docstring)."""
    co, ci, kh, kw = q.shape
    g = num_blocks(ci, block)
    packed = bits <= 4
    bp = block + (block % 2) if packed else block
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.min(initial=0) < lo or q.max(initial=0) > hi:
        raise ValueError(f"weights outside the {bits}-bit range [{lo}, {hi}]")
    full = np.zeros((co, g * block, kh, kw), np.int64)
    full[:, :ci] = q
    slots = np.zeros((g, bp, kh, kw, co), np.int64)
    slots[:, :block] = full.reshape(co, g, block, kh, kw).transpose(1, 2, 3, 4, 0)
    slots = slots.transpose(0, 2, 3, 1, 4)                     # G, KH, KW, Bp, CO
    if not packed:
        return np.ascontiguousarray(slots.astype(np.int8))
    nib = slots & 0xF
    return np.ascontiguousarray((nib[:, :, :, 0::2] | (nib[:, :, :, 1::2] << 4)).astype(np.uint8))


def unpack_weights(wp: np.ndarray, bits: int, block: int, in_channels: int) -> np.ndarray:
    """Inverse of :func:`pack_weights` (for tests and reports)."""
    g, kh, kw, _, co = wp.shape
    if bits <= 4:
        b = wp.astype(np.int64)
        lo = ((b & 0xF) ^ 8) - 8
        hi = ((b >> 4) ^ 8) - 8
        slots = np.stack([lo, hi], axis=4).reshape(g, kh, kw, -1, co)
    else:
        slots = wp.astype(np.int64)
    slots = slots[:, :, :, :block]                              # G, KH, KW, B, CO
    full = slots.transpose(4, 0, 3, 1, 2).reshape(co, g * block, kh, kw)
    return full[:, :in_channels].astype(np.int8)


def pack_scales(xi: np.ndarray, scale_dtype: str) -> np.ndarray:
    """KDS scales (CO, G, KH, KW) -> the kernel's (G, KH, KW, CO) layout in ``scale_dtype``."""
    return np.ascontiguousarray(xi.transpose(1, 2, 3, 0).astype(scale_dtype))


def _pow2(exponent):
    """2^exponent as an exact float32 built from its bits (exponent an int32 expr in [-126, 127])."""
    from tvm import tirx

    return tirx.reinterpret("float32", (exponent + 127) << 23)


def dsconv_te(layer: DSConvLayer):
    """TE tensors of one DSConv layer: returns (inputs, output) for ``te.create_prim_func``."""
    from tvm import te, tirx

    n, c, h, w = layer.in_shape
    co = layer.out_channels
    kh, kw = layer.kernel
    sh, sw = layer.geom.strides
    dh, dw = layer.geom.dilation
    pt, pl, pb, pr = layer.geom.padding
    bsz, bp, g = layer.block, layer.slots, layer.groups
    _, _, oh, ow = layer.out_shape
    hp, wpd = h + pt + pb, w + pl + pr
    f = fraction_bits(layer.mantissa, layer.unsigned)
    lo, hi = mantissa_range(layer.mantissa, layer.unsigned)

    x = te.placeholder((n, c, h, w), "float32", name="x")
    wq = te.placeholder(layer.weight_shape(), "uint8" if layer.packed else "int8", name="w_packed")
    xi = te.placeholder((g, kh, kw, co), layer.scale_dtype, name="xi")
    inputs = [x, wq, xi]
    bias = None
    if layer.has_bias:
        bias = te.placeholder((co,), "float32", name="bias")
        inputs.append(bias)

    zero = tirx.const(0.0, "float32")
    r = te.reduce_axis((0, bsz), name="r")

    def _abs_in_block(nn, gg, yy, xx):
        ch = gg * bsz + r
        v = tirx.abs(x[nn, tirx.min(ch, c - 1), yy, xx])
        return v if c % bsz == 0 else tirx.if_then_else(ch < c, v, zero)

    amax = te.compute((n, g, h, w), lambda nn, gg, yy, xx: te.max(_abs_in_block(nn, gg, yy, xx), axis=r),
                      name="amax")

    def _exponent_of_amax(nn, gg, yy, xx):
        bits = tirx.reinterpret("int32", amax[nn, gg, yy, xx])
        e = ((bits >> 23) & 0xFF) - 126                      # amax in [2^(e-1), 2^e); 0 -> -126
        return tirx.max(tirx.min(e, E_MAX), E_MIN)

    bfp_e = te.compute((n, g, h, w), _exponent_of_amax, name="bfp_e")   # once per block and pixel

    def _in_image(yy, xx):
        return tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w)

    def _clamp(v, size):             # keeps speculated (vectorized) reads inside the image
        return tirx.max(tirx.min(v, size - 1), 0)

    def _scale(nn, gg, yy, xx):
        e = bfp_e[nn, gg, _clamp(yy - pt, h), _clamp(xx - pl, w)]
        return tirx.if_then_else(_in_image(yy, xx), _pow2(e - f), zero)

    bfp_s = te.compute((n, g, hp, wpd), _scale, name="bfp_s")

    def _mantissa(nn, gg, k, yy, xx):
        ch = gg * bsz + k
        y0, x0 = _clamp(yy - pt, h), _clamp(xx - pl, w)
        val = x[nn, tirx.min(ch, c - 1), y0, x0] * _pow2(f - bfp_e[nn, gg, y0, x0])
        q = tirx.max(tirx.min(tirx.nearbyint(val), float(hi)), float(lo))
        ok = tirx.all(_in_image(yy, xx), k < bsz, ch < c)
        return tirx.if_then_else(ok, q, zero).astype(layer.mantissa_dtype)

    bfp_m = te.compute((n, g, bp, hp, wpd), _mantissa, name="bfp_m")

    def _weight(gg, i, j, k, o):
        if not layer.packed:
            return wq[gg, i, j, k, o].astype("int32")
        byte = wq[gg, i, j, k // 2, o].astype("int32")
        # channel 2k: low nibble, 2k+1: high nibble; sign-extend with shifts
        shift = tirx.Select(k % 2 == 0, tirx.const(28, "int32"), tirx.const(24, "int32"))
        return (byte << shift) >> 28

    rk = te.reduce_axis((0, bp), name="rk")
    acc = te.compute(
        (n, g, kh, kw, oh, ow, co),
        lambda nn, gg, i, j, p, q, o: te.sum(
            _weight(gg, i, j, rk, o)
            * bfp_m[nn, gg, rk, p * sh + i * dh, q * sw + j * dw].astype("int32"), axis=rk),
        name="dsconv_acc")

    rg = te.reduce_axis((0, g), name="rg")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    out = te.compute(
        (n, co, oh, ow),
        lambda nn, o, p, q: te.sum(
            acc[nn, rg, ri, rj, p, q, o].astype("float32") * xi[rg, ri, rj, o].astype("float32")
            * bfp_s[nn, rg, p * sh + ri * dh, q * sw + rj * dw], axis=[rg, ri, rj]),
        name="dsconv_out")

    def _epilogue(nn, o, p, q):
        v = out[nn, o, p, q]
        if bias is not None:
            v = v + bias[o]
        if layer.activation == "relu":
            v = tirx.max(v, zero)
        return v

    y = te.compute((n, co, oh, ow), _epilogue, name="dsconv_epilogue")
    return inputs, y


def dsconv_primfunc(layer: DSConvLayer):
    """The PrimFunc of one DSConv layer, unscheduled (``schedule.py`` schedules it)."""
    from tvm import te

    if layer.activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {layer.activation!r}")
    inputs, y = dsconv_te(layer)
    func = te.create_prim_func([*inputs, y]).without_attr("global_symbol")
    # op_pattern 8 = kOpaque: FuseOps leaves the call alone, the layer's own epilogue does bias/ReLU
    return func.with_attr("dsconv.layer", _layer_attr(layer)).with_attr("op_pattern", 8)


def _layer_attr(layer: DSConvLayer) -> str:
    return (f"bits={layer.bits} block={layer.block} mantissa={layer.mantissa} "
            f"unsigned={int(layer.unsigned)} in={list(layer.in_shape)} out={list(layer.out_shape)} "
            f"kernel={list(layer.kernel)} strides={list(layer.geom.strides)} "
            f"padding={list(layer.geom.padding)} dilation={list(layer.geom.dilation)}")
