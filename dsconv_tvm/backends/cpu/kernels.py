"""The CPU DSConv kernel as TE (x86 and ARM): one PrimFunc per converted layer.

Stages (see :mod:`dsconv_tvm.backends.common` for the shared ones):

1. ``amax``, ``bfp_e``, ``bfp_s``  the BFP exponents and scales (shared);
2. ``bfp_m``  integer mantissas, channel-innermost ``[N, G, Hp, Wp, Bp]`` (padded: channels to
   ``Bp`` slots per block, pixels to the conv padding), stored as ``act_dtype`` with the offset of
   :func:`.layout.act_offset`;
3. ``w_unpack`` 2- to 4-bit weights taken from the packed bytes (one crumb or nibble per weight,
   constant shifts, one small tile at a time in the schedule: the packed bytes are what the .so
   holds): on x86 from the offset-binary field ``w + 2^(field-1)`` (a shift and an ``and``, then
   a byte subtraction of the offset, shared by the register tile's pixels), on ARM
   (:func:`.layout.signed_dot`) as ``w`` itself (two's complement: sign-extended with a left shift
   and an arithmetic right shift, see :func:`packed_field`)
   ``dsconv_acc``  int32 dot products over the Bp channels of one block at one kernel tap;
4. ``dsconv_out``  float32 sum over blocks and taps of (acc - corr) * xi * scale;
5. ``dsconv_epilogue``  + bias, + residual, then the activation (shared).

Fused BFP between layers (``layer.bfp_input`` / ``layer.bfp_output``, see docs/kernels.md): a
consumer takes the stored mantissas and exponents instead of ``x``
(stages 1-2 reduce to ``bfp_s``); a producer quantizes its epilogue's output for its consumers with the same stages
(``next_amax``, ``next_bfp_e``, ``next_m``) and writes those instead of (or, with
``layer.fp32_output``, besides a copy ``dsconv_fp32`` of) the float output.

The weight and mantissa layout is in :mod:`.layout`; the schedule in :mod:`.schedule`.
"""

from __future__ import annotations

