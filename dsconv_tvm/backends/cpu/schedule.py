"""Default (untuned) schedules of the DSConv PrimFuncs, as dlight schedule rules dispatched by target.

``DSConvCPU`` handles x86 and ARM (any ``llvm`` target).  The loop nest it builds:

* the BFP quantization stages run first, parallel over (image, block, row), vectorized along rows;
* the convolution is tiled into ``VL`` output channels x ``QT`` output pixels per register tile.
  For each block g and kernel tap (i, j) an int32 tile ``acc[QT, VL]`` accumulates
  ``w[c, o] * m[c, pixel]`` over the block's channels (vector integer multiply-adds across the VL
  output channels, 4-bit weights unpacked from bytes with vector shifts), then the float tile
  ``out[QT, VL] += acc * xi[g, i, j, o] * scale[g, pixel]``;
* the bias/activation epilogue writes the tile back (vectorized along the pixel row);
* rows of output tiles are distributed over the CPU cores;
* x86, a fully connected layer (one pixel, :func:`_schedule_dense`): the blocks outside the
  channel tiles, so the packed weights stream contiguously, chunks of output channels in parallel.

Tuned schedules (MetaSchedule, :mod:`dsconv_tvm.driver.tune`) take precedence where a database
has them; the search space of a DSConv task is this same template with its register tile sampled
(:func:`register_metaschedule_rule`).  The fp32 convs, pooling and everything else have the
rules of :mod:`.rules`.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target

from ..common import get_block, is_dsconv, layer_attr_value
from . import intrinsics
from .bfp_schedule import bfp_pixels, bfp_rows, copy_input_rows, quantize_rows, quantize_tile, slots_are_block, unpadded
from .layout import TAP, group_channels


def largest_divisor(n: int, candidates) -> int:
    for c in candidates:
        if n % c == 0:
            return c
    return 1


def vector_lanes(target: Target) -> int:
    """Output channels per register tile of the plain vector schedule: one 256-bit vector of int32
    on AVX2, 512 on AVX-512, two 128-bit NEON vectors on ARM."""
    keys = set(target.keys)
    mattr = [str(a) for a in target.attrs.get("mattr", [])]
    mcpu = str(target.attrs.get("mcpu", ""))
    if "arm_cpu" in keys or "aarch64" in str(target.attrs.get("mtriple", "")):
        return 8
    if any(a.startswith("+avx512") for a in mattr) or mcpu in ("skylake-avx512", "cascadelake", "icelake-server",
                                                     "sapphirerapids", "znver4", "znver5"):
        return 16
    return 8


def is_aarch64(target: Target) -> bool:
    """A 64-bit ARM target (32 NEON registers)."""
    return "aarch64" in str(target.attrs.get("mtriple", ""))


def layer_bits(func: tirx.PrimFunc) -> int:
    """The weight bit width of a DSConv PrimFunc (from its DSConv attribute)."""
    return int(layer_attr_value(func, "bits", "8"))


def dot_intrin(func: tirx.PrimFunc, target: Target):
    """The tensor intrinsic the schedule uses for this DSConv PrimFunc on ``target`` (or None):
    the target's widest one whose lanes divide the output channels."""
    sch = s_tir.Schedule(func)
    act = layer_attr_value(func, "act", "uint8")
    co = int(sch.get(sch.get_sblock("dsconv_out")).writes[0].source.shape[1])
    # Bp: the extent of the dot products' reduction (a fused consumer has no bfp_m stage)
    slots = int(sch.get(sch.get_sblock("dsconv_acc")).iter_vars[-1].dom.extent)
    return intrinsics.select(target, layer_bits(func), act, co, slots)


def output_format(func: tirx.PrimFunc) -> dict[str, int] | None:
    """The BFP output a DSConv PrimFunc writes for its consumers, as its DSConv attribute gives it
    (block, mantissa, unsigned, slots; None: none)."""
    fmt = layer_attr_value(func, "bfp_out")
    if fmt is None:
        return None
    return {key: int(value) for key, value in (item.split(":") for item in fmt.split(","))}


