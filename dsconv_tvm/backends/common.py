"""What every backend's DSConv kernel shares: the numpy slot layout of the weights and scales, the
TE stages of block-floating-point quantization, the float sum across blocks and taps, the
epilogue, and the one attribute that marks a DSConv PrimFunc on every backend.

The block-floating-point stages (one PrimFunc does the whole layer, so activations are quantized
inside the compiled graph from the real input):

1. ``amax``   max |x| over each block of channels, per pixel                      (float32)
   ``bfp_e``  the block's shared exponent, from the bits of that float (int32, exact)
2. ``bfp_s``  the block scales 2^(e - f), exact powers of two built from exponent bits,
   and the mantissa expression each backend stores in its own layout;
3. (backend) integer dot products over one block at one kernel tap;
4. ``dsconv_out``  float32 sum over blocks and taps of int * xi * scale  (:func:`block_scaled_sum`)
5. ``dsconv_epilogue``  + bias, + residual, then the activation (none / relu / relu6)  (:func:`epilogue`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..scheme.bfp import E_MAX, E_MIN, fraction_bits, mantissa_range, num_blocks
from ..scheme.layer import ACTIVATIONS, PROLOGUE_OPS, DSConvLayer

#: The PrimFunc attribute every backend sets on its DSConv functions (and only there): the test of
#: "is this a DSConv layer" everywhere (schedules, tuning, reports).
LAYER_ATTR = "dsconv.layer"


def is_dsconv(func) -> bool:
    """True for a DSConv PrimFunc of any backend (it carries :data:`LAYER_ATTR`)."""
    from tvm import tirx

    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and LAYER_ATTR in func.attrs


def layer_attr_value(func, key: str, default: str | None = None) -> str | None:
    """One ``key=value`` item of a DSConv PrimFunc's :data:`LAYER_ATTR` (e.g. ``bits``)."""
    attr = str(func.attrs[LAYER_ATTR]) if is_dsconv(func) else ""
    for item in attr.split():
        if item.startswith(key + "="):
            return item[len(key) + 1:]
    return default


def get_block(sch, name: str):
    """The block ``name`` of a TIR schedule, or None when the function has none of that name."""
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001  (ScheduleError: no such block)
        return None


# --------------------------------------------------------------------------------------------------
# numpy: weights and scales in the slot layout
# --------------------------------------------------------------------------------------------------
def slot_weights(q: np.ndarray, bits: int, block: int, step: int) -> np.ndarray:
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


def pack_scales(xi: np.ndarray, scale_dtype: str) -> np.ndarray:
    """KDS scales (CO, G, KH, KW) -> the kernels' (G, KH, KW, CO) layout in ``scale_dtype``."""
    return np.ascontiguousarray(xi.transpose(1, 2, 3, 0).astype(scale_dtype))


# --------------------------------------------------------------------------------------------------
# TE
# --------------------------------------------------------------------------------------------------
def pow2(exponent):
    """2^exponent as an exact float32 built from its bits (exponent an int32 expr in [-126, 127])."""
    from tvm import tirx

    return tirx.reinterpret("float32", (exponent + 127) << 23)


@dataclass
class BFPStages:
    """The block-floating-point stages shared by the backends' DSConv kernels."""

    amax: object        # [N, G, H, W] max |x| over each block of channels, per pixel (or None)
    bfp_e: object       # [N, G, H, W] the block's shared exponent (from the float's bits, exact)
    bfp_s: object       # [N, G, H+pad, W+pad] block scales 2^(e - f), 0 in the padding
    mantissa: object    # (n, g, k, y, x) -> float mantissa of channel k of block g at padded (y, x)


