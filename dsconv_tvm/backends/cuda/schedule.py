"""The default schedule of the CUDA DSConv PrimFuncs and the dlight rule that applies it."""

from __future__ import annotations

from ..common import get_block, is_dsconv
from .codegen import register_codegen_hook

THREADS = 128


def _bind_spatial(sch, block, threads: int = THREADS) -> None:
    """Fuse the leading spatial loops of ``block`` and spread them over blocks x threads."""
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    spatial = []
    for lp, k in zip(loops, kinds):
        if k != 0:
            break
        spatial.append(lp)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def schedule_dsconv_cuda(func, target):
    """Default schedule: one output pixel x ``VO`` output channels per thread, threads along the
    output row (coalesced mantissa reads and output writes, weights broadcast in a warp); the int32
    block dot products of each (block, tap) stay in registers, fused bias/ReLU epilogue."""
    from tvm import s_tir

    register_codegen_hook()
    sch = s_tir.Schedule(func)
    out_blk = sch.get_sblock("dsconv_out")
    acc_blk = sch.get_sblock("dsconv_acc")
    epi_blk = sch.get_sblock("dsconv_epilogue")
    n_, o_, p_, q_, rg, ri, rj = sch.get_loops(out_blk)
    co = int(sch.get(o_).extent)
    vo = next(v for v in (4, 2, 1) if co % v == 0)
    oo, oi = sch.split(o_, [None, vo])
    sch.reorder(n_, oo, p_, q_, rg, ri, rj, oi)
    spatial = sch.fuse(n_, oo, p_, q_)
    bx, tx = sch.split(spatial, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.unroll(oi)
    sch.compute_at(acc_blk, oi, preserve_unit_loops=True)
    a_k = sch.get_loops(acc_blk)[-1]
    sch.unroll(a_k)
    sch.set_scope(acc_blk, 0, "local")
    sch.set_scope(out_blk, 0, "local")
    sch.reverse_compute_at(epi_blk, tx)
    sch.decompose_reduction(acc_blk, a_k)
    sch.decompose_reduction(out_blk, rg)
    for name in ("amax", "bfp_e", "bfp_s", "bfp_m4", "dsconv_wsum"):
        block = get_block(sch, name)
        if block is not None:
            _bind_spatial(sch, block)
    return sch


def _dlight():
    from tvm.s_tir import dlight

    class DSConvCUDA(dlight.ScheduleRule):
        """Default schedule of the CUDA DSConv PrimFuncs."""

        def is_target_available(self, target) -> bool:
            return target.kind.name == "cuda"

        def apply(self, func, target, _tunable):
            if not self.is_target_available(target) or not is_dsconv(func):
                return None
            return schedule_dsconv_cuda(func, target)

    return DSConvCUDA


def default_schedule_pass():
    """DSConv rule first, then TVM's dlight GPU rules for every other PrimFunc."""
    from tvm.s_tir import dlight as dl

    return dl.ApplyDefaultSchedule(_dlight()(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                   dl.gpu.GeneralReduction(), dl.gpu.Fallback())
