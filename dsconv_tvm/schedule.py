"""Default (untuned) schedules of the DSConv PrimFuncs, as dlight schedule rules dispatched by target.

``DSConvCPU`` handles x86 and ARM (any ``llvm`` target).  The loop nest it builds:

* the BFP quantization stages run first, parallel over (image, block, row), vectorized along rows;
* the convolution is tiled into ``VL`` output channels x ``QT`` output pixels per register tile.
  For each block g and kernel tap (i, j) an int32 tile ``acc[QT, VL]`` accumulates
  ``w[c, o] * m[c, pixel]`` over the block's channels (vector integer multiply-adds across the VL
  output channels, 4-bit weights unpacked from bytes with vector shifts), then the float tile
  ``out[QT, VL] += acc * xi[g, i, j, o] * scale[g, pixel]``;
* the bias/activation epilogue writes the tile back (vectorized along the pixel row);
* rows of output tiles are distributed over the CPU cores.

Tuned schedules (MetaSchedule) take precedence where a database has them (a later issue).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target

from .kernels import TAP

DSCONV_BLOCKS = ("amax", "bfp_e", "bfp_s", "bfp_m", "dsconv_acc", "dsconv_out", "dsconv_epilogue")  # + w_unpack, bfp_sum (b <= 4)


def _largest_divisor(n: int, candidates) -> int:
    for c in candidates:
        if n % c == 0:
            return c
    return 1


def _has_blocks(sch: s_tir.Schedule, names) -> bool:
    try:
        for name in names:
            sch.get_sblock(name)
    except Exception:  # noqa: BLE001  (ScheduleError: no such block)
        return False
    return True


def is_dsconv(func) -> bool:
    """True for a PrimFunc made by :func:`dsconv_tvm.kernels.dsconv_primfunc`."""
    return isinstance(func, tirx.PrimFunc) and _has_blocks(s_tir.Schedule(func), DSCONV_BLOCKS)


def _vector_lanes(target: Target) -> int:
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


def layer_bits(func: tirx.PrimFunc) -> int:
    """The weight bit width of a DSConv PrimFunc (from its ``dsconv.layer`` attribute)."""
    attr = str(func.attrs["dsconv.layer"]) if func.attrs and "dsconv.layer" in func.attrs else ""
    for item in attr.split():
        if item.startswith("bits="):
            return int(item[5:])
    return 8


def dot_intrin(func: tirx.PrimFunc, target: Target):
    """The tensor intrinsic the schedule uses for this DSConv PrimFunc on ``target`` (or None)."""
    from . import intrinsics

    sch = s_tir.Schedule(func)
    act = str(sch.get(sch.get_sblock("bfp_m")).writes[0].source.dtype)
    return intrinsics.select(target, layer_bits(func), act)


def tile_options(func: tirx.PrimFunc, target: Target) -> list[tuple[int, int]]:
    """(output channels, output pixels) register tiles worth trying, best guess first."""
    sch = s_tir.Schedule(func)
    _, o_, _, q_, *_ = sch.get_loops(sch.get_sblock("dsconv_out"))
    co, ow = int(sch.get(o_).extent), int(sch.get(q_).extent)
    intrin = dot_intrin(func, target)
    if intrin is not None and co % intrin.lanes == 0:
        lanes = intrin.lanes
        # one vector of output channels per tile measured fastest (2 and 4 vectors spill)
        vls = [v for v in (lanes, 2 * lanes) if co % v == 0]
    else:
        lanes = _vector_lanes(target)
        vls = [_largest_divisor(co, [2 * lanes, lanes, lanes // 2, 4, 2])]
    qts = [q for q in (4, 2, 7, 3, 6, 8) if ow % q == 0 and q <= ow] or [1]
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
    if intrin is not None and any(v % intrin.lanes for v in ([vl] if not sample else vls)):
        intrin = None
    sch = sch or s_tir.Schedule(func)
    out_blk = sch.get_sblock("dsconv_out")
    acc_blk = sch.get_sblock("dsconv_acc")
    epi_blk = sch.get_sblock("dsconv_epilogue")
    n_, o_, p_, q_, rg, ri, rj = sch.get_loops(out_blk)
    if sample:
        vl_rv = sch.sample_categorical(vls, [1.0 / len(vls)] * len(vls))
        oo, oi = sch.split(o_, [None, vl_rv])
        qo, qi = sch.split(q_, sch.sample_perfect_tile(q_, n=2, max_innermost_factor=8))
    else:
        oo, oi = sch.split(o_, [None, vl])
        qo, qi = sch.split(q_, [None, qt])
    sch.reorder(n_, oo, p_, qo, rg, ri, rj, qi, oi)
    sch.parallel(sch.fuse(n_, oo, p_))

    # int32 block dot products: one [qt, vl] tile per (block, tap), kept in registers
    sch.compute_at(acc_blk, rj, preserve_unit_loops=True)
    a_q, a_o, a_k = sch.get_loops(acc_blk)[-3:]
    # 8 channels per step: two groups of 4 (the low and high nibbles of one packed byte)
    if intrin is not None:
        kb, k8 = sch.split(a_k, [None, 2 * TAP])
        a_oa, a_ob = sch.split(a_o, [None, intrin.lanes])
        sch.reorder(kb, a_q, a_oa, a_ob, k8)
    else:
        kb, kh, kt = sch.split(a_k, [None, 2, TAP])
        sch.reorder(kb, kh, kt, a_q, a_o)
        sch.vectorize(a_o)
        sch.unroll(kh)
        sch.unroll(kt)
    sch.unroll(a_q)
    unpack = _get_block(sch, "w_unpack")
    if unpack is not None:               # sign-extend the 8 channels' weights for the whole tile
        sch.compute_at(unpack, kb, preserve_unit_loops=True)
        u_loops = sch.get_loops(unpack)
        sch.unroll(u_loops[-3])
        sch.vectorize(sch.fuse(*u_loops[-2:]))

    # float accumulation across blocks and taps
    sch.vectorize(oi)
    sch.unroll(qi)
    sch.set_scope(out_blk, 0, "local")
    sch.reverse_compute_at(epi_blk, qo, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(epi_blk)[-1])
    init = sch.decompose_reduction(acc_blk, kb)
    if not sample:                       # (its loop count varies with the sampled tile)
        sch.vectorize(sch.get_loops(init)[-1])
    sch.decompose_reduction(out_blk, rg)
    if intrin is not None:
        sch.unroll(a_oa)
        sch.tensorize(a_ob, intrin.name)
    # registers / stack: the int tile, the unpacked weights of one group (after tensorize: the
    # intrinsics describe plain buffers)
    sch.set_scope(init, 0, "local")
    if unpack is not None:
        sch.set_scope(unpack, 0, "local")

    # activation quantization: parallel over (image, block, row); vectorized along rows
    amax = sch.get_sblock("amax")
    n1, g1, y1, x1, r1 = sch.get_loops(amax)
    sch.reorder(n1, g1, y1, r1, x1)
    sch.parallel(sch.fuse(n1, g1, y1))
    sch.decompose_reduction(amax, r1)
    for name in ("bfp_e", "bfp_s", "bfp_m"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
    msum = _get_block(sch, "bfp_sum")
    if msum is not None:                 # per pixel: the sum over the block's mantissas
        loops = sch.get_loops(msum)
        sch.parallel(sch.fuse(*loops[:3]))
        sch.decompose_reduction(msum, loops[-1])
    return sch


def _get_block(sch: s_tir.Schedule, name: str):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001  (ScheduleError: no such block)
        return None


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

    from . import intrinsics

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
    root = sch.get_sblock("root") if _get_block(sch, "root") is not None else None
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
    n_, f_, y_, x_ = loops[:4]
    reds = loops[4:]
    co, ow = int(sch.get(f_).extent), int(sch.get(x_).extent)
    lanes = 16 if _vector_lanes(target) == 16 else 8
    xt = _largest_divisor(ow, [2 * lanes, lanes, 14, 7, 12, 6, 4]) if ow > 2 * lanes else ow
    ft = _largest_divisor(co, [4, 2]) if xt >= lanes else _largest_divisor(co, [8, 4, 2])
    # elementwise consumers (bias, ReLU, ...): inline into the last one, applied per tile
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
    fo, fi = sch.split(f_, [None, ft])
    xo, xi = sch.split(x_, [None, xt])
    sch.reorder(n_, fo, y_, xo, *reds, fi, xi)
    outer = sch.fuse(n_, fo, y_)
    sch.parallel(outer)
    cw = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(cw, xo, preserve_unit_loops=True)
    for c in consumers:
        if c is not None and _get_block_rv_alive(sch, c):
            try:
                sch.reverse_compute_at(c, xo, preserve_unit_loops=True)
                sch.vectorize(sch.get_loops(c)[-1])
            except Exception:  # noqa: BLE001
                pass
    sch.vectorize(sch.get_loops(cw)[-1])
    pad = _get_block(sch, "pad_temp") or _get_block(sch, "PaddedInput")
    if pad is not None:
        sch.compute_at(pad, outer, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(pad)[-1])
    sch.unroll(fi)
    sch.vectorize(xi)
    sch.decompose_reduction(conv, reds[0])
    return sch


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
    pad = _get_block(sch, "pad_temp")
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


def default_schedule_pass():
    """The pass that gives every DSConv PrimFunc of a module its default schedule, the fp32 convs and
    pooling theirs, and every other PrimFunc the parallel fallback (functions already scheduled,
    e.g. tuned, are left alone)."""
    return dlight.ApplyDefaultSchedule(DSConvCPU(), FP32ConvCPU(), PoolCPU(), ParallelFallback())