def bfp_stages(x, layer: DSConvLayer, attrs=None, prefix: str = "", exponents=None,
               whole_blocks: bool = False, vector_rint: bool = False) -> BFPStages:
    """TE stages quantizing ``x`` [N, C, H, W] to BFP for ``layer`` (exponents per block and
    pixel; mantissas rounded and clamped, 0 outside the image and beyond the channels).  Block
    names start with ``prefix``.  ``exponents`` [N, G, H, W] int32: the exponents are given (an
    input quantized by the producer layer): then only ``bfp_s`` is built (``x`` may be None).
    ``whole_blocks``: the channels are a whole number of blocks and the mantissas are read only for
    channels < C (or ``x`` has every channel slot the stages read), so channel indices need no
    clamping (a clamped index defeats the region analysis of a stage computed under a tile loop).

    Mantissas are rounded half to even with ``tirx.nearbyint``.  ``vector_rint`` (LLVM targets
    only): with ``tirx.round`` instead, which TVM 0.27 lowers on LLVM to the same
    ``llvm.nearbyint`` (``frinti`` on AArch64: the same integers) but, unlike ``nearbyint``, can
    vectorize: a vectorized loop containing ``nearbyint`` is silently made serial."""
    from tvm import te, tirx

    rint = tirx.round if vector_rint else tirx.nearbyint

    n, c, h, w = layer.in_shape
    pt, pl, pb, pr = layer.geom.padding
    bsz, g = layer.block, layer.groups
    hp, wpd = h + pt + pb, w + pl + pr
    f = fraction_bits(layer.mantissa, layer.unsigned)
    lo, hi = mantissa_range(layer.mantissa, layer.unsigned)
    zero = tirx.const(0.0, "float32")
    amax = None

    def _channel(ch):
        return ch if whole_blocks else tirx.min(ch, c - 1)

    if exponents is None:
        r = te.reduce_axis((0, bsz), name="r")

        def _abs_in_block(nn, gg, yy, xx):
            ch = gg * bsz + r
            v = tirx.abs(x[nn, _channel(ch), yy, xx])
            return v if c % bsz == 0 else tirx.if_then_else(ch < c, v, zero)

        amax = te.compute((n, g, h, w), lambda nn, gg, yy, xx: te.max(_abs_in_block(nn, gg, yy, xx), axis=r),
                          name=prefix + "amax", attrs=attrs)

        def _exponent_of_amax(nn, gg, yy, xx):
            bits = tirx.reinterpret("int32", amax[nn, gg, yy, xx])
            e = ((bits >> 23) & 0xFF) - 126                      # amax in [2^(e-1), 2^e); 0 -> -126
            return tirx.max(tirx.min(e, E_MAX), E_MIN)

        # once per block and pixel
        bfp_e = te.compute((n, g, h, w), _exponent_of_amax, name=prefix + "bfp_e", attrs=attrs)
    else:
        bfp_e = exponents

    def _scale(nn, gg, yy, xx):
        e = bfp_e[nn, gg, clamp_index(yy - pt, h), clamp_index(xx - pl, w)]
        return tirx.if_then_else(in_image(layer, yy, xx), pow2(e - f), zero)

    bfp_s = te.compute((n, g, hp, wpd), _scale, name=prefix + "bfp_s", attrs=attrs)

    def _mantissa(nn, gg, k, yy, xx):
        ch = gg * bsz + k
        y0, x0 = clamp_index(yy - pt, h), clamp_index(xx - pl, w)
        val = x[nn, _channel(ch), y0, x0] * pow2(f - bfp_e[nn, gg, y0, x0])
        q = tirx.max(tirx.min(rint(val), float(hi)), float(lo))
        return tirx.if_then_else(tirx.all(in_image(layer, yy, xx), k < bsz, ch < c), q, zero)

    return BFPStages(amax, bfp_e, bfp_s, _mantissa)


def prologue_reader(x, layer: DSConvLayer, consts=()):
    """``x`` [N, C, H, W] as the quantization stages read it: ``layer``'s prologue applied where it
    has one (each op of ``layer.prologue`` with its constant ``consts[i][c]``, in order, then
    ``max(., 0)``: the graph's pre-activation BN + ReLU, in the same float32 order), inline in
    those stages (no pass of its own); else ``x`` itself.

    Every float32 op rounds on its own, as ONNX (and numpy) compute them: TVM's LLVM contracts a
    multiply feeding an add into one FMA (one rounding) where it sees them together -- as here,
    but not in the graph's separate elementwise passes -- so each product goes through
    ``max(p, -inf)``, the same value for every non-NaN ``p`` (a NaN becomes -inf), which LLVM
    does not fold away and an FMA cannot be formed across."""
    from tvm import tirx

    if not layer.has_prologue:
        return x
    if len(consts) != len(layer.prologue) or not set(layer.prologue) <= set(PROLOGUE_OPS):
        raise ValueError(f"prologue {layer.prologue} with {len(consts)} constants")

    class _Reader:
        def __getitem__(self, idx):
            v = x(*idx)
            for op, const in zip(layer.prologue, consts):
                c = const[idx[1]]
                if op == "multiply":       # max(., -inf): the product rounded on its own (see above)
                    v = tirx.max(v * c, tirx.const(-math.inf, "float32"))
                else:
                    v = v - c if op == "subtract" else v / c if op == "divide" else v + c
            return tirx.max(v, tirx.const(0.0, "float32")) if layer.prologue_relu else v

    return _Reader()


