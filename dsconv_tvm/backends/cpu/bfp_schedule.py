"""Schedules of the BFP stages of a CPU DSConv PrimFunc: a layer's quantization of its float input
(one parallel pass over (image, block, row), with a contiguous copy of the input rows where the
channel loads alias in L1), the separate passes where that does not apply, and a producer's
quantization of its output tile for its consumers (fused BFP).  Schedule only: the integers are the
TE stages' (:mod:`.kernels`).  Used by :func:`.schedule.schedule_dsconv_cpu`."""

from __future__ import annotations

from tvm import s_tir

from ..common import get_block


def quantize_tile(sch: s_tir.Schedule, qo) -> None:
    """The consumers' BFP of one pixel tile, under its loop ``qo``: all the output block's channels
    of these pixels have just been written by the epilogue (a few KB, in L1), so the block max,
    exponents and mantissas (channel-innermost) are computed from there; the float
    tile is never written to memory unless the float output is kept too."""
    # the float tile channel-innermost, as the register tile holds it (vectors of output
    # channels) and as the mantissas are stored: contiguous vector writes and reads
    epi = sch.get_sblock("dsconv_epilogue")
    for blk in (sch.get_sblock("dsconv_out"), epi):
        sch.transform_layout(blk, ("write", 0), lambda n, o, p, q: (n, p, q, o))
    e_o, e_p, e_q = sch.get_loops(epi)[-3:]
    sch.reorder(e_p, e_q, e_o)
    sch.vectorize(e_o)
    amax = get_block(sch, "next_amax")
    if amax is not None:
        _vector_reduce(sch, amax, qo)
    fp32 = get_block(sch, "dsconv_fp32")
    if fp32 is not None:             # the float output too (NCHW or NHWC): from the tile
        sch.reverse_compute_at(fp32, qo, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(fp32)[-1])
    for name in ("next_bfp_e", "next_m"):
        blk = get_block(sch, name)
        if blk is not None:           # (none: only the float output, channel-innermost)
            sch.reverse_compute_at(blk, qo, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(blk)[-1])


def _vector_reduce(sch: s_tir.Schedule, blk, loop, lanes: int = 16) -> None:
    """A reduction over a contiguous innermost axis (a block's channels), computed under
    ``loop``: ``lanes`` partial results updated with vector operations (rfactor), then reduced per
    pixel."""
    r = sch.get_loops(blk)[-1]
    extent = int(sch.get(r).extent)
    if extent % lanes or extent == lanes:
        sch.reverse_compute_at(blk, loop, preserve_unit_loops=True)
        sch.decompose_reduction(blk, sch.get_loops(blk)[-1])
        return
    _, r1 = sch.split(r, [None, lanes])
    rank = len(sch.get(blk).writes[0].source.shape)
    rf = sch.rfactor(r1, factor_axis=rank)          # [..., lanes] partial results
    sch.reverse_compute_at(rf, loop, preserve_unit_loops=True)
    lane, *_, pixel, part = sch.get_loops(rf)[-6:]       # (lanes, n, g, y, x, extent / lanes)
    sch.reorder(pixel, part, lane)
    sch.vectorize(lane)
    init = sch.decompose_reduction(rf, part)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_at(blk, loop, preserve_unit_loops=True)
    lane, pixel = sch.get_loops(blk)[-5], sch.get_loops(blk)[-1]   # (lanes, n, g, y, x)
    sch.vectorize(pixel)
    init = sch.decompose_reduction(blk, lane)
    sch.vectorize(sch.get_loops(init)[-1])
def quantize_rows(sch: s_tir.Schedule, prefix: str) -> None:
    """BFP stages (``prefix`` + amax, bfp_e, bfp_s; bfp_m or next_m) as
    separate passes, parallel over (image, block, row), vectorized along the row: the quantized
    output of a layer whose channels are no whole number of output blocks, or the padding and
    scales of a BFP input."""
    names = [prefix + "amax", prefix + "bfp_e", prefix + "bfp_s"]
    names += ["next_m"] if prefix else ["bfp_m"]
    for name in names:
        blk = get_block(sch, name)
        if blk is None:
            continue
        loops = sch.get_loops(blk)
        if name.endswith("amax"):
            sch.reorder(loops[4], loops[3])
        sch.parallel(sch.fuse(*loops[:3]))
        if sch.get(blk).init is not None:                  # a reduction: amax
            sch.decompose_reduction(blk, sch.get_loops(blk)[-2])
        else:
            sch.vectorize(loops[-1])


