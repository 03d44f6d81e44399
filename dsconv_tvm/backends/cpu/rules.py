"""Default CPU schedules of what a DSConv model keeps in fp32: the convs DSConv does not convert
(first layer, depthwise, grouped), 2-D pooling, and a parallel fallback for every other PrimFunc."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target

from ..common import get_block, is_dsconv
from .schedule import is_aarch64, largest_divisor, vector_lanes


def _conv_block(sch: s_tir.Schedule, func: tirx.PrimFunc):
    """The conv reduction block of a legalized fp32 conv2d PrimFunc (TOPI's conv2d_nchw,
    depthwise_conv2d_nchw, group_conv2d_nchw with a fused elementwise epilogue), or None."""
    convs = []
    for blk in _all_blocks(sch):
        b = sch.get(blk)
        kinds = _iter_kinds(b)
        if kinds in ("SSSSRRR", "SSSSRR") and "conv2d" in b.name_hint and b.writes[0].source.dtype == "float32":
            convs.append(blk)
    return convs[0] if len(convs) == 1 else None


def _all_blocks(sch: s_tir.Schedule):
    root = sch.get_sblock("root") if get_block(sch, "root") is not None else None
    return sch.get_child_blocks(root) if root is not None else []


def schedule_fp32_conv(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
    """Default schedule of the fp32 convs DSConv keeps (first layer, depthwise): a register tile of
    ``FT`` output channels x ``XT`` output pixels of a row (vectorized along the row), the
    reduction over input channels and taps outside it, rows in parallel, the padded input rows a
    row needs made per row, bias/ReLU applied to the tile.  Returns None if ``func`` is not one."""
    sch = s_tir.Schedule(func)
    conv = _conv_block(sch, func)
    if conv is None:
        return None
    loops = sch.get_loops(conv)
    if len(loops) not in (6, 7):
        return None
    co, ow = int(sch.get(loops[1]).extent), int(sch.get(loops[3]).extent)
    tile = outer_product_tile(target)
    if tile is not None and sch.get(conv).name_hint == "conv2d_nchw" and co % tile[0][-1] == 0:
        return _outer_product_conv(sch, conv, loops, tile)
    lanes = 16 if vector_lanes(target) == 16 else 8
    xt = largest_divisor(ow, [2 * lanes, lanes, 14, 7, 12, 6, 4]) if ow > 2 * lanes else ow
    ft = largest_divisor(co, [4, 2]) if xt >= lanes else largest_divisor(co, [8, 4, 2])
    # elementwise consumers (bias, ReLU, ...): inline into the last one, applied per tile
    consumers = _inline_consumers(sch, conv)
    outer, xo, fi, xi = _tile(sch, loops, ft, xt, channels_inner=False)
    # AArch64: the tile in the default scope (on the stack, see schedule.py); "local" costs a
    # TVMBackendAllocWorkspace/Free pair per tile (MobileNetV2's depthwise convs: 30,000 per
    # inference).  x86 keeps the libraries its schedules were measured with.
    cw = sch.cache_write(conv, 0, "global" if is_aarch64(target) else "local")
    sch.reverse_compute_at(cw, xo, preserve_unit_loops=True)
    _consumers_per_tile(sch, consumers, xo)
    sch.vectorize(sch.get_loops(cw)[-1])
    return _finish(sch, conv, outer, loops[4], unrolled=fi, vectorized=xi)


def _tile(sch: s_tir.Schedule, loops, ft: int, xt: int, channels_inner: bool):
    """Split a conv's output channels by ``ft`` and its row by ``xt``, the reduction between the
    tile loops and the tile (channels innermost or pixels innermost), (image, channel tile, row)
    in parallel.  Returns (the parallel loop, the pixel-tile loop, channel loop, pixel loop)."""
    n_, f_, y_, x_ = loops[:4]
    fo, fi = sch.split(f_, [None, ft])
    xo, xi = sch.split(x_, [None, xt])
    sch.reorder(n_, fo, y_, xo, *loops[4:], *((xi, fi) if channels_inner else (fi, xi)))
    outer = sch.fuse(n_, fo, y_)
    sch.parallel(outer)
    return outer, xo, fi, xi


def _finish(sch: s_tir.Schedule, conv, outer, first_reduction, unrolled, vectorized) -> s_tir.Schedule:
    """The padded input rows made per parallel iteration, the tile's loops unrolled / vectorized,
    the reduction's init split off."""
    pad = get_block(sch, "pad_temp") or get_block(sch, "PaddedInput")
    if pad is not None:
        sch.compute_at(pad, outer, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(pad)[-1])
    sch.unroll(unrolled)
    sch.vectorize(vectorized)
    sch.decompose_reduction(conv, first_reduction)
    return sch


