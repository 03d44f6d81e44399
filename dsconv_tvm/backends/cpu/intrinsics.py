"""Tensor intrinsics of the DSConv integer dot product, one per instruction set.

Every intrinsic has the same meaning (its *description*), for ``L`` output channels and the 8
input channels of one packed weight group at one pixel::

    C[o] += sum_k int32(A[k]) * int32(B[k // 4, o, k % 4])      o < L, k < 8

``A`` are 8 mantissas of the pixel (contiguous: the channel-innermost layout of ``bfp_m``), ``B``
the sign-extended weights of the two 4-channel halves (``[2, L, 4]``: the low and high nibbles of
``L x 4`` packed bytes, ``kernels.pack_weights``), ``C`` the int32 block accumulators.

==========  ====  ===========================================================  ==============
isa         L     instructions per call                                        mantissa x w
==========  ====  ===========================================================  ==============
avx2        8     2 vpmaddubsw (u8*s8 -> i16 pairs), vpaddw, vpmaddwd (-> i32)  uint8 x int8
avx512      16    the same on zmm registers (AVX-512BW)                        uint8 x int8
vnni        16    2 vpdpbusd (u8*s8, 4 products accumulated in i32)            uint8 x int8
vnni256     8     the same on ymm (AVX-512VL): 7-8-bit weights, 8 | CO         uint8 x int8
sdot        4     2 sdot (s8*s8, 4 products accumulated in i32), Cortex-A76+   int8 x int8
neon        4     4 smull (s8*s8 -> i16), add, addp, sadalp (-> i32), A72      int8 x int8
==========  ====  ===========================================================  ==============

The i16 steps are exact for the weights they are given (``max_bits``): the two vpmaddubsw
results added in i16 hold 4 products of at most 255 * 32 (6-bit weights), the smull/add/addp
sums 4 products of at most 128 * 32.  Wider weights use vnni / sdot or the plain vector schedule
(:func:`select`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

TAP = 4


@dataclass(frozen=True)
class DotIntrin:
    name: str            # registered TensorIntrin name
    isa: str             # avx2 | avx512 | vnni | sdot | neon
    lanes: int           # L: output channels per call
    act_dtype: str       # mantissa storage it multiplies
    max_bits: int        # widest weights it is exact for


def _desc(lanes: int, act_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sb = T.int32()
        A = T.match_buffer(a, (2 * TAP,), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (2, lanes, TAP), "int8", strides=[sb, TAP, 1], offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2 * TAP], B[0:2, 0:lanes, 0:TAP])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 2 * TAP):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk // TAP, vi, vk % TAP])

    return desc


def _splat(A, half: int, dtype: str, copies: int):
    """The 4 activation bytes of one 4-channel half (0 or 1) of ``A``, repeated ``copies`` times as
    one byte vector (one 32-bit broadcast): the operand facing ``copies`` output channels."""
    word = T.reinterpret(A.vload([half * TAP], f"{dtype}x4"), dtype="int32")
    return T.reinterpret(T.broadcast(word, copies), dtype=f"{dtype}x{copies * TAP}")


def _x86_pmadd(lanes: int, maddubs: str, maddwd: str):
    """u8 x s8: vpmaddubsw per 4-channel half to pairs of i16, the halves added in i16, then
    vpmaddwd against ones to i32 and added to C."""
    nbytes = lanes * TAP

    def _update(A, B, C):
        # one expression, built here in Python: a name bound inside the prim_func body would become
        # a TIR let, which TVM 0.27 turns into a workspace allocation in every call
        def maddubs_half(half):
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(maddubs), _splat(A, half, "uint8", lanes),
                                           B.vload([half, 0, 0], f"int8x{nbytes}"), dtype=f"int16x{2 * lanes}")

        pairs = maddubs_half(0) + maddubs_half(1)
        return C.vload([0], f"int32x{lanes}") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(maddwd), pairs, T.broadcast(T.int16(1), 2 * lanes), dtype=f"int32x{lanes}")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sb = T.int32()
        A = T.match_buffer(a, (2 * TAP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (2, lanes, TAP), "int8", strides=[sb, TAP, 1], offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2 * TAP], B[0:2, 0:lanes, 0:TAP])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = _update(A, B, C)

    return impl


def _accumulating_dot(lanes: int, act_dtype: str, llvm_name: str, weights_first: bool):
    """Instructions that multiply 4 bytes and accumulate into i32 lanes themselves (vpdpbusd,
    sdot): one call per 4-channel half.  LLVM 22 declares both with byte-vector operands (TVM
    0.27's own VNNI intrinsic passes i32 vectors and fails LLVM verification, hence these)."""
    nbytes = lanes * TAP

    def _update(A, B, C):
        # one expression (see _x86_pmadd): the two halves accumulated in turn into C
        def dot(acc, half):
            w, x = B.vload([half, 0, 0], f"int8x{nbytes}"), _splat(A, half, act_dtype, lanes)
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(llvm_name), acc,
                                           w if weights_first else x, x if weights_first else w,
                                           dtype=f"int32x{lanes}")

        return dot(dot(C.vload([0], f"int32x{lanes}"), 0), 1)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sb = T.int32()
        A = T.match_buffer(a, (2 * TAP,), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (2, lanes, TAP), "int8", strides=[sb, TAP, 1], offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2 * TAP], B[0:2, 0:lanes, 0:TAP])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = _update(A, B, C)

    return impl