def unpadded(sch: s_tir.Schedule) -> bool:
    """Whether the layer has no padding (1x1 convs): the mantissas' rows are the image's rows."""
    amax = sch.get(sch.get_sblock("amax")).writes[0].source.shape          # N, G, H, W
    mant = sch.get(sch.get_sblock("bfp_m")).writes[0].source.shape         # N, G, Hp, Wp, Bp
    return [int(v) for v in amax[2:4]] == [int(v) for v in mant[2:4]]


def slots_are_block(sch: s_tir.Schedule) -> bool:
    """Whether the mantissas have no channel slots beyond the block (a row of the prologue is then
    what one block's row of mantissas reads)."""
    mant = sch.get(sch.get_sblock("bfp_m")).writes[0].source.shape
    return int(mant[-1]) == int(sch.get(sch.get_loops(sch.get_sblock("amax"))[-1]).extent)


def bfp_rows(sch: s_tir.Schedule) -> None:
    """The BFP stages of an unpadded layer as one parallel loop over (image, block, row): the
    row's block max, then its scales and mantissas while the row (B channels x W
    floats) is in L1 -- one parallel region instead of five (a thread barrier each), the input
    read from memory once.  The exponent is recomputed from the max where it is used (a few
    integer operations, the same bits).  Schedule only: the same integers as separate passes."""
    sch.compute_inline(sch.get_sblock("bfp_e"))
    amax = sch.get_sblock("amax")
    pro = get_block(sch, "prologue")
    if pro is not None:
        # the prologue's rows (B channels x W floats, into a row buffer) lead the loop: the block
        # max and the mantissas read them there
        block = int(sch.get(sch.get_loops(amax)[-1]).extent)
        n0, c0, y0, x0 = sch.get_loops(pro)
        g0, b0 = sch.split(c0, [None, block])
        sch.reorder(n0, g0, y0, b0, x0)
        row = sch.fuse(n0, g0, y0)
        sch.parallel(row)
        sch.vectorize(x0)
        sch.reverse_compute_at(amax, row, preserve_unit_loops=True)
        *_, x1, r1 = sch.get_loops(amax)
        sch.reorder(r1, x1)
    else:
        n1, g1, y1, x1, r1 = sch.get_loops(amax)
        sch.reorder(n1, g1, y1, r1, x1)
        row = sch.fuse(n1, g1, y1)
        sch.parallel(row)
    init = sch.decompose_reduction(amax, r1)
    sch.vectorize(sch.get_loops(init)[-1])
    for name in ("bfp_s", "bfp_m"):
        blk = sch.get_sblock(name)
        sch.reverse_compute_at(blk, row, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(blk)[-1])
    copy_input_rows(sch, row, amax)


#: L1 data cache sets of 64-byte lines (32 KB 8-way and 48 KB 12-way alike) and the fewest ways
L1_SETS, L1_WAYS = 64, 8


def _channel_loads_conflict(sch: s_tir.Schedule) -> bool:
    """Whether the loads of one pixel's block channels from the NCHW input (``bfp_m`` gathers
    them, channel-innermost) all fall into too few L1 sets: the channel stride is H x W floats, a
    multiple of 1 KB on 112x112 maps (4 sets), of 4 KB on 224x224 (one set), and more channels than
    those sets have ways means every load misses."""
    from math import gcd

    blk = sch.get(sch.get_sblock("bfp_m"))
    if _input_index(sch) is None:             # reads a prologue's row buffer (B x W floats, in L1)
        return False
    _, c, h, w = (int(v) for v in blk.reads[_input_index(sch)].source.shape)
    lines = h * w * 4 // 64 if h * w * 4 % 64 == 0 else 1       # an unaligned stride spreads them
    sets = L1_SETS // gcd(lines, L1_SETS)
    return sets * L1_WAYS < min(c, int(blk.writes[0].source.shape[-1]))


def _input_index(sch: s_tir.Schedule) -> int | None:
    """The index of the float input ``x`` among the buffers ``bfp_m`` reads (None: it reads a
    prologue's row buffer instead)."""
    reads = sch.get(sch.get_sblock("bfp_m")).reads
    return next((i for i, r in enumerate(reads) if r.source.name == "x"), None)


