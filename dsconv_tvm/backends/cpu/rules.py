"""Default CPU schedules of what a DSConv model keeps in fp32: the convs DSConv does not convert
(first layer, depthwise, grouped), 2-D pooling, and a parallel fallback for every other PrimFunc."""

from __future__ import annotations

from tvm import s_tir, sym, tirx
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
    stride = _depthwise_stride(sch, conv)
    if stride is not None:
        return _depthwise_conv(sch, conv, loops, target, stride)
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


def _tile(sch: s_tir.Schedule, loops, ft: int, xt: int, channels_inner: bool, rows_outer: int = 0):
    """Split a conv's output channels by ``ft`` and its row by ``xt``, the reduction between the
    tile loops and the tile (channels innermost or pixels innermost), (image, channel tile, row)
    in parallel (``rows_outer``: (image, ``rows_outer`` rows), the channel tiles inside, those rows
    unrolled in the tile: what the parallel loop prepares, e.g. the padded input rows, is then
    made once per row).  Returns (the parallel loop, the pixel-tile loop, channel loop, pixel
    loop)."""
    n_, f_, y_, x_ = loops[:4]
    fo, fi = sch.split(f_, [None, ft])
    xo, xi = sch.split(x_, [None, xt])
    if rows_outer:
        yo, yi = sch.split(y_, [None, rows_outer])
        sch.reorder(n_, yo, fo, xo, *loops[4:], yi, *((xi, fi) if channels_inner else (fi, xi)))
        sch.unroll(yi)
        outer = sch.fuse(n_, yo)
        sch.parallel(outer)
        return outer, xo, fi, xi
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


def _depthwise_stride(sch: s_tir.Schedule, conv) -> int | None:
    """The stride (1 or 2) of a depthwise conv block (one input channel per output channel, read
    from a padded copy of the input, dilation 1), or None if ``conv`` is not one."""
    block = sch.get(conv)
    ivs = [iv.var for iv in block.iter_vars]
    if len(ivs) != 7 or int(block.iter_vars[4].dom.extent) != 1:
        return None
    co = int(block.iter_vars[1].dom.extent)
    shapes = [[int(d) for d in r.source.shape] for r in block.reads]
    if len(shapes) != 2 or shapes[1][:2] != [co, 1] or len(shapes[0]) != 4 or shapes[0][1] != co:
        return None
    if _pad_block(sch) is None:
        return None
    strides = set()
    for dim, (out, tap) in ((2, (ivs[2], ivs[5])), (3, (ivs[3], ivs[6]))):
        coef = sym.detect_linear_equation(block.reads[0].region[dim].min, [out, tap])
        if len(coef) != 3 or int(coef[1]) != 1:
            return None
        strides.add(int(coef[0]))
    return strides.pop() if len(strides) == 1 and strides <= {1, 2} else None


def _pad_block(sch: s_tir.Schedule):
    return get_block(sch, "pad_temp") or get_block(sch, "PaddedInput")