from ...scheme.geometry import ConvGeometry
from ...scheme.layer import ACT_DTYPES, DSConvLayer
from ..common import (
    bfp_stages,
    block_scaled_sum,
    clamp_index,
    epilogue,
    layer_primfunc,
    prologue_reader,
)
from .layout import (
    TAP,
    act_offset,
    field_bits,
    per_byte,
    signed_dot,
    slots,
    weight_dtype,
    weight_offset,
    weight_shape,
)

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
    """TE tensors of one DSConv layer: returns (inputs, outputs) for ``te.create_prim_func``.

    Inputs: the float input ``x`` [N, C, H, W], or (``layer.bfp_input``) its BFP form as the
    producer layer wrote it: stored mantissas ``[N, G, H, W, Bp]`` and exponents ``[N, G, H, W]``;
    then the constants and the residual.
    Outputs: the float output (unless ``layer.fp32_output`` is off) and, for
    ``layer.bfp_output``, the consumers' BFP input in that layout (:func:`quantized_output`)."""
    from tvm import te, tirx

    if layer.act_dtype not in ACT_DTYPES:
        raise ValueError(f"unsupported mantissa storage {layer.act_dtype!r}")
    n, c, h, w = layer.in_shape
    co = layer.computed_channels           # (out_slots: padded to the vector lanes, see CPUBackend)
    kh, kw = layer.kernel
    sh, sw = layer.geom.strides
    dh, dw = layer.geom.dilation
    bp, g = slots(layer), layer.groups
    _, _, oh, ow = layer.out_shape
    z = act_offset(layer)

    # packed weights in offset binary (x86: w + 2^(field-1)) are made signed bytes in the unpack
    # (no offset x mantissa sum to subtract); ARM's are two's complement fields (signed_dot)
    signed = signed_dot(layer)
    npb, field, w_off = per_byte(layer.bits), field_bits(layer.bits), weight_offset(layer.bits, signed)
    # the prologue's constants, one per op (after the bias, before the residual in the params)
    prologue = [te.placeholder((c,), "float32", name=f"pro_{op}{i}") for i, op in enumerate(layer.prologue)]
    if layer.bfp_input:
        if layer.has_prologue or layer.input_nhwc:
            raise ValueError("a layer with a prologue or a channel-innermost input reads the float input, "
                             "not fused BFP")
        inputs = [te.placeholder((n, g, h, w, bp), layer.act_dtype, name="x_mant"),
                  te.placeholder((n, g, h, w), "int32", name="x_exp")]
        bfp = bfp_stages(None, layer, _OTHER, exponents=inputs[1])
        mant_at = padded_bfp_input(layer, inputs[0])
    else:
        if layer.input_nhwc and layer.has_prologue:
            raise ValueError("a layer with a prologue reads an NCHW input")
        x = te.placeholder((n, h, w, c) if layer.input_nhwc else (n, c, h, w), "float32", name="x")
        inputs = [x]
        if layer.input_nhwc:           # read as NCHW by the stages (channel-innermost loads)
            x = NHWCView(x)
        # the quantization pass vectorized (tirx.round: the same half-to-even integers as
        # nearbyint, which would make the loop serial); the prologue (if any) a stage of its own,
        # computed per row of the quantization or inlined into it by the schedule
        # (its channels padded to every slot the mantissas read, so that those read it unclamped)
        if layer.has_prologue:
            reader = prologue_reader(x, layer, prologue)
            x = te.compute((n, (g - 1) * layer.block + bp, h, w),
                           lambda nn, ch, yy, xx: reader[nn, tirx.min(ch, c - 1), yy, xx], name="prologue",
                           attrs=_OTHER)
        # (a channel-innermost input of whole blocks: unclamped channel indices, so the block's
        # channels are one contiguous vector load)
        whole = layer.has_prologue or (layer.input_nhwc and c % layer.block == 0 and bp == layer.block)
        bfp = bfp_stages(x, layer, _OTHER, whole_blocks=whole, vector_rint=True)
        bfp_m = stored_mantissas(bfp, layer, "bfp_m")
        mant_at = lambda *i: bfp_m[i]                                    # noqa: E731
    wq = te.placeholder(weight_shape(layer), weight_dtype(layer.bits), name="w_packed")
    xi = te.placeholder((g, kh, kw, co), layer.scale_dtype, name="xi")
    inputs += [wq, xi]
    corr = bias = residual = None
    if z:
        corr = te.placeholder((g, kh, kw, co), "int32", name="corr")
        inputs.append(corr)
    if layer.has_bias:
        bias = te.placeholder((co,), "float32", name="bias")
        inputs.append(bias)
    inputs += prologue
    if layer.has_residual:
        n_, co_, oh_, ow_ = layer.out_shape
        residual = te.placeholder((n_, oh_, ow_, co_) if layer.residual_nhwc else layer.out_shape, "float32",
                                  name="residual")
        inputs.append(residual)
        if layer.residual_nhwc:
            residual = NHWCView(residual)

    def _unpack(gg, i, j, k4, o, t):       # field k4 % npb of byte k4 // npb (constant once unrolled)
        byte = wq[gg, i, j, k4 // npb, o, t]
        value = packed_field(byte, npb - 1, field, signed)
        for h in reversed(range(npb - 1)):
            value = tirx.if_then_else(k4 % npb == h, packed_field(byte, h, field, signed), value)
        return value if signed else value.astype("int8") - tirx.const(w_off, "int8")

    wu = te.compute((g, kh, kw, bp // TAP, co, TAP), _unpack, name="w_unpack", attrs=_OTHER) if npb > 1 else wq

    rk = te.reduce_axis((0, bp), name="rk")
    acc = te.compute(
        (n, g, kh, kw, oh, ow, co),
        lambda nn, gg, i, j, p, q, o: te.sum(
            mant_at(nn, gg, p * sh + i * dh, q * sw + j * dw, rk).astype("int32")
            * wu[gg, i, j, rk // TAP, o, rk % TAP].astype("int32"), axis=rk),
        name="dsconv_acc", attrs=_OTHER)

    def _block_int(nn, gg, i, j, p, q, o):
        v = acc[nn, gg, i, j, p, q, o]
        return v - corr[gg, i, j, o] if corr is not None else v

    out = block_scaled_sum(layer, _block_int, xi, bfp.bfp_s, attrs={"schedule_rule": "dsconv"})
    y = epilogue(layer, out, bias, residual, attrs=_OTHER)
    if layer.bfp_output is None and not layer.fp32_nhwc:
        return inputs, [y]
    fp32 = []
    if layer.fp32_output:          # a copy of the epilogue's tile (the schedule keeps that one in L1)
        if layer.fp32_nhwc:
            n_, co_, oh_, ow_ = layer.out_shape
            fp32 = [te.compute((n_, oh_, ow_, co_), lambda nn, p, q, o: y[nn, o, p, q], name="dsconv_fp32",
                               attrs=_OTHER)]
        else:
            fp32 = [te.compute(layer.out_shape, lambda *i: y(*i), name="dsconv_fp32", attrs=_OTHER)]
    return inputs, fp32 + (quantized_output(layer, y) if layer.bfp_output is not None else [])


class NHWCView:
    """A channel-innermost tensor ``t`` [N, H, W, C] indexed (and called) as NCHW."""

    def __init__(self, t):
        self.t = t

    def __getitem__(self, idx):
        nn, c, yy, xx = idx
        return self.t[nn, yy, xx, c]

    def __call__(self, *idx):
        return self[idx]


def stored_mantissas(bfp, layer: DSConvLayer, name: str, bp: int | None = None):
    """``[N, G, Hp, Wp, Bp]`` the mantissas of ``layer``'s input as stored (``act_dtype``, offset
    :func:`.layout.act_offset`, padded: channels to ``Bp`` slots -- ``bp``, default
    :func:`.layout.slots` --, pixels to the conv padding)."""
    from tvm import te

    n, _, h, w = layer.in_shape
    pt, pl, pb, pr = layer.geom.padding
    z = float(act_offset(layer))
    return te.compute((n, layer.groups, h + pt + pb, w + pl + pr, bp or slots(layer)),
                      lambda nn, gg, yy, xx, k: (bfp.mantissa(nn, gg, k, yy, xx) + z).astype(layer.act_dtype),
                      name=name, attrs=_OTHER)


def padded_bfp_input(layer: DSConvLayer, mant):
    """The reader ``(n, g, y, x, k) -> stored mantissa`` of a BFP input at padded positions, read in
    place (no padded copy): outside the image it reads the nearest pixel (the index clamped, so
    speculated vector loads stay inside); that block's scale is 0 there (``bfp_s``), so the term
    is 0 whatever the integers are."""
    _, _, h, w = layer.in_shape
    pt, pl, _, _ = layer.geom.padding

    def _mant_at(nn, gg, yy, xx, k):
        return mant[nn, gg, clamp_index(yy - pt, h), clamp_index(xx - pl, w), k]

    return _mant_at


def output_view(layer: DSConvLayer) -> DSConvLayer:
    """The consumers' view of ``layer``'s output: an unpadded input of their BFP format (what
    :func:`quantized_output` quantizes for; the slots come from the format, not from the view's
    weight bits)."""
    fmt = layer.bfp_output
    return DSConvLayer(layer.out_shape, layer.out_channels, (1, 1), ConvGeometry(), 8, fmt.block, fmt.mantissa,
                       fmt.unsigned, act_dtype=layer.act_dtype)


def quantized_output(layer: DSConvLayer, y) -> list:
    """The epilogue's output ``y`` quantized for the consumers (``layer.bfp_output``), with the
    same stages as a layer quantizing its own input: stored mantissas ``next_m``
    [N, G', OH, OW, Bp'] and exponents ``next_bfp_e`` [N, G', OH, OW]."""
    fmt, view = layer.bfp_output, output_view(layer)
    whole = view.in_shape[1] % fmt.block == 0 and fmt.slots == fmt.block
    # rounded like the consumers' own quantization pass (the vectorizable tirx.round)
    stages = bfp_stages(y, view, _OTHER, prefix="next_", whole_blocks=whole, vector_rint=True)
    mant = stored_mantissas(stages, view, "next_m", fmt.slots)
    return [mant, stages.bfp_e]


def dsconv_primfunc(layer: DSConvLayer):
    """The PrimFunc of one DSConv layer, unscheduled (:mod:`.schedule` schedules it)."""
    inputs, outputs = dsconv_te(layer)
    return layer_primfunc([*inputs, *outputs], layer_description(layer))


def layer_description(layer: DSConvLayer) -> str:
    """The value of the DSConv attribute of a CPU layer's PrimFunc (part of the tuning workload:
    changing it orphans the shipped schedules)."""
    return (f"bits={layer.bits} block={layer.block} mantissa={layer.mantissa} "
            f"unsigned={int(layer.unsigned)} act={layer.act_dtype} in={list(layer.in_shape)} "
            f"out={list(layer.out_shape)} kernel={list(layer.kernel)} strides={list(layer.geom.strides)} "
            f"padding={list(layer.geom.padding)} dilation={list(layer.geom.dilation)} "
            f"residual={int(layer.has_residual)}" + fused_bfp_description(layer))


def fused_bfp_description(layer: DSConvLayer) -> str:
    """The fused-BFP and prologue part of :func:`layer_description` (empty for a layer with float
    input and output and no prologue: their workloads, and the shipped records of them, are
    unchanged)."""
    out = " bfp_in=1" if layer.bfp_input else ""
    fmt = layer.bfp_output
    if fmt is not None:
        out += (f" bfp_out=block:{fmt.block},mantissa:{fmt.mantissa},unsigned:{int(fmt.unsigned)},"
                f"slots:{fmt.slots} fp32_out={int(layer.fp32_output)}")
    if layer.fp32_nhwc:
        out += " fp32_nhwc=1"
    if layer.residual_nhwc:
        out += " residual_nhwc=1"
    if layer.input_nhwc:
        out += " input_nhwc=1"
    if layer.has_prologue:
        out += " prologue=" + "+".join(layer.prologue + ("relu",) * layer.prologue_relu)
    if layer.out_slots:
        out += f" out_slots={layer.out_slots}"
    return out