def in_image(layer: DSConvLayer, yy, xx):
    """Whether the padded input position (yy, xx) of ``layer`` lies inside the image."""
    from tvm import tirx

    _, _, h, w = layer.in_shape
    pt, pl, _, _ = layer.geom.padding
    return tirx.all(yy >= pt, yy < pt + h, xx >= pl, xx < pl + w)


def clamp_index(v, size):
    """``v`` clamped to [0, size): keeps speculated (vectorized) reads inside the image."""
    from tvm import tirx

    return tirx.max(tirx.min(v, size - 1), 0)


def block_scaled_sum(layer: DSConvLayer, block_int, xi, bfp_s, attrs=None):
    """``dsconv_out[n, co, p, q]``: the float32 sum over blocks g and taps (i, j) of
    ``float(block_int(n, g, i, j, p, q, co)) * xi[g, i, j, co] * bfp_s[n, g, p*s + i*d, q*s + j*d]``,
    where ``block_int`` is the backend's exact int32 dot product of the block at that tap; over
    the layer's computed channels (``out_slots``, padded: the epilogue writes the first
    ``out_channels``)."""
    from tvm import te

    n, _, oh, ow = layer.out_shape
    co = layer.computed_channels
    kh, kw = layer.kernel
    sh, sw = layer.geom.strides
    dh, dw = layer.geom.dilation
    rg = te.reduce_axis((0, layer.groups), name="rg")
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    return te.compute(
        (n, co, oh, ow),
        lambda nn, o, p, q: te.sum(
            block_int(nn, rg, ri, rj, p, q, o).astype("float32") * xi[rg, ri, rj, o].astype("float32")
            * bfp_s[nn, rg, p * sh + ri * dh, q * sw + rj * dw], axis=[rg, ri, rj]),
        name="dsconv_out", attrs=attrs)


def epilogue(layer: DSConvLayer, out, bias=None, residual=None, attrs=None):
    """``dsconv_epilogue``: + bias[co], + residual (a tensor of the output's shape, or a function
    ``(n, co, p, q) -> value`` reading another layout), then the activation."""
    from tvm import te

    def _epilogue(nn, o, p, q):
        v = out[nn, o, p, q]
        if bias is not None:
            v = v + bias[o]
        if residual is not None:
            v = v + (residual(nn, o, p, q) if callable(residual) else residual[nn, o, p, q])
        return activated(v, layer.activation)

    return te.compute(layer.out_shape, _epilogue, name="dsconv_epilogue", attrs=attrs)


def activated(v, activation: str):
    """``v`` (a float32 TIR expression) with ``activation`` applied: a clamp to its
    :data:`ACTIVATIONS` bounds (relu: max(v, 0); relu6: then min(., 6))."""
    from tvm import tirx

    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}")
    lower, upper = ACTIVATIONS[activation]
    if lower > -math.inf:
        v = tirx.max(v, tirx.const(lower, "float32"))
    if upper < math.inf:
        v = tirx.min(v, tirx.const(upper, "float32"))
    return v


def layer_primfunc(tensors: list, attr: str):
    """The PrimFunc of a layer's TE ``tensors`` (inputs, then the output), marked as DSConv with the
    backend's description ``attr`` and opaque to fusion (op_pattern 8 = kOpaque: FuseOps leaves the
    call alone; the layer's own epilogue does bias / residual / activation)."""
    from tvm import te

    func = te.create_prim_func(tensors).without_attr("global_symbol")
    return func.with_attr(LAYER_ATTR, attr).with_attr("op_pattern", 8)


def import_cpu_tensor_intrinsics() -> None:
    """Import only TVM's x86/ARM tensor intrinsics, not the whole ``tvm.s_tir.tensor_intrin``
    package: its ``__init__`` parses ~250 CUDA intrinsics and takes ~25 s, longer than
    MetaSchedule's build timeout (see it with ``python -X importtime -c "import
    tvm.s_tir.tensor_intrin"``).  TVM's trace replay imports the package by name; an empty package
    module registered in ``sys.modules`` with the real ``__path__`` makes that import a no-op while
    its x86 and arm_cpu submodules load normally.  Also the builder workers' initializer."""
    import importlib
    import os
    import sys
    import types

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        sys.modules[name] = mod
        for sub in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{sub}")