def _depthwise_conv(sch: s_tir.Schedule, conv, loops, target: Target, stride: int) -> s_tir.Schedule:
    """Depthwise conv (MobileNet's 3x3, bias + clip): a tile of ``yt`` output rows x the whole row,
    the row vectorized in pieces of whole vectors (:func:`_vectorize_row`), the taps unrolled
    (the weights broadcast scalars), channels in parallel, bias / clip applied as the tile is
    written back.  The padded input of a channel is made once, as a plane (or per tile of rows
    where that fits on the stack); at stride 2 each padded row is split into its even and odd
    pixels in that copy, so every tap reads a contiguous row (the row-vectorized tile of
    :func:`schedule_fp32_conv` reads it pixel by pixel: MobileNetV2's 17 depthwise convs 2.3 ->
    0.6 ms, 1 thread, AVX-512).  Tile and plane in the default scope (on the stack when under
    1 KiB; "local" costs a workspace call each)."""
    n_, f_, y_, x_, rc, ry, rx = loops
    oh, ow = int(sch.get(y_).extent), int(sch.get(x_).extent)
    lanes = fp32_lanes(target)
    vecs = sum(-(-p // lanes) for p in _row_pieces(ow, lanes))       # vectors of a row
    # accumulators of the tile: half the vector registers (AVX-512, NEON: 32; AVX2: 16), a quarter
    # for rows under one vector (14 x 14 maps: 7 rows, 0.024 vs 0.027 ms with 14); rows under half
    # a vector (7-wide) one at a time (576 x 14 x 14 at stride 2: 0.022 vs 0.030 ms with 7)
    budget = (16 if lanes == 16 or is_aarch64(target) else 8) // (2 if ow < lanes else 1)
    yt = 1 if 2 * ow <= lanes else max(d for d in range(1, oh + 1) if oh % d == 0 and d * vecs <= max(budget, vecs))
    pad = _pad_block(sch)
    padded = [int(d) for d in sch.get(pad).writes[0].source.shape]
    deinterleave = stride == 2 and padded[3] % 2 == 0 and int(sch.get(pad).reads[0].source.shape[3]) % 2 == 0
    consumers = _inline_consumers(sch, conv)
    yo, yi = sch.split(y_, [None, yt])
    sch.reorder(n_, f_, yo, rc, ry, rx, yi, x_)
    if deinterleave:
        sch.transform_layout(pad, ("write", 0), lambda n, c, h, w: (n, c, h, w % 2, w // 2))
    outer = sch.fuse(n_, f_)
    sch.parallel(outer)
    cw = _written_back(sch, conv, consumers, yo)
    sch.vectorize(sch.get_loops(cw)[-1])
    # rows under one vector: the padded rows of a tile made per tile where they fit on the stack
    # (under 1 KiB; a larger plane is a workspace call per channel): 14 x 14 maps, 0.017 vs 0.024
    # ms (wider rows, e.g. 28 x 28 in tiles of 4 rows, measured slower: 0.105 vs 0.037 ms)
    kh = int(sch.get(ry).extent)
    tile_rows = ow < lanes and yt > 1 and ((yt - 1) * stride + kh) * padded[3] * 4 < 1024
    # rows of whole vectors at stride 1: each padded element written once (7-wide rows: 0.030 vs
    # 0.017 ms on 960 x 7 x 7, zeroing whole rows first)
    sch.compute_at(pad, yo if tile_rows else outer, preserve_unit_loops=True)
    if tile_rows or deinterleave or ow < lanes or not _padded_plane(sch, pad):
        _padded_rows(sch, pad, deinterleave)
    for loop in (ry, rx, yi):
        sch.unroll(loop)
    if not _vectorize_row(sch, x_, ow, lanes):
        sch.decompose_reduction(conv, rc)
    return sch


def _padded_plane(sch: s_tir.Schedule, pad) -> bool:
    """The padded input plane made in parts, each element written once:
    the rows of zeros above and below, then per row the zeros left and right and the interior
    copied (vectorized); 0.067 vs 0.074 ms on 32 x 112 x 112 against zeroing whole rows first.
    False (nothing done) if the padding is not a constant border of ``pad``'s input."""
    block = sch.get(pad)
    src = [int(d) for d in block.reads[0].source.shape]
    ivs = [iv.var for iv in block.iter_vars]
    try:
        before = [-int(sym.detect_linear_equation(block.reads[0].region[d].min, [ivs[d]])[1]) for d in (2, 3)]
    except Exception:  # noqa: BLE001  (an index that is not input row/column + a constant)
        return False
    rows, cols = sch.get_loops(pad)[-2:]
    extents = [int(sch.get(loop).extent) for loop in (rows, cols)]
    if min(before) < 1 or extents != [src[2] + 2 * before[0], src[3] + 2 * before[1]]:
        return False
    name = block.name_hint
    sch.loop_partition(rows, [before[0], src[2], None])
    for blk in _pad_parts(sch, name):
        loop = sch.get_loops(blk)[-1]
        if int(sch.get(sch.get_loops(blk)[-2]).extent) == src[2]:      # the input rows
            sch.loop_partition(loop, [before[1], src[3], None])
    for blk in _pad_parts(sch, name):
        loop = sch.get_loops(blk)[-1]
        if int(sch.get(loop).extent) > 1:
            sch.vectorize(loop)
    return True


def _pad_parts(sch: s_tir.Schedule, name: str) -> list:
    """The blocks :meth:`loop_partition` made of the padding block ``name`` (not its wrappers)."""
    found, todo = [], _all_blocks(sch)
    while todo:
        blk = todo.pop(0)
        todo.extend(sch.get_child_blocks(blk))
        hint = sch.get(blk).name_hint
        if hint.startswith(name + "_") and not hint.endswith(("_partition", "_common")):
            found.append(blk)
    return found


def _padded_rows(sch: s_tir.Schedule, pad, deinterleave: bool) -> None:
    """The padded input rows made row by row: the row zeroed, then its interior copied
    (vectorized).  De-interleaved rows: the zeros stored half by half, the copy
    left to LLVM's loop vectorizer (wide loads + shuffles; TVM's vectorizer makes it a gather)."""
    fill = sch.decompose_padding(pad, sch.get_loops(pad)[-1])
    for blk, zeros in ((fill, True), (pad, False)):
        loop = sch.get_loops(blk)[-1]
        if not deinterleave:
            sch.vectorize(loop)
            continue
        pair, parity = sch.split(loop, [None, 2])
        if zeros:
            sch.reorder(parity, pair)
            sch.vectorize(pair)
        else:
            sch.unroll(parity)


def _row_pieces(width: int, lanes: int) -> list[int]:
    """A row of ``width`` in whole vectors: ``lanes`` at a time, the rest in halves, quarters, ...
    (56 = 48 + 8 on AVX-512); a row of one vector or less is one piece."""
    if width <= lanes:
        return [width]
    pieces, rest, p = [width // lanes * lanes], width % lanes, lanes // 2
    while rest:
        if rest >= p:
            pieces.append(p)
            rest -= p
        p //= 2
    return pieces


def _vectorize_row(sch: s_tir.Schedule, loop, width: int, lanes: int) -> bool:
    """Vectorize an output row in the pieces of :func:`_row_pieces`, as LLVM compiles a row-wide
    <56 x float> poorly (the weight broadcast built lane by lane: 0.137 vs 0.099 ms on 144 x 56 x
    56).  Returns whether the row was partitioned (the reduction's init then stays in the
    unrolled taps: decompose_reduction does not see through the partition blocks)."""
    pieces = _row_pieces(width, lanes)
    if width <= lanes:
        sch.vectorize(loop)
        return False
    parts = sch.loop_partition(loop, pieces[:-1] + [None]) if len(pieces) > 1 else [loop]
    for extent, part in zip(pieces, parts):
        if extent > lanes:
            whole, lane = sch.split(part, [None, lanes])
            sch.unroll(whole)
            sch.vectorize(lane)
        elif extent > 1:
            sch.vectorize(part)
    return len(pieces) > 1


def fp32_lanes(target: Target) -> int:
    """float32 lanes of the target's vector registers: 16 (AVX-512), 8 (AVX2), 4 (NEON)."""
    if is_aarch64(target) or "arm_cpu" in set(target.keys):
        return 4
    return 16 if vector_lanes(target) == 16 else 8


#: fp32 conv outer-product register tiles, (output channel choices, pixel choices) per ISA, best
#: first: AArch64 (32 NEON registers of 4 floats), AVX-512 (32 zmm registers of 16 floats; one
#: zmm of channels x 8 pixels measured best on the stem, 0.72 vs 2.4 ms; tiles of 256 floats and
#: more, e.g. 32 x 8, compile to code 15x slower; 9-11 pixels before 7 or 6 where the row has
#: no 8-pixel piece -- enough independent multiply-add chains: AlexNet's 54-wide stem 16 x 9 0.95
#: vs 16 x 6 1.16 ms, a 55-wide one 16 x 11 0.95 vs 16 x 5 1.36 ms, Zen 5, one thread)
OUTER_TILES = {
    "aarch64": ((16, 8), (6, 4, 7, 8, 5, 3, 2)),
    "avx512": ((16,), (8, 9, 10, 11, 7, 6, 4, 5, 3, 2)),
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
    input value per pixel (on AVX-512 one zmm of 16 channels x up to 8 pixels); the weights
    copied once per call (per channel tile and row: ResNet-50's stem 1.39 vs 1.15 ms) with the
    channels innermost (a contiguous vector per tap), so neither operand is a strided gather (the
    row-vectorized tile of :func:`schedule_fp32_conv` reads a stride-2 stem's input pixel by pixel)."""
    co, ow = int(sch.get(loops[1]).extent), int(sch.get(loops[3]).extent)
    ft = largest_divisor(co, list(tile[0]))
    xt = largest_divisor(ow, list(tile[1]))
    consumers = _inline_consumers(sch, conv)
    # rows outside the channel tiles: the padded input rows made once per row (ResNet-50's stem
    # 1.18 -> 1.10 ms, MobileNetV2's 0.153 -> 0.143 ms, Zen 5, one thread); a row whose pieces are
    # under 4 pixels (111 = 3 x 37: SqueezeNet's stem) takes a few rows per tile instead, up to
    # the widest piece + 1 pixels in all (enough independent multiply-add chains)
    oh = int(sch.get(loops[2]).extent)
    rows = 1 if xt >= 4 else next(r for r in range((tile[1][0] + 1) // xt, 0, -1) if oh % r == 0)
    outer, xo, fi, xi = _tile(sch, loops, ft, xt, channels_inner=True, rows_outer=rows)
    weight = next(i for i, r in enumerate(sch.get(conv).reads)
                  if len(r.source.shape) == 4 and int(r.source.shape[0]) == co)
    wc = sch.cache_read(conv, weight, "global")
    sch.transform_layout(wc, ("write", 0), lambda f, c, i, j: (c, i, j, f))
    cw = _written_back(sch, conv, consumers, xo)
    if xt % 4 == 0:        # written back a vector of pixels at a time: with a ReLU6 there the scalar
        # write-back doubled the conv (MobileNetV2's stem 0.320 -> 0.177 ms, Zen 5, one thread)
        sch.vectorize(sch.get_loops(cw)[-1])
    return _finish(sch, conv, outer, loops[4], unrolled=xi, vectorized=fi)


def _written_back(sch: s_tir.Schedule, conv, consumers: list, loop):
    """The conv's tile cached (default scope) and written back per ``loop`` iteration with its
    elementwise consumers (bias, ReLU, clip) inlined into the write-back; returns that block."""
    cw = sch.cache_write(conv, 0, "global")
    sch.reverse_compute_at(cw, loop, preserve_unit_loops=True)
    for c in consumers:
        try:
            sch.reverse_compute_inline(c)
        except Exception:  # noqa: BLE001  (not inlinable: applied per tile)
            _consumers_per_tile(sch, [c], loop)
    return cw


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
    elementwise loop nests (a chain of them inlined into one pass; a long row split into vectors).
    Not tuned, just not single-threaded scalar code."""

    def apply(self, func, target, _tunable):
        if not self.is_target_available(target) or not isinstance(func, tirx.PrimFunc):
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = dlight.normalize_prim_func(sch)
            if not infos:
                return None
            if all(info.is_injective() for info in infos):     # one pass, not one per op
                infos = dlight.try_inline_contiguous_spatial(sch, infos) or infos
            lanes = fp32_lanes(target)
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
                    elif isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
                        # a long row (an image normalization: 224 floats): vectors along it,
                        # the rows in parallel (MobileNetV2's input normalization, two scalar
                        # passes before: 0.086 -> 0.010 ms, one thread)
                        _, vec = sch.split(lead[-1], [None, lanes])
                        sch.vectorize(vec)
                        lead = lead[:-1]
                if lead:
                    sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
            return sch
        except Exception:  # noqa: BLE001  (a function this simple rule cannot handle stays as it is)
            return None