#: instruction sets with 32 vector registers (AVX-512): room for longer pixel rows per tile
WIDE_REGISTER_FILE = ("vnni", "avx512")
#: 32 registers: rows whose widest piece has at most this many pixels get two vectors of output
#: channels per tile (2 x 7 int32 + 2 x 7 float accumulators, 2 weight vectors, the broadcast: 31
#: registers), which halves the activation broadcasts per dot product.  Measured on Zen 5 (1
#: thread, CPU time, ResNet-50's 7x7 layers, fused BFP in and out): 512->2048 1x1 with residual
#: 0.177 -> 0.133 ms, 2048->512 1x1 0.133 -> 0.117, 512->512 3x3 0.287 -> 0.255, stride 2
#: 1024->2048 0.343 -> 0.284; on 14- to 224-wide rows two vectors x 7 pixels were within -4..+6 %
#: of one vector x 14 (results/tiles_x86_s4.md); 8 pixels x two vectors spill
NARROW_ROW = 7
#: the ARM instruction sets (32 NEON registers): the most pixels per 8-output-channel tile
ARM_PIXELS = {"sdot": 14, "neon": 8}


def _pixels_per_tile(ow: int, sums: int, widest: int = 14) -> tuple[int, ...]:
    """Pixels per register tile, best first, on a 32-register machine: the widest piece of the
    output row up to 14 pixels (14 int32 accumulator vectors + the weights and the broadcast fit in
    32 registers).  Measured on Zen 5 (one thread, CPU time, ResNet-50's layers, kernels without
    per-iteration workspace): 14 on 14- and 28-wide rows (1024->256 at 14x14 0.264 -> 0.199 ms,
    3x3 256->256 0.444 -> 0.287 vs 2 pixels), 8 or 14 on 56-wide rows (within 5 %), 7 on 7-wide;
    4 pixels were 5-30 % slower everywhere.  ``widest``: the longest piece (ARM: :data:`ARM_PIXELS`).
    ``sums`` ((block, tap) sums per output) is kept for finer rules."""
    del sums
    return tuple(q for q in range(min(ow, widest), 0, -1) if ow % q == 0) + (4, 2, 7, 3, 6, 8)