def _inline_consumers(sch: s_tir.Schedule, conv) -> list:
    """Inline the elementwise consumers of ``conv`` (bias, ReLU, ...) into the last one; returns
    the consumers left (applied per tile by the caller)."""
    consumers = sch.get_consumers(conv)
    while len(consumers) == 1:
        nxt = sch.get_consumers(consumers[0])
        if len(nxt) != 1:
            break
        try:
            sch.compute_inline(consumers[0])
        except Exception:  # noqa: BLE001  (not an injective elementwise op: leave it)
            break
        consumers = nxt
    return consumers


def _consumers_per_tile(sch: s_tir.Schedule, consumers: list, loop) -> None:
    """Apply the (inlined) elementwise consumers to each tile under ``loop``, vectorized."""
    for c in consumers:
        if c is not None and _get_block_rv_alive(sch, c):
            try:
                sch.reverse_compute_at(c, loop, preserve_unit_loops=True)
                sch.vectorize(sch.get_loops(c)[-1])
            except Exception:  # noqa: BLE001
                pass


#: fp32 conv outer-product register tiles, (output channel choices, pixel choices) per ISA, best
#: first: AArch64 (32 NEON registers of 4 floats), AVX-512 (32 zmm registers of 16 floats; one
#: zmm of channels x 8 pixels measured best on the stem, 0.72 vs 2.4 ms; tiles of 256 floats and
#: more, e.g. 32 x 8, compile to code 15x slower)
OUTER_TILES = {
    "aarch64": ((16, 8), (6, 4, 7, 8, 5, 3, 2)),
    "avx512": ((16,), (8, 7, 6, 4, 5, 3, 2)),
}


def outer_product_tile(target: Target):
    """The outer-product register tile choices of ``target``'s fp32 convs (see
    :data:`OUTER_TILES`), or None where the row-vectorized tile is kept (AVX2)."""
    if is_aarch64(target):
        return OUTER_TILES["aarch64"]
    return OUTER_TILES["avx512"] if vector_lanes(target) == 16 else None


def _outer_product_conv(sch: s_tir.Schedule, conv, loops, tile) -> s_tir.Schedule:
    """An SGEMM-like outer-product register tile (``tile``: :data:`OUTER_TILES`), e.g. on AArch64 16
    output channels (4 vectors) x up to 6 pixels of a row, ``fmla`` of a weight vector by one
    input value per pixel (on AVX-512 one zmm of 16 channels x up to 8 pixels); the weights of
    the tile's channels copied once per output row with the channels innermost (a contiguous
    vector per tap), so neither operand is a strided gather (the row-vectorized tile of
    :func:`schedule_fp32_conv` reads a stride-2 stem's input pixel by pixel)."""
    co, ow = int(sch.get(loops[1]).extent), int(sch.get(loops[3]).extent)
    ft = largest_divisor(co, list(tile[0]))
    xt = largest_divisor(ow, list(tile[1]))
    consumers = _inline_consumers(sch, conv)
    outer, xo, fi, xi = _tile(sch, loops, ft, xt, channels_inner=True)
    weight = next(i for i, r in enumerate(sch.get(conv).reads)
                  if len(r.source.shape) == 4 and int(r.source.shape[0]) == co)
    wc = sch.cache_read(conv, weight, "global")
    sch.transform_layout(wc, ("write", 0), lambda f, c, i, j: (c, i, j, f))
    sch.compute_at(wc, outer, preserve_unit_loops=True)
    cw = sch.cache_write(conv, 0, "global")
    sch.reverse_compute_at(cw, xo, preserve_unit_loops=True)
    for c in consumers:                  # bias / ReLU applied as the tile is written back
        try:
            sch.reverse_compute_inline(c)
        except Exception:  # noqa: BLE001  (not inlinable: applied per tile)
            _consumers_per_tile(sch, [c], xo)
    return _finish(sch, conv, outer, loops[4], unrolled=xi, vectorized=fi)