_SMULL = "llvm.aarch64.neon.smull.v8i16"


def _neon_update(A, B, C):
    """Cortex-A72 has no sdot: widen-multiply two output channels per smull (8 x i16), add the two
    4-channel halves in i16, add neighbouring pairs (addp), then add pairs into i32 (sadalp).  One
    expression (see _x86_pmadd)."""
    def channel_pair(o):         # output channels o, o+1: both halves, products added in i16
        def smull(half):
            return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_SMULL), B.vload([half, o, 0], "int8x8"),
                                           _splat(A, half, "int8", 2), dtype="int16x8")

        return smull(0) + smull(1)

    pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v8i16"),
                                    channel_pair(0), channel_pair(2), dtype="int16x8")
    return C.vload([0], "int32x4") + T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"), pairs, dtype="int32x4")


@T.prim_func(s_tir=True)
def _neon_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    sb = T.int32()
    A = T.match_buffer(a, (2 * TAP,), "int8", offset_factor=1)
    B = T.match_buffer(b, (2, 4, TAP), "int8", strides=[sb, TAP, 1], offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:2 * TAP], B[0:2, 0:4, 0:TAP])
        T.writes(C[0:4])
        C[T.ramp(T.int32(0), 1, 4)] = _neon_update(A, B, C)


_INTRINS: dict[str, DotIntrin] = {}


def _register(isa: str, lanes: int, act_dtype: str, max_bits: int, impl) -> None:
    name = f"dsconv_dot_{lanes}x{2 * TAP}_{isa}"
    try:
        TensorIntrin.get(name)
    except Exception:  # noqa: BLE001  (not registered yet in this process)
        TensorIntrin.register(name, _desc(lanes, act_dtype), impl)
    _INTRINS[isa] = DotIntrin(name, isa, lanes, act_dtype, max_bits)


def register() -> None:
    """Register every DSConv dot-product intrinsic (idempotent; trace replay needs them)."""
    if _INTRINS:
        return
    _register("avx2", 8, "uint8", 6, _x86_pmadd(8, "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"))
    _register("avx512", 16, "uint8", 6,
              _x86_pmadd(16, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"))
    _register("vnni", 16, "uint8", 8, _accumulating_dot(16, "uint8", "llvm.x86.avx512.vpdpbusd.512", False))
    _register("vnni256", 8, "uint8", 8, _accumulating_dot(8, "uint8", "llvm.x86.avx512.vpdpbusd.256", False))
    _register("sdot", 4, "int8", 8, _accumulating_dot(4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", True))
    _register("neon", 4, "int8", 6, _neon_impl)


def isa_of(target) -> str | None:
    """The best dot-product instruction set of an llvm target (None: plain vector code)."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "")) or str(codegen.llvm_get_system_triple())
    has = lambda feats: bool(codegen.target_has_features(feats, target))  # noqa: E731
    try:
        if triple.startswith("aarch64"):
            return "sdot" if has("dotprod") else "neon"
        if triple.startswith(("arm", "thumb")):
            return None
        if has("avx512vnni"):
            return "vnni"
        if has("avx512bw"):
            return "avx512"
        if has("avx2"):
            return "avx2"
    except Exception:  # noqa: BLE001  (a target LLVM cannot describe: no intrinsic)
        return None
    return None


def activation_dtype(target) -> str:
    """How a target's DSConv layers store their mantissas (what its dot product multiplies)."""
    isa = isa_of(target)
    return "int8" if isa in ("sdot", "neon") else "uint8"


#: narrower intrinsics of the same machine, in order, for output channel counts the wide one does not
#: divide (a 1000-class classifier: 62 x 16 + 8; MobileNetV2's 24-channel projections): the 8-lane ymm
#: vpmaddubsw sequence on AVX-512 targets, then (7-8-bit weights, which vpmaddubsw's i16 pairs cannot
#: take) ymm vpdpbusd on VNNI -- without it such layers fell back to the plain vector schedule,
#: 2.8x slower (a 96->24 1x1 conv at 56x56: 0.48 vs 0.17 ms at W4)
NARROWER = {"vnni": ("avx2", "vnni256"), "avx512": ("avx2",)}


def select(target, bits: int, act_dtype: str, out_channels: int | None = None) -> DotIntrin | None:
    """The intrinsic for a layer on ``target``, or None when the plain vector schedule is used.
    With ``out_channels``, one whose lanes divide it (the narrower one of :data:`NARROWER` when the
    widest does not)."""
    isa = isa_of(target)
    if isa is None:
        return None
    register()
    for cand in (isa, *NARROWER.get(isa, ())):
        intrin = _INTRINS.get(cand) if cand else None
        if intrin is None or bits > intrin.max_bits or act_dtype != intrin.act_dtype:
            continue
        if out_channels is None or out_channels % intrin.lanes == 0 or cand == isa and cand not in NARROWER:
            return intrin
    intrin = _INTRINS[isa]
    return intrin if bits <= intrin.max_bits and act_dtype == intrin.act_dtype else None