def tile_options(func: tirx.PrimFunc, target: Target) -> list[tuple[int, int]]:
    """(output channels, output pixels) register tiles worth trying, best guess first."""
    sch = s_tir.Schedule(func)
    _, o_, _, q_, rg, ri, rj = sch.get_loops(sch.get_sblock("dsconv_out"))
    co, ow = int(sch.get(o_).extent), int(sch.get(q_).extent)
    sums = int(sch.get(rg).extent) * int(sch.get(ri).extent) * int(sch.get(rj).extent)
    intrin = dot_intrin(func, target)
    pixels = (4, 2, 7, 3, 6, 8)
    if intrin is not None and co % intrin.lanes == 0:
        lanes = intrin.lanes
        # one vector of output channels per tile measured fastest (2 and 4 vectors spill)
        vls = [v for v in (lanes, 2 * lanes) if co % v == 0]
        if intrin.isa in WIDE_REGISTER_FILE:
            pixels = _pixels_per_tile(ow, sums)
            if pixels[0] <= NARROW_ROW and co % (2 * lanes) == 0:
                vls = [2 * lanes, lanes]
        elif intrin.isa in ARM_PIXELS:
            # 32 NEON registers: 8 output channels x a piece of the row.  sdot (A76): up to 14
            # pixels (2 x 14 int32x4 accumulators, 4 unpacked weight vectors, one 8-byte
            # activation load per pixel serving 4 by-element sdots).  neon (A72): up to 8 (each
            # pixel also needs 4 i16 product registers in flight); 14 spills
            vls = [v for v in (2 * lanes, lanes) if co % v == 0]
            pixels = _pixels_per_tile(ow, sums, ARM_PIXELS[intrin.isa])
    else:
        lanes = vector_lanes(target)
        vls = [largest_divisor(co, [2 * lanes, lanes, lanes // 2, 4, 2])]
    qts = list(dict.fromkeys(q for q in pixels if ow % q == 0 and q <= ow)) or [1]
    if ow <= 8 and ow not in qts:
        qts.insert(0, ow)
    return [(v, q) for q in qts[:3] for v in vls[:2]]


def schedule_dsconv_cpu(func: tirx.PrimFunc, target: Target, tile: tuple[int, int] | None = None,
                        sch: s_tir.Schedule | None = None, sample: bool = False) -> s_tir.Schedule:
    """Schedule one DSConv PrimFunc for a CPU; ``tile`` = (output channels, pixels) per register
    tile (default: the first of :func:`tile_options`).  Tensorized with :mod:`.intrinsics` where
    the target has a dot-product instruction and the channels fit its lanes.

    ``sample=True`` (the MetaSchedule search space): the tile is not fixed but drawn by the
    schedule itself (output channels from the candidates of :func:`tile_options`, pixels as a
    perfect tile of the row), so the tuner can sample and mutate it."""
    options = tile_options(func, target)
    vl, qt = tile or options[0]
    intrin = dot_intrin(func, target)
    vls = sorted({v for v, _ in options})
    sch = sch or s_tir.Schedule(func)
    out_blk = sch.get_sblock("dsconv_out")
    acc_blk = sch.get_sblock("dsconv_acc")
    epi_blk = sch.get_sblock("dsconv_epilogue")
    n_, o_, p_, q_, rg, ri, rj = sch.get_loops(out_blk)
    # a BFP output: the register tiles of one output block's channels finish a pixel tile before
    # it is quantized (the block max needs all its channels), see quantize_tile
    out_fmt = output_format(func)
    b2 = out_fmt["block"] if out_fmt else None
    co = int(sch.get(o_).extent)
    if b2 is None and layer_attr_value(func, "fp32_nhwc") == "1":
        # only a channel-innermost float output: the same tile, without the quantization
        b2 = largest_divisor(co, [max(vls), vl])
    # (whole blocks without empty slots -- 8-channel steps, or 16 for 2-bit consumers: see
    # kernels.quantized_output)
    fused = b2 is not None and co % b2 == 0 and b2 % (2 * TAP) == 0 and (not out_fmt or out_fmt["slots"] == b2)
    if fused:
        vls = [v for v in vls if b2 % v == 0] or [largest_divisor(b2, [vl, 16, 8, 4, 2])]
        vl = vl if b2 % vl == 0 else vls[0]
    if intrin is not None and any(v % intrin.lanes for v in ([vl] if not sample else vls)):
        intrin = None
    if fused:
        ob, o_ = sch.split(o_, [None, b2])
    if not fused and not sample and intrin is not None and intrin.isa not in ARM_PIXELS and \
            _one_pixel(sch, out_blk):
        return _schedule_dense(sch, func, intrin, tile[0] if tile else None, out_blk, acc_blk, epi_blk)
    if sample:
        vl_rv = sch.sample_categorical(vls, [1.0 / len(vls)] * len(vls))
        oo, oi = sch.split(o_, [None, vl_rv])
        qo, qi = sch.split(q_, sch.sample_perfect_tile(q_, n=2, max_innermost_factor=8))
    else:
        oo, oi = sch.split(o_, [None, vl])
        qo, qi = sch.split(q_, [None, qt])
    if fused:
        sch.reorder(n_, ob, p_, qo, oo, rg, ri, rj, qi, oi)
        sch.parallel(sch.fuse(n_, ob, p_))
    else:
        sch.reorder(n_, oo, p_, qo, rg, ri, rj, qi, oi)
        sch.parallel(sch.fuse(n_, oo, p_))

    # int32 block dot products: one [qt, vl] tile per (block, tap), kept in registers
    sch.compute_at(acc_blk, rj, preserve_unit_loops=True)
    a_q, a_o, a_k = sch.get_loops(acc_blk)[-3:]
    # one step = the channels of one packed byte per 4-channel lane: 8 (two groups of 4, the low and
    # high nibbles; or two int8 groups), 16 for 2-bit fields (four groups); with a 16-channel
    # intrinsic call, one call (two nibble bytes or one crumb byte per lane)
    if intrin is not None:
        kb, k2, k8, a_oa, a_ob = _intrin_steps(sch, func, intrin, a_k, a_o)
        sch.reorder(kb, *k2, a_q, a_oa, a_ob, k8)
    else:
        step = group_channels(layer_bits(func))
        kb, kh, kt = sch.split(a_k, [None, step // TAP, TAP])
        sch.reorder(kb, kh, kt, a_q, a_o)
        sch.vectorize(a_o)
        sch.unroll(kh)
        sch.unroll(kt)
    sch.unroll(a_q)
    _unpack_at(sch, kb)

    # float accumulation across blocks and taps
    sch.vectorize(oi)
    sch.unroll(qi)
    sch.reverse_compute_at(epi_blk, oo if fused else qo, preserve_unit_loops=True)
    if fused:
        quantize_tile(sch, qo)
    else:
        # (the dot products' reduction extent: the block's slots)
        if intrin is not None and (intrin.isa not in ARM_PIXELS or intrin.isa == "sdot" and
                                   int(sch.get(acc_blk).iter_vars[-1].dom.extent) <= 2 * intrin.channels):
            _channel_innermost_tile(sch, out_blk)
        sch.vectorize(sch.get_loops(epi_blk)[-1])
        if b2 is not None:
            quantize_rows(sch, "next_")
    init = sch.decompose_reduction(acc_blk, kb)
    if not sample:                       # (its loop count varies with the sampled tile)
        sch.vectorize(sch.get_loops(init)[-1])
    sch.decompose_reduction(out_blk, rg)
    if intrin is not None:
        sch.unroll(a_oa)
        sch.tensorize(a_ob, intrin.name)
    # The float tile, the int tile and the unpacked weights of one group stay in the default
    # ("global") scope: compacted to their tile inside the loops, TVM 0.27's LowerTVMBuiltin puts
    # such small constant-size buffers on the stack, whereas "local" ones become a
    # TVMBackendAllocWorkspace/Free pair in every iteration of the parallel loop (see the
    # `load ptr, ptr @__TVMBackendAllocWorkspace` lines of the library's LLVM IR).

    if get_block(sch, "amax") is None:     # the input is BFP already: padding and scales only
        quantize_rows(sch, "")
        return sch
    # activation quantization: parallel over (image, block, row); vectorized along rows; the
    # prologue (per-channel ops and ReLU on the float input) computed once per row there, else
    # inlined (computed in both the block max and the mantissas)
    rows = not sample and unpadded(sch)
    if layer_attr_value(func, "input_nhwc") == "1":     # a channel-innermost float input
        bfp_pixels(sch, rows)
        return sch
    if get_block(sch, "prologue") is not None and not (rows and slots_are_block(sch)):
        sch.compute_inline(sch.get_sblock("prologue"))
    if rows:
        bfp_rows(sch)
        return sch
    amax = sch.get_sblock("amax")
    n1, g1, y1, x1, r1 = sch.get_loops(amax)
    sch.reorder(n1, g1, y1, r1, x1)
    sch.parallel(sch.fuse(n1, g1, y1))
    sch.decompose_reduction(amax, r1)
    for name in ("bfp_e", "bfp_s", "bfp_m"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
    copy_input_rows(sch, sch.get_loops(sch.get_sblock("bfp_m"))[0])
    return sch


def _intrin_steps(sch: s_tir.Schedule, func: tirx.PrimFunc, intrin, a_k, a_o):
    """The dot products' channel loop ``a_k`` split into (steps, [calls per step], channels per
    call) and the output channel loop ``a_o`` into (vectors, lanes): one step = the channels of
    one packed byte per 4-channel lane; the intrinsic's channels per call (8, or 16 on the A72)
    inside a step when the step is wider (2-bit crumbs with 8-channel calls: two calls per
    unpacked byte).  Returns (kb, [k2], k8, a_oa, a_ob)."""
    step = group_channels(layer_bits(func))
    per_call = intrin.channels
    kb, *k2, k8 = sch.split(a_k, [None, per_call] if step <= per_call else [None, step // per_call, per_call])
    a_oa, a_ob = sch.split(a_o, [None, intrin.lanes])
    return kb, k2, k8, a_oa, a_ob


def _unpack_at(sch: s_tir.Schedule, kb) -> None:
    """The weight unpack (if any) of one step under ``kb``: the step's weights sign-extended once
    for the whole register tile, vectorized along (output channel, lane)."""
    unpack = get_block(sch, "w_unpack")
    if unpack is not None:
        sch.compute_at(unpack, kb, preserve_unit_loops=True)
        u_loops = sch.get_loops(unpack)
        sch.unroll(u_loops[-3])
        sch.vectorize(sch.fuse(*u_loops[-2:]))


def _one_pixel(sch: s_tir.Schedule, out_blk) -> bool:
    """Whether the layer is a matrix-vector product: one image, a 1x1 kernel on a 1x1 output map
    (a fully connected layer as the rewrite emits it)."""
    n_, _, p_, q_, _, ri, rj = sch.get_loops(out_blk)
    return all(int(sch.get(loop).extent) == 1 for loop in (n_, p_, q_, ri, rj))


#: output channels per parallel chunk of a matrix-vector product (see :func:`_schedule_dense`)
DENSE_CHUNK = 1024


def _schedule_dense(sch: s_tir.Schedule, func: tirx.PrimFunc, intrin, vl: int | None, out_blk, acc_blk,
                    epi_blk) -> s_tir.Schedule:
    """A matrix-vector product (:func:`_one_pixel`): bound by streaming the packed weights
    ``[G, 1, 1, Bp/8, CO, 4]``.  The pixel-tile order (a tile of ``vl`` output channels through
    all blocks) reads one 64-byte line from each of the G x Bp/8 rows (CO x 4 bytes apart: a new
    4 KB page per load, no hardware prefetch).  Here the blocks are the outer loop of a chunk of
    :data:`DENSE_CHUNK` output channels and the channel tiles the inner one, so each block's
    Bp/8 rows are read as contiguous runs of the chunk; the float sum of the chunk stays in L1.
    Chunks are the parallel loop.  ``vl``: output channels per register tile, default two vectors
    (two independent chains of dot products per block; one vector measured 5-20 % slower).
    Measured on Zen 5 (1 thread, CPU time; see results/dense_x86.md): 25088 -> 4096 4.6 -> 1.6 ms,
    9216 -> 4096 0.86 -> 0.32 ms, 4096 -> 4096 0.22 -> 0.10 ms.  Schedule only: the same integers.
    x86 only (unmeasured on ARM)."""
    n_, o_, p_, q_, rg, ri, rj = sch.get_loops(out_blk)
    co = int(sch.get(o_).extent)
    vl = vl or largest_divisor(co, [2 * intrin.lanes, intrin.lanes])
    tiles = co // vl          # per chunk: the most tiles up to DENSE_CHUNK channels that divide them
    per_chunk = next(t for t in range(max(DENSE_CHUNK // vl, 1), 0, -1) if tiles % t == 0)
    oc, oo, oi = sch.split(o_, [None, per_chunk, vl])
    sch.reorder(n_, oc, p_, q_, rg, ri, rj, oo, oi)
    outer = sch.fuse(n_, oc)
    sch.parallel(outer)
    sch.compute_at(acc_blk, oo, preserve_unit_loops=True)
    a_o, a_k = sch.get_loops(acc_blk)[-2:]
    kb, k2, k8, a_oa, a_ob = _intrin_steps(sch, func, intrin, a_k, a_o)
    sch.reorder(kb, *k2, a_oa, a_ob, k8)
    _unpack_at(sch, kb)
    sch.unroll(kb)
    sch.vectorize(oi)
    sch.reverse_compute_at(epi_blk, outer, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(epi_blk)[-1])
    init = sch.decompose_reduction(acc_blk, kb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.decompose_reduction(out_blk, rg)
    sch.unroll(a_oa)
    sch.tensorize(a_ob, intrin.name)
    if get_block(sch, "amax") is None:
        quantize_rows(sch, "")
    elif unpadded(sch):
        bfp_rows(sch)
    return sch


def _channel_innermost_tile(sch: s_tir.Schedule, out_blk) -> None:
    """The float tile of an unfused x86 kernel, or of an A76 kernel whose blocks hold at most two
    8-channel dot-product calls (blocks of up to 16 slots: ResNet-20's 16-channel stage), laid out
    channel-innermost, ``[QT, VL]`` as the registers hold it.  x86 (Zen 5, one thread, CPU time,
    float NCHW output): with the NCHW tile LLVM built the tile's transposes from single lanes
    where the row piece is odd (SqueezeNet's 16x55x55 -> 64 3x3, 11 pixels: 0.571 -> 0.114 ms;
    32x27x27 -> 128 3x3, 9 pixels: 0.295 -> 0.082 ms), elsewhere within -3..+12 % (64x56x56 ->
    64 1x1 0.069 -> 0.062 ms); AVX2 the same or faster.  On the A76, LLVM unrolls such a tap's
    whole body; with the NCHW tile (``[VL, QT]``) it then built every int32x4 -> float vector of
    the rescale from single lanes (``mov v.s[i]``, with spills): about 1.0 M instructions per
    16 -> 16 3x3 layer on 28x28 instead of 0.56 M.  The epilogue transposes once per tile
    instead.  Measured to cost 1-3 % on wider ARM blocks and on the A72, so only there."""
    sch.transform_layout(out_blk, ("write", 0), lambda n, o, p, q: (n, p, q, o))


METASCHEDULE_RULE = "dsconv"        # block annotation "schedule_rule" of the DSConv PrimFuncs


def _metaschedule_dsconv(sch: s_tir.Schedule, _block) -> list[s_tir.Schedule]:
    """MetaSchedule custom rule (``s_tir.meta_schedule.cpu.dsconv``): the DSConv template with
    its register tile sampled; every other block of the function is annotated "None"."""
    target = Target.current(allow_none=True) or Target({"kind": "llvm"})
    func = sch.mod["main"]
    schedule_dsconv_cpu(func, target, sch=sch, sample=True)
    return [sch]


def register_metaschedule_rule() -> None:
    """Make the DSConv search space known to MetaSchedule (and its intrinsics to trace replay)."""
    import tvm

    intrinsics.register()
    name = f"s_tir.meta_schedule.cpu.{METASCHEDULE_RULE}"
    if tvm.get_global_func(name, allow_missing=True) is None:
        tvm.register_global_func(name, _metaschedule_dsconv)


class DSConvCPU(dlight.ScheduleRule):
    """Default schedule of DSConv PrimFuncs on llvm (x86, ARM) targets."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, _tunable):
        if not self.is_target_available(target) or not is_dsconv(func):
            return None
        return schedule_dsconv_cpu(func, target)


def _template_space():
    """The search space of a DSConv task: the tensorized template of this module (custom rule
    on the dsconv_out block, every other block annotated "None"), its register tile sampled and
    mutated.  TVM's generic post-processors expect its own annotations, not finished loops."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.PostOrderApply(
        sch_rules=[ms.schedule_rule.ApplyCustomRule()],
        postprocs=[ms.postproc.DisallowDynamicLoop()],
        mutator_probs={ms.mutator.MutateTileSize(): 1.0})


def _template_search():
    """Evolutionary search sized for the DSConv space (a few dozen distinct register tiles, each
    sample a full tensorized schedule): MetaSchedule's defaults (512 samples, 50 unmeasured per
    round) spent ~7 min per ResNet-50 sized model just sampling."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=48, init_measured_ratio=0.2,
                                                 init_min_unmeasured=8, genetic_num_iters=2,
                                                 genetic_max_fail_count=4)


def tuning_space():
    """(space generator, search strategy) of DSConv tasks for MetaSchedule."""
    return _template_space(), _template_search()