def _get_block_rv_alive(sch: s_tir.Schedule, blk) -> bool:
    try:
        sch.get(blk)
        return True
    except Exception:  # noqa: BLE001
        return False


class _FunctionRuleCPU(dlight.ScheduleRule):
    """A default schedule rule for CPUs made of one ``schedule(func, target)`` function that returns
    a schedule, or None for PrimFuncs it does not handle (those go on to the next rule)."""

    schedule = None

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, _tunable):
        if not self.is_target_available(target) or not isinstance(func, tirx.PrimFunc) or is_dsconv(func):
            return None
        try:
            return self.schedule(func, target)
        except Exception:  # noqa: BLE001  (a function this rule cannot handle: the next rule takes it)
            return None


class FP32ConvCPU(_FunctionRuleCPU):
    """Default schedule of the fp32 convs a DSConv model keeps (see :func:`schedule_fp32_conv`)."""

    schedule = staticmethod(schedule_fp32_conv)


def schedule_pool(func: tirx.PrimFunc, _target: Target) -> s_tir.Schedule | None:
    """Default schedule of a 2-D pooling PrimFunc (TOPI's pool2d, NCHW): the padding computed inline
    (no padded copy of the input), output rows in parallel, the window unrolled so each output is
    reduced in a register.  Returns None if ``func`` is not one."""
    sch = s_tir.Schedule(func)
    pools = [blk for blk in _all_blocks(sch)
             if _iter_kinds(sch.get(blk)) == "SSSSRR" and sch.get(blk).name_hint.startswith("pool_")]
    if len(pools) != 1:
        return None
    pool = pools[0]
    pad = get_block(sch, "pad_temp")
    if pad is not None:
        sch.compute_inline(pad)
    n_, c_, y_, _x, r0, r1 = sch.get_loops(pool)
    sch.parallel(sch.fuse(n_, c_, y_))
    sch.unroll(r0)
    sch.unroll(r1)
    for other in _all_blocks(sch):          # e.g. the division of an average pool: rows in parallel
        if not sch.get(other).same_as(sch.get(pool)):
            loops = sch.get_loops(other)
            if len(loops) == 4 and _iter_kinds(sch.get(other)) == "SSSS":
                sch.parallel(sch.fuse(*loops[:3]))
    return sch


def _iter_kinds(block) -> str:
    return "".join("S" if int(iv.iter_type) == 0 else "R" if int(iv.iter_type) == 2 else "O"
                   for iv in block.iter_vars)


class PoolCPU(_FunctionRuleCPU):
    """Default schedule of 2-D pooling (see :func:`schedule_pool`)."""

    schedule = staticmethod(schedule_pool)


class ParallelFallback(_FunctionRuleCPU):
    """Every other PrimFunc on a CPU (dense, softmax, elementwise ops, convs the fp32 rule does not
    take): run its outer spatial loops on all cores, and vectorize the innermost loop of purely
    elementwise loop nests.  Not fast, just not single-threaded scalar code."""

    def apply(self, func, target, _tunable):
        if not self.is_target_available(target) or not isinstance(func, tirx.PrimFunc):
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = dlight.normalize_prim_func(sch)
            if not infos:
                return None
            for info in infos:
                loops = sch.get_loops(info.block_rv)
                kinds = [it.kind for it in info.iters]
                if len(loops) != len(kinds):
                    continue
                lead = []
                for loop, kind in zip(loops, kinds):
                    if kind != "S":
                        break
                    lead.append(loop)
                if not lead:
                    continue
                if len(lead) == len(loops) and len(lead) > 1:        # elementwise: vectorize inner
                    extent = sch.get(lead[-1]).extent
                    if isinstance(extent, tirx.IntImm) and 2 <= int(extent) <= 64:
                        sch.vectorize(lead[-1])
                        lead = lead[:-1]
                if lead:
                    sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
            return sch
        except Exception:  # noqa: BLE001  (a function this simple rule cannot handle stays as it is)
            return None
