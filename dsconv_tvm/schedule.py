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

DSCONV_BLOCKS = ("amax", "bfp_e", "bfp_s", "bfp_m", "dsconv_acc", "dsconv_out", "dsconv_epilogue")


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
    """Output channels per register tile: one 256-bit vector of int32 on AVX2, 512 on AVX-512,
    two 128-bit NEON vectors on ARM."""
    keys = set(target.keys)
    mattr = [str(a) for a in target.attrs.get("mattr", [])]
    mcpu = str(target.attrs.get("mcpu", ""))
    if "arm_cpu" in keys or "aarch64" in str(target.attrs.get("mtriple", "")):
        return 8
    if any(a.startswith("+avx512") for a in mattr) or mcpu in ("skylake-avx512", "cascadelake", "icelake-server",
                                                     "sapphirerapids", "znver4", "znver5"):
        return 16
    return 8


def schedule_dsconv_cpu(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule:
    sch = s_tir.Schedule(func)
    out_blk = sch.get_sblock("dsconv_out")
    acc_blk = sch.get_sblock("dsconv_acc")
    epi_blk = sch.get_sblock("dsconv_epilogue")
    n_, o_, p_, q_, rg, ri, rj = sch.get_loops(out_blk)
    co = int(sch.get(o_).extent)
    ow = int(sch.get(q_).extent)
    lanes = _vector_lanes(target)
    vl = _largest_divisor(co, [2 * lanes, lanes, lanes // 2, 4, 2])
    qt = _largest_divisor(ow, [4, 6, 3, 2]) if ow > 8 else ow

    oo, oi = sch.split(o_, [None, vl])
    qo, qi = sch.split(q_, [None, qt])
    sch.reorder(n_, oo, p_, qo, rg, ri, rj, qi, oi)
    outer = sch.fuse(n_, oo, p_)
    sch.parallel(outer)

    # int32 block dot products: one tile per (block, tap), kept in registers
    sch.compute_at(acc_blk, rj, preserve_unit_loops=True)
    a_loops = sch.get_loops(acc_blk)
    a_q, a_o, a_k = a_loops[-3:]
    sch.reorder(a_k, a_q, a_o)
    sch.vectorize(a_o)
    sch.unroll(a_q)
    slots = int(sch.get(a_k).extent)
    k_outer = a_k
    if slots % 2 == 0:
        k_outer, k2 = sch.split(a_k, [None, 2])
        sch.unroll(k2)                    # makes the nibble (low/high) of each weight a constant
    sch.set_scope(acc_blk, 0, "local")

    # float accumulation across blocks and taps
    sch.vectorize(oi)
    sch.unroll(qi)
    sch.set_scope(out_blk, 0, "local")
    sch.reverse_compute_at(epi_blk, qo)
    e_loops = sch.get_loops(epi_blk)
    sch.vectorize(e_loops[-1])
    sch.decompose_reduction(acc_blk, k_outer)
    sch.decompose_reduction(out_blk, rg)

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
    return sch


class DSConvCPU(dlight.ScheduleRule):
    """Default schedule of DSConv PrimFuncs on llvm (x86, ARM) targets."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, _tunable):
        if not self.is_target_available(target) or not is_dsconv(func):
            return None
        return schedule_dsconv_cpu(func, target)


class ParallelFallback(dlight.ScheduleRule):
    """Every other PrimFunc on a CPU (the convs kept in fp32, pooling, dense, elementwise ops):
    run its outer spatial loops on all cores, and vectorize the innermost loop of purely
    elementwise loop nests.  Not fast, just not single-threaded scalar code."""

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

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
    """The pass that gives every DSConv PrimFunc of a module its default schedule, and every other
    PrimFunc the parallel fallback (functions already scheduled, e.g. tuned, are left alone)."""
    return dlight.ApplyDefaultSchedule(DSConvCPU(), ParallelFallback())
