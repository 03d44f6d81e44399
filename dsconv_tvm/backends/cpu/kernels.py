"""The CPU DSConv kernel as TE (x86 and ARM): one PrimFunc per converted layer.

Stages (see :mod:`dsconv_tvm.backends.common` for the shared ones):

1. ``amax``, ``bfp_e``, ``bfp_s``  the BFP exponents and scales (shared);
2. ``bfp_m``  integer mantissas, channel-innermost ``[N, G, Hp, Wp, Bp]`` (padded: channels to
   ``Bp`` slots per block, pixels to the conv padding), stored as ``act_dtype`` with the offset of
   :func:`.layout.act_offset`;
3. ``w_unpack`` 2- to 4-bit weights taken from the packed bytes (one crumb or nibble per weight,
   constant shifts, one small tile at a time in the schedule: the packed bytes are what the .so
   holds): on x86 as ``w + 2^(field-1)`` (a shift and an ``and``), on ARM
   (:func:`.layout.signed_dot`) as ``w`` itself (two's complement: sign-extended with a left shift
   and an arithmetic right shift, see :func:`packed_field`)
   ``bfp_sum``  per pixel and block, the sum of the stored mantissas (b <= 4, x86 only)
   ``dsconv_acc``  int32 dot products over the Bp channels of one block at one kernel tap;
4. ``dsconv_out``  float32 sum over blocks and taps of (acc - 2^(field-1) * bfp_sum - corr) * xi * scale
   (ARM: no bfp_sum);
5. ``dsconv_epilogue``  + bias, + residual, then the activation (shared).

The weight and mantissa layout is in :mod:`.layout`; the schedule in :mod:`.schedule`.
"""

from __future__ import annotations

from ...scheme.layer import ACT_DTYPES, DSConvLayer
from ..common import bfp_stages, block_scaled_sum, epilogue, layer_primfunc
from .layout import TAP, act_offset, field_bits, per_byte, signed_dot, slots, weight_dtype, weight_offset, weight_shape

# MetaSchedule: the "dsconv" custom rule (schedule.py) schedules the whole function from the
# dsconv_out block; every other block says "None" so the generic rules leave it alone
_OTHER = {"schedule_rule": "None"}


def packed_field(byte, h: int, field: int, signed: bool):
    """Field ``h`` (a constant) of ``field`` bits of a packed uint8 ``byte`` (TIR): ``signed``, the
    two's complement weight as int8 (shifted left to the top of the byte, then arithmetically right:
    ``shl`` + ``sshr``, the top field ``sshr`` alone); else the offset-binary field as uint8 (shifted
    down and masked: the bottom field an ``and`` alone, the top one a shift alone)."""
    from tvm import tirx

    above = 8 - field * (h + 1)                 # bits of the byte above the field
    if signed:
        top = byte << tirx.const(above, "uint8") if above else byte
        return top.astype("int8") >> tirx.const(8 - field, "int8")
    low = byte >> tirx.const(field * h, "uint8") if h else byte
    return low & tirx.const((1 << field) - 1, "uint8") if above else low


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
    bp, g = slots(layer), layer.groups
    _, _, oh, ow = layer.out_shape
    hp, wpd = h + pt + pb, w + pl + pr
    z = act_offset(layer)

    x = te.placeholder((n, c, h, w), "float32", name="x")
    wq = te.placeholder(weight_shape(layer), weight_dtype(layer.bits), name="w_packed")
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

    # the ARM dot products (signed_dot): their quantization pass is vectorized (x86 keeps the
    # serial rounding loop it was measured and tuned with)
    signed = signed_dot(layer)
    bfp = bfp_stages(x, layer, _OTHER, vector_rint=signed)
    npb, field, w_off = per_byte(layer.bits), field_bits(layer.bits), weight_offset(layer.bits, signed)

    def _mantissa(nn, gg, yy, xx, k):
        return (bfp.mantissa(nn, gg, k, yy, xx) + float(z)).astype(layer.act_dtype)

    bfp_m = te.compute((n, g, hp, wpd, bp), _mantissa, name="bfp_m", attrs=_OTHER)

    def _unpack(gg, i, j, k4, o, t):       # field k4 % npb of byte k4 // npb (constant once unrolled)
        byte = wq[gg, i, j, k4 // npb, o, t]
        value = packed_field(byte, npb - 1, field, signed)
        for h in reversed(range(npb - 1)):
            value = tirx.if_then_else(k4 % npb == h, packed_field(byte, h, field, signed), value)
        return value if signed else value.astype("int8")

    wu = te.compute((g, kh, kw, bp // TAP, co, TAP), _unpack, name="w_unpack", attrs=_OTHER) if npb > 1 else wq
    if npb > 1 and w_off:
        rs = te.reduce_axis((0, bp), name="rs")
        # sum of the stored mantissas of a block at a pixel: the dot product with w + offset has
        # offset x this sum too much (subtracted with the constant correction below)
        bfp_sum = te.compute((n, g, hp, wpd),
                             lambda nn, gg, yy, xx: te.sum(bfp_m[nn, gg, yy, xx, rs].astype("int32"), axis=rs),
                             name="bfp_sum", attrs=_OTHER)
    else:
        bfp_sum = None

    rk = te.reduce_axis((0, bp), name="rk")
    acc = te.compute(
        (n, g, kh, kw, oh, ow, co),
        lambda nn, gg, i, j, p, q, o: te.sum(
            bfp_m[nn, gg, p * sh + i * dh, q * sw + j * dw, rk].astype("int32")
            * wu[gg, i, j, rk // TAP, o, rk % TAP].astype("int32"), axis=rk),
        name="dsconv_acc", attrs=_OTHER)

    def _block_int(nn, gg, i, j, p, q, o):
        v = acc[nn, gg, i, j, p, q, o]
        if bfp_sum is not None:
            v = v - bfp_sum[nn, gg, p * sh + i * dh, q * sw + j * dw] * w_off
        return v - corr[gg, i, j, o] if corr is not None else v

    out = block_scaled_sum(layer, _block_int, xi, bfp.bfp_s, attrs={"schedule_rule": "dsconv"})
    return inputs, epilogue(layer, out, bias, residual, attrs=_OTHER)


def dsconv_primfunc(layer: DSConvLayer):
    """The PrimFunc of one DSConv layer, unscheduled (:mod:`.schedule` schedules it)."""
    inputs, y = dsconv_te(layer)
    return layer_primfunc([*inputs, y], layer_description(layer))


def layer_description(layer: DSConvLayer) -> str:
    """The value of the DSConv attribute of a CPU layer's PrimFunc (part of the tuning workload:
    changing it orphans the shipped schedules)."""
    return (f"bits={layer.bits} block={layer.block} mantissa={layer.mantissa} "
            f"unsigned={int(layer.unsigned)} act={layer.act_dtype} in={list(layer.in_shape)} "
            f"out={list(layer.out_shape)} kernel={list(layer.kernel)} strides={list(layer.geom.strides)} "
            f"padding={list(layer.geom.padding)} dilation={list(layer.geom.dilation)} "
            f"residual={int(layer.has_residual)}")
