"""The DSConv operator as TensorIR: a few TE computes, one PrimFunc per converted layer.

One PrimFunc does the whole layer, so the activations are quantized *inside the compiled graph*
from the real input:

1. ``amax``   max |x| over each block of channels, per pixel                      (float32)
   ``bfp_e``  the block's shared exponent, from the bits of that float (int32, exact)
2. ``bfp_m``  integer mantissas, channel-innermost ``[N, G, Hp, Wp, Bp]`` (padded: channels to
   ``Bp`` slots per block, pixels to the conv padding), stored as ``act_dtype`` (see below)
   ``bfp_s``  the block scales 2^(e - f), exact powers of two built from exponent bits
3. ``w_unpack`` 4-bit weights taken from the packed bytes as ``w + 8`` (one nibble: one ``and`` or
   shift, one small tile at a time in the schedule: the packed bytes are what the .so holds)
   ``bfp_sum``  per pixel and block, the sum of the stored mantissas (b <= 4 only)
   ``dsconv_acc``  int32 dot products over the Bp channels of one block at one kernel tap
4. ``dsconv_out``  float32 sum over blocks and taps of (acc - 8 * bfp_sum - corr) * xi * scale
5. ``dsconv_epilogue``  + bias, + residual, then the activation (none / relu)

Weight layout in the .so (``pack_weights``), built for 4-channel integer dot-product instructions
(x86 vpmaddubsw / vpdpbusd, ARM sdot): within a block, channel ``c = 8*k + 4*h + t`` of output
channel ``o`` lives at ``wp[G, KH, KW, k, o, t]``; for b <= 4 the byte holds ``w + 8`` (offset
binary, 0..15) of ``h = 0`` in its low nibble and of ``h = 1`` in its high nibble (shape ``[G, KH, KW, Bp/8, CO, 4]`` uint8, ``Bp`` = block
rounded up to 8); for b > 4 it is ``[G, KH, KW, Bp/4, CO, 4]`` int8.
Slots beyond the real channels hold zero weights.  Scales ``xi[G, KH, KW, CO]``.

Mantissa storage: the instruction sets multiply unsigned x signed bytes (x86) or signed x signed
(ARM).  A layer stores its mantissas in ``act_dtype`` with an offset ``z`` that maps the
mantissa range into that type (0 when it already fits, +128 for signed mantissas stored as uint8,
-128 for unsigned ones stored as int8); the kernel then subtracts the exact integer correction
``corr[G, KH, KW, CO] = z * sum_c w`` (a compile-time constant), so the result is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bfp import E_MAX, E_MIN, fraction_bits, mantissa_range, num_blocks
from .reference import ConvGeometry

ACTIVATIONS = ("none", "relu")
ACT_DTYPES = ("uint8", "int8")
# MetaSchedule: the "dsconv" custom rule (schedule.py) schedules the whole function from the
# dsconv_out block; every other block says "None" so the generic rules leave it alone
_OTHER = {"schedule_rule": "None"}
TAP = 4          # channels per byte-dot-product lane (vpmaddubsw pairs x2, vpdpbusd, sdot)


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
    act_dtype: str = "uint8"                   # mantissa storage (uint8: x86, int8: ARM)
    has_residual: bool = False                 # epilogue adds a tensor of the output's shape

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    @property
    def groups(self) -> int:
        return num_blocks(self.in_shape[1], self.block)

    @property
    def slots(self) -> int:
        """Bp: channel slots per block (the block rounded up to 8: one dot-product group)."""
        return -(-self.block // (2 * TAP)) * 2 * TAP

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, _, h, w = self.in_shape
        oh, ow = self.geom.out_size(h, w, *self.kernel)
        return n, self.out_channels, oh, ow

    @property
    def act_offset(self) -> int:
        """z: stored mantissa = mantissa + z (0 when the mantissa range fits ``act_dtype``)."""
        lo, hi = mantissa_range(self.mantissa, self.unsigned)
        tlo, thi = (0, 255) if self.act_dtype == "uint8" else (-128, 127)
        if tlo <= lo and hi <= thi:
            return 0
        return 128 if self.act_dtype == "uint8" else -128

    def weight_shape(self) -> tuple[int, ...]:
        kh, kw = self.kernel
        unit = 2 * TAP if self.packed else TAP
        return (self.groups, kh, kw, self.slots // unit, self.out_channels, TAP)


def slot_weights(q: np.ndarray, bits: int, block: int, step: int = 2 * TAP) -> np.ndarray:
    """int (CO, CI, KH, KW) -> (G, KH, KW, Bp, CO) int64 with zero slots beyond the channels; Bp is
    the block rounded up to a multiple of ``step`` (the channels one packed unit holds)."""
    co, ci, kh, kw = q.shape
    g = num_blocks(ci, block)
    bp = -(-block // step) * step
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if q.min(initial=0) < lo or q.max(initial=0) > hi:
        raise ValueError(f"weights outside the {bits}-bit range [{lo}, {hi}]")
    full = np.zeros((co, g * block, kh, kw), np.int64)
    full[:, :ci] = q
    slots = np.zeros((g, bp, kh, kw, co), np.int64)
    slots[:, :block] = full.reshape(co, g, block, kh, kw).transpose(1, 2, 3, 4, 0)
    return slots.transpose(0, 2, 3, 1, 4)                      # G, KH, KW, Bp, CO


def pack_weights(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """int (CO, CI, KH, KW) weights -> the kernel's packed layout (see module docstring)."""
    slots = slot_weights(q, bits, block)
    g, kh, kw, bp, co = slots.shape
    if bits > 4:                                                # [G, KH, KW, Bp/4, CO, 4] int8
        return np.ascontiguousarray(
            slots.reshape(g, kh, kw, bp // TAP, TAP, co).transpose(0, 1, 2, 3, 5, 4).astype(np.int8))
    nib = (slots + 8).reshape(g, kh, kw, bp // (2 * TAP), 2, TAP, co)        # k, h, t; w + 8 in [0, 15]
    byte = nib[:, :, :, :, 0] | (nib[:, :, :, :, 1] << 4)                     # G, KH, KW, k, t, CO
    return np.ascontiguousarray(byte.transpose(0, 1, 2, 3, 5, 4).astype(np.uint8))


def unpack_weights(wp: np.ndarray, bits: int, block: int, in_channels: int) -> np.ndarray:
    """Inverse of :func:`pack_weights` (for tests and reports)."""
    g, kh, kw, _, co, _ = wp.shape
    if bits <= 4:
        b = wp.astype(np.int64)
        lo = (b & 0xF) - 8
        hi = (b >> 4) - 8
        groups = np.stack([lo, hi], axis=4)                     # G, KH, KW, k, h, CO, t
        slots = groups.transpose(0, 1, 2, 3, 4, 6, 5).reshape(g, kh, kw, -1, co)
    else:
        slots = wp.astype(np.int64).transpose(0, 1, 2, 3, 5, 4).reshape(g, kh, kw, -1, co)
    slots = slots[:, :, :, :block]                              # G, KH, KW, B, CO
    full = slots.transpose(4, 0, 3, 1, 2).reshape(co, g * block, kh, kw)
    return full[:, :in_channels].astype(np.int8)


def pack_scales(xi: np.ndarray, scale_dtype: str) -> np.ndarray:
    """KDS scales (CO, G, KH, KW) -> the kernel's (G, KH, KW, CO) layout in ``scale_dtype``."""
    return np.ascontiguousarray(xi.transpose(1, 2, 3, 0).astype(scale_dtype))


def offset_correction(layer: DSConvLayer, q: np.ndarray) -> np.ndarray:
    """corr[G, KH, KW, CO] = z * (sum of the block's weights), int32 (see module docstring)."""
    slots = slot_weights(q, layer.bits, layer.block)            # G, KH, KW, Bp, CO
    return np.ascontiguousarray((layer.act_offset * slots.sum(axis=3)).astype(np.int32))


def layer_params(layer: DSConvLayer, q: np.ndarray, xi: np.ndarray,
                 bias: np.ndarray | None = None) -> list[np.ndarray]:
    """The constant arguments of the layer's PrimFunc, in order (after the input ``x``):
    packed weights, scales, [offset correction], [bias].  A residual, if any, comes last and is
    not a constant."""
    out = [pack_weights(q, layer.bits, layer.block), pack_scales(xi, layer.scale_dtype)]
    if layer.act_offset:
        out.append(offset_correction(layer, q))
    if layer.has_bias:
        if bias is None:
            raise ValueError("layer has a bias but none was given")
        out.append(np.ascontiguousarray(np.asarray(bias, np.float32).reshape(layer.out_channels)))
    return out


def _pow2(exponent):
    """2^exponent as an exact float32 built from its bits (exponent an int32 expr in [-126, 127])."""
    from tvm import tirx

    return tirx.reinterpret("float32", (exponent + 127) << 23)


@dataclass
class BFPStages:
    """The block-floating-point stages shared by the CPU and CUDA DSConv kernels."""

    amax: object        # [N, G, H, W] max |x| over each block of channels, per pixel
    bfp_e: object       # [N, G, H, W] the block's shared exponent (from the float's bits, exact)
    bfp_s: object       # [N, G, H+pad, W+pad] block scales 2^(e - f), 0 in the padding
    mantissa: object    # (n, g, k, y, x) -> float mantissa of channel k of block g at padded (y, x)


def bfp_stages(x, layer: DSConvLayer, attrs=None) -> BFPStages:
    """TE stages quantizing ``x`` [N, C, H, W] to BFP for ``layer`` (exponents per block and
    pixel; mantissas rounded and clamped, 0 outside the image and beyond the channels)."""
    from tvm import te, tirx

    n, c, h, w = layer.in_shape
    pt, pl, pb, pr = layer.geom.padding
    bsz, g = layer.block, layer.groups
    hp, wpd = h + pt + pb, w + pl + pr
    f = fraction_bits(layer.mantissa, layer.unsigned)
    lo, hi = mantissa_range(layer.mantissa, layer.unsigned)
    zero = tirx.const(0.0, "float32")
    r = te.reduce_axis((0, bsz), name="r")

    def _abs_in_block(nn, gg, yy, xx):
        ch = gg * bsz + r
        v = tirx.abs(x[nn, tirx.min(ch, c - 1), yy, xx])
        return v if c % bsz == 0 else tirx.if_then_else(ch < c, v, zero)

    amax = te.compute((n, g, h, w), lambda nn, gg, yy, xx: te.max(_abs_in_block(nn, gg, yy, xx), axis=r),
                      name="amax", attrs=attrs)

    def _exponent_of_amax(nn, gg, yy, xx):
        bits = tirx.reinterpret("int32", amax[nn, gg, yy, xx])
        e = ((bits >> 23) & 0xFF) - 126                      # amax in [2^(e-1), 2^e); 0 -> -126
        return tirx.max(tirx.min(e, E_MAX), E_MIN)

    bfp_e = te.compute((n, g, h, w), _exponent_of_amax, name="bfp_e", attrs=attrs)   # once per block and pixel

    def _in_image(yy, xx):
        return tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w)

    def _clamp(v, size):             # keeps speculated (vectorized) reads inside the image
        return tirx.max(tirx.min(v, size - 1), 0)

    def _scale(nn, gg, yy, xx):
        e = bfp_e[nn, gg, _clamp(yy - pt, h), _clamp(xx - pl, w)]
        return tirx.if_then_else(_in_image(yy, xx), _pow2(e - f), zero)

    bfp_s = te.compute((n, g, hp, wpd), _scale, name="bfp_s", attrs=attrs)

    def _mantissa(nn, gg, k, yy, xx):
        ch = gg * bsz + k
        y0, x0 = _clamp(yy - pt, h), _clamp(xx - pl, w)
        val = x[nn, tirx.min(ch, c - 1), y0, x0] * _pow2(f - bfp_e[nn, gg, y0, x0])
        q = tirx.max(tirx.min(tirx.nearbyint(val), float(hi)), float(lo))
        return tirx.if_then_else(tirx.all(_in_image(yy, xx), k < bsz, ch < c), q, zero)

    return BFPStages(amax, bfp_e, bfp_s, _mantissa)


def dsconv_te(layer: DSConvLayer):
    """TE tensors of one DSConv layer: returns (inputs, output) for ``te.create_prim_func``."""
    from tvm import te, tirx

    if layer.act_dtype not in ACT_DTYPES:
        raise ValueError(f"unsupported mantissa storage {layer.act_dtype!r}")
    n, c, h, w = layer.in_shape
    co = layer.out_channels
    kh, kw = layer.kernel
    sh, sw = layer.geom.strides
    dh, dw = layer.geom.dilation
    pt, pl, pb, pr = layer.geom.padding
    bp, g = layer.slots, layer.groups
    _, _, oh, ow = layer.out_shape
    hp, wpd = h + pt + pb, w + pl + pr
    z = layer.act_offset

    x = te.placeholder((n, c, h, w), "float32", name="x")
    wq = te.placeholder(layer.weight_shape(), "uint8" if layer.packed else "int8", name="w_packed")
    xi = te.placeholder((g, kh, kw, co), layer.scale_dtype, name="xi")
    inputs = [x, wq, xi]
    corr = bias = residual = None
    if z:
        corr = te.placeholder((g, kh, kw, co), "int32", name="corr")
        inputs.append(corr)
    if layer.has_bias:
        bias = te.placeholder((co,), "float32", name="bias")
        inputs.append(bias)
    if layer.has_residual:
        residual = te.placeholder(layer.out_shape, "float32", name="residual")
        inputs.append(residual)

    zero = tirx.const(0.0, "float32")
    bfp = bfp_stages(x, layer, _OTHER)
    bfp_s = bfp.bfp_s

    def _mantissa(nn, gg, yy, xx, k):
        return (bfp.mantissa(nn, gg, k, yy, xx) + float(z)).astype(layer.act_dtype)

    bfp_m = te.compute((n, g, hp, wpd, bp), _mantissa, name="bfp_m", attrs=_OTHER)

    if layer.packed:
        def _unpack(gg, i, j, k4, o, t):       # the nibble itself: w + 8 in [0, 15]
            byte = wq[gg, i, j, k4 // 2, o, t]
            return tirx.if_then_else(k4 % 2 == 0, byte & tirx.const(15, "uint8"),
                                     byte >> tirx.const(4, "uint8")).astype("int8")

        wu = te.compute((g, kh, kw, bp // TAP, co, TAP), _unpack, name="w_unpack", attrs=_OTHER)
        rs = te.reduce_axis((0, bp), name="rs")
        # sum of the stored mantissas of a block at a pixel: the dot product with w + 8 has
        # 8 x this sum too much (subtracted with the constant correction below)
        bfp_sum = te.compute((n, g, hp, wpd),
                             lambda nn, gg, yy, xx: te.sum(bfp_m[nn, gg, yy, xx, rs].astype("int32"), axis=rs),
                             name="bfp_sum", attrs=_OTHER)
    else:
        wu = wq
        bfp_sum = None

    rk = te.reduce_axis((0, bp), name="rk")
    acc = te.compute(
        (n, g, kh, kw, oh, ow, co),
        lambda nn, gg, i, j, p, q, o: te.sum(
            bfp_m[nn, gg, p * sh + i * dh, q * sw + j * dw, rk].astype("int32")
            * wu[gg, i, j, rk // TAP, o, rk % TAP].astype("int32"), axis=rk),
        name="dsconv_acc", attrs=_OTHER)

    def _block_sum(nn, gg, i, j, p, q, o):
        v = acc[nn, gg, i, j, p, q, o]
        if bfp_sum is not None:
            v = v - bfp_sum[nn, gg, p * sh + i * dh, q * sw + j * dw] * 8
        return (v - corr[gg, i, j, o] if corr is not None else v).astype("float32")

    rg = te.reduce_axis((0, g), name="rg")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    out = te.compute(
        (n, co, oh, ow),
        lambda nn, o, p, q: te.sum(
            _block_sum(nn, rg, ri, rj, p, q, o) * xi[rg, ri, rj, o].astype("float32")
            * bfp_s[nn, rg, p * sh + ri * dh, q * sw + rj * dw], axis=[rg, ri, rj]),
        name="dsconv_out", attrs={"schedule_rule": "dsconv"})

    def _epilogue(nn, o, p, q):
        v = out[nn, o, p, q]
        if bias is not None:
            v = v + bias[o]
        if residual is not None:
            v = v + residual[nn, o, p, q]
        if layer.activation == "relu":
            v = tirx.max(v, zero)
        return v

    y = te.compute((n, co, oh, ow), _epilogue, name="dsconv_epilogue", attrs=_OTHER)
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
            f"unsigned={int(layer.unsigned)} act={layer.act_dtype} in={list(layer.in_shape)} "
            f"out={list(layer.out_shape)} kernel={list(layer.kernel)} strides={list(layer.geom.strides)} "
            f"padding={list(layer.geom.padding)} dilation={list(layer.geom.dilation)} "
            f"residual={int(layer.has_residual)}")
