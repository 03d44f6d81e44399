"""A depthwise fp32 conv on a channel-innermost input ([N, H, W, C]), with its bias and clamp: the
middle of an inverted residual block (expansion DSConv 1x1 -> depthwise -> projection DSConv 1x1,
MobileNetV2) where the rewrite runs it between two DSConv layers that write and read that layout
(:mod:`dsconv_tvm.rewrite.nhwc`).  TE and its default schedule (:class:`DepthwiseNHWCCPU`).

``dw_conv[n, p, q, c] = sum_(i, j) x[n, p*s + i*d - pt, q*s + j*d - pl, c] * w[i, j, c]`` (0 outside
the image: the index clamped and the term selected, no padded copy), then ``dw_out = clamp(dw_conv +
bias[c])`` in float32, as the graph's conv, add and clip compute it (the sum in another order).

Schedule: output rows in parallel; per row, tiles of ``QT`` pixels x one vector of channels
(:func:`.rules.fp32_lanes`) accumulated in registers, the taps unrolled (a contiguous weight
vector per tap, one contiguous input vector per pixel and tap), bias and clamp applied as the tile
is written back."""

from __future__ import annotations

import numpy as np
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target

from ..common import activated, clamp_index
from .rules import fp32_lanes
from .schedule import is_aarch64, largest_divisor

#: the PrimFunc attribute that marks these functions (the activation and the shape, for reading)
DEPTHWISE_ATTR = "dsconv.depthwise_nhwc"
#: output pixels per register tile, best first (accumulator vectors: 16 NEON / zmm, 8 ymm, see
#: :func:`tile_pixels`)
PIXELS = (8, 7, 6, 5, 4, 3, 2)


def depthwise_nhwc_te(in_shape, kernel, geom, has_bias: bool, activation: str):
    """TE tensors (inputs, output) of the depthwise conv of an NCHW-described ``in_shape`` (N, C, H,
    W) read channel-innermost: ``x`` [N, H, W, C], ``w`` [KH, KW, C], ``bias`` [C]."""
    from tvm import te

    n, c, h, w = (int(v) for v in in_shape)
    kh, kw = kernel
    sh, sw = geom.strides
    dh, dw = geom.dilation
    pt, pl, _, _ = geom.padding
    oh, ow = geom.out_size(h, w, kh, kw)
    x = te.placeholder((n, h, w, c), "float32", name="x")
    wt = te.placeholder((kh, kw, c), "float32", name="w")
    inputs = [x, wt]
    ri = te.reduce_axis((0, kh), name="ri")
    rj = te.reduce_axis((0, kw), name="rj")
    zero = tirx.const(0.0, "float32")

    def _tap(nn, p, q, ch):
        yy, xx = p * sh + ri * dh - pt, q * sw + rj * dw - pl
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, x[nn, clamp_index(yy, h), clamp_index(xx, w), ch], zero)

    conv = te.compute((n, oh, ow, c), lambda nn, p, q, ch: te.sum(_tap(nn, p, q, ch) * wt[ri, rj, ch], axis=[ri, rj]),
                      name="dw_conv")
    bias = None
    if has_bias:
        bias = te.placeholder((c,), "float32", name="bias")
        inputs.append(bias)

    def _epilogue(nn, p, q, ch):
        v = conv[nn, p, q, ch]
        return activated(v + bias[ch] if bias is not None else v, activation)

    return inputs, te.compute((n, oh, ow, c), _epilogue, name="dw_out")


def depthwise_nhwc_primfunc(in_shape, kernel, geom, has_bias: bool, activation: str):
    """The PrimFunc of :func:`depthwise_nhwc_te`, marked with :data:`DEPTHWISE_ATTR`."""
    from tvm import te

    inputs, out = depthwise_nhwc_te(in_shape, kernel, geom, has_bias, activation)
    func = te.create_prim_func([*inputs, out]).without_attr("global_symbol")
    desc = (f"in={list(in_shape)} kernel={list(kernel)} strides={list(geom.strides)} padding={list(geom.padding)} "
            f"dilation={list(geom.dilation)} bias={int(has_bias)} act={activation}")
    return func.with_attr(DEPTHWISE_ATTR, desc).with_attr("op_pattern", 8)      # opaque: not fused


def depthwise_nhwc_params(w: np.ndarray, bias: np.ndarray | None) -> list[np.ndarray]:
    """The OIHW depthwise weight (C, 1, KH, KW) as [KH, KW, C] (a contiguous channel vector per
    tap), and the bias."""
    out = [np.ascontiguousarray(w[:, 0].transpose(1, 2, 0).astype(np.float32))]
    return out + ([np.ascontiguousarray(bias, np.float32)] if bias is not None else [])


def tile_pixels(ow: int, lanes: int, aarch64: bool) -> int:
    """Output pixels per register tile: accumulators in half the vector registers (16 on AVX-512
    and NEON, 8 on AVX2's 16 ymm), at most :data:`PIXELS`' largest."""
    budget = 8 if lanes == 16 or aarch64 else 6
    return largest_divisor(ow, [p for p in PIXELS if p <= budget])


def schedule_depthwise_nhwc(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
    """Default schedule (see the module's docstring)."""
    sch = s_tir.Schedule(func)
    conv, out = sch.get_sblock("dw_conv"), sch.get_sblock("dw_out")
    n_, p_, q_, c_ = sch.get_loops(out)
    ow, c = int(sch.get(q_).extent), int(sch.get(c_).extent)
    lanes = fp32_lanes(target)
    vec = largest_divisor(c, [lanes, lanes // 2, 4, 2])
    qt = tile_pixels(ow, lanes, is_aarch64(target))
    qo, qi = sch.split(q_, [None, qt])
    co, ci = sch.split(c_, [None, vec])
    sch.reorder(n_, p_, qo, co, qi, ci)
    sch.parallel(sch.fuse(n_, p_))
    sch.compute_at(conv, co, preserve_unit_loops=True)
    *_, a_q, a_c, ri, rj = sch.get_loops(conv)
    sch.reorder(ri, rj, a_q, a_c)
    sch.vectorize(a_c)
    for loop in (ri, rj, a_q):
        sch.unroll(loop)
    sch.decompose_reduction(conv, ri)
    sch.unroll(qi)
    sch.vectorize(ci)
    return sch


class DepthwiseNHWCCPU(dlight.ScheduleRule):
    """Default schedule of the channel-innermost depthwise convs (:data:`DEPTHWISE_ATTR`) on llvm
    targets."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, _tunable):
        if not self.is_target_available(target) or not isinstance(func, tirx.PrimFunc) or \
                func.attrs is None or DEPTHWISE_ATTR not in func.attrs:
            return None
        return schedule_depthwise_nhwc(func, target)