def copy_input_rows(sch: s_tir.Schedule, row, *readers) -> None:
    """Where :func:`_channel_loads_conflict`: ``bfp_m`` (and ``readers``) read the input row of
    the block (B channels x W floats) from a copy made under its ``row`` loop (contiguous vector
    loads) whose channel stride is an odd number of 64-byte lines, so the gathers hit L1.
    Measured on Zen 5 (1 thread, CPU time): the VGG-19 3x3 64x224x224 -> 64 layer 10.2 -> 6.2 ms
    (its conv part alone 4.9 ms), a 1x1 64 -> 64 at 224x224 6.45 -> 2.1 ms, at 112x112 0.446 ->
    0.415 ms; at 56x56 (16 sets) the copy cost 4 %, so it is left out there.  Schedule only: the
    same integers."""
    if not _channel_loads_conflict(sch):
        return
    blk = sch.get_sblock("bfp_m")
    copy = sch.cache_read(blk, _input_index(sch), "global", consumer_blocks=[blk, *readers])
    sch.compute_at(copy, row, preserve_unit_loops=True)
    sch.storage_align(copy, 0, axis=1, factor=32, offset=16)     # 32 k + 16 floats
    sch.vectorize(sch.get_loops(copy)[-1])


def bfp_pixels(sch: s_tir.Schedule, rows: bool) -> None:
    """The BFP stages of a layer whose float input is channel-innermost (``input_nhwc``: a block's
    channels of one pixel are contiguous, as the mantissas store them), parallel over (image,
    block, row): per pixel, the block max as 16 partial maxima updated with vector operations over
    the contiguous channels (``rfactor``), then reduced; the mantissas contiguous vector loads and
    stores along the channel slots.  ``rows`` (an unpadded layer): the row's scales and mantissas
    computed in the same parallel iteration (the exponent recomputed from the max where it is
    used, as :func:`bfp_rows`), else separate passes.  Schedule only: the same integers."""
    if rows:
        sch.compute_inline(sch.get_sblock("bfp_e"))
    amax = sch.get_sblock("amax")
    r1 = sch.get_loops(amax)[-1]
    extent = int(sch.get(r1).extent)
    x = next(r.source for r in sch.get(amax).reads if r.source.name == "x")        # [N, H, W, C]
    tail = int(x.shape[-1]) % extent
    lanes = next((v for v in (16, 8) if extent % v == 0 and extent > v and tail % v == 0), None)
    if lanes is None:                   # a small or odd block: one max per channel, per pixel
        n1, g1, y1, _, r1 = sch.get_loops(amax)
        row = sch.fuse(n1, g1, y1)
        sch.parallel(row)
        sch.decompose_reduction(amax, r1)
    else:
        _, lane = sch.split(r1, [None, lanes])
        rf = sch.rfactor(lane, factor_axis=4)            # [N, G, H, W, lanes] partial maxima
        n1, g1, y1, x1, part, lane = sch.get_loops(rf)
        row = sch.fuse(n1, g1, y1)
        sch.parallel(row)
        sch.vectorize(lane)
        init = sch.decompose_reduction(rf, part)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.reverse_compute_at(amax, x1, preserve_unit_loops=True)        # per pixel
        sch.decompose_reduction(amax, sch.get_loops(amax)[-5])          # (lanes, n, g, y, x)
    names = ("bfp_s", "bfp_m") if rows else ("bfp_e", "bfp_s", "bfp_m")
    for name in names:
        blk = sch.get_sblock(name)
        if rows:
            sch.reverse_compute_at(blk, row, preserve_unit_loops=True)
        else:
            loops = sch.get_loops(blk)
            sch.parallel(sch.fuse(*loops[:3]))
        inner = sch.get_loops(blk)[-1]
        slots = int(sch.get(inner).extent)
        # vectors that straddle neither the end of the channels nor of the block: the test "this
        # slot holds a channel" is then the same for all lanes (a branch per vector); a per-lane
        # test makes TVM's vectorized loop serial
        vec = next((v for v in (16, 8, 4) if slots % v == 0 and extent % v == 0 and tail % v == 0), None)
        if name == "bfp_m" and vec is not None and vec < slots:
            inner = sch.split(inner, [None, vec])[1]
        sch.vectorize(inner)
