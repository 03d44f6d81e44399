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
sdot        4     2 by-element sdot (s8*s8, 4 products into i32), Cortex-A76+  int8 x int8
neon        4     2 smull + 2 smlal (s8*s8 -> i16, high halves: smull2 or one  int8 x int8
                  ext per tile), addp, sadalp (-> i32), Cortex-A72; where the
                  block allows and weights have <= 5 bits, 16 channels per call
                  (2 smull + 6 smlal, one addp + sadalp for 64 MACs)
==========  ====  ===========================================================  ==============

The i16 steps are exact for the weights they are given (``max_bits``): the two vpmaddubsw
results added in i16 hold 4 products of at most 255 * 32 (6-bit weights), the smull/smlal/addp
sums 4 products of at most 128 * 32.  Wider weights use vnni / sdot or the plain vector schedule
(:func:`select`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
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
    channels: int = 2 * TAP   # input channels per call


def _desc(lanes: int, act_dtype: str, channels: int = 2 * TAP):
    groups = channels // TAP

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        sb = T.int32()
        A = T.match_buffer(a, (channels,), act_dtype, offset_factor=1)
        B = T.match_buffer(b, (groups, lanes, TAP), "int8", strides=[sb, TAP, 1], offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:channels], B[0:groups, 0:lanes, 0:TAP])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, channels):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vk // TAP, vi, vk % TAP])

    return desc


def _splat(A, half: int, dtype: str, copies: int, by_lane: bool = False, words: int = 2):
    """The 4 activation bytes of one 4-channel half (0 or 1) of ``A``, repeated ``copies`` times as
    one byte vector (one 32-bit broadcast): the operand facing ``copies`` output channels.

    ``by_lane``: the broadcast is a shuffle of lane ``half`` of the 8 bytes loaded as two 32-bit
    words, which LLVM folds into the by-element form of the instruction that takes it (AArch64
    ``sdot v.4s, v.16b, v.4b[half]``): one plain 8-byte load serves both halves and every output
    channel group of the pixel, instead of one ``ld1r`` (and its address arithmetic) per call."""
    if by_lane:
        loaded = T.reinterpret(A.vload([0], f"{dtype}x{TAP * words}"), dtype=f"int32x{words}")
        lanes = tirx.Shuffle([loaded] * max(1, copies // words), [half] * copies)
        return T.reinterpret(lanes, dtype=f"{dtype}x{copies * TAP}")
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


def _accumulating_dot(lanes: int, act_dtype: str, llvm_name: str, weights_first: bool, by_lane: bool = False):
    """Instructions that multiply 4 bytes and accumulate into i32 lanes themselves (vpdpbusd,
    sdot): one call per 4-channel half.  LLVM 22 declares both with byte-vector operands (TVM
    0.27's own VNNI intrinsic passes i32 vectors and fails LLVM verification, hence these)."""
    nbytes = lanes * TAP

    def _update(A, B, C):
        # one expression (see _x86_pmadd): the two halves accumulated in turn into C
        def dot(acc, half):
            w, x = B.vload([half, 0, 0], f"int8x{nbytes}"), _splat(A, half, act_dtype, lanes, by_lane)
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


def _neon(channels: int):
    """Cortex-A72 has no sdot.  The 4 output channels' weights of one 4-channel group are one
    16-byte vector (2 channels per 8-byte half of it): ``smull`` multiplies the low halves (output
    channels 0, 1) by the broadcast activations, ``smull2`` the high halves (2, 3) directly; the
    other 4-channel groups are added in i16 (``smlal``/``smlal2``), neighbouring pairs are added
    (``addp``) and the pairs accumulated into i32 (``sadalp``).  8 channels: 6 instructions per
    32 MACs; 16 channels: 10 per 64 (the i16 sums then hold 8 products: weights of 5 bits at most).
    One expression (see _x86_pmadd)."""
    groups = channels // TAP             # 4-channel groups; also the 32-bit words of A

    def half_of(v, high):                 # 8 of the 16 bytes: LLVM's extract_high for smull2
        return tirx.Shuffle([v], list(range(8, 16) if high else range(8)))

    def update(A, B, C):
        def products(high):               # output channels (0, 1) or (2, 3): all groups, i16
            def smull(g):
                w = B.vload([g, 0, 0], "int8x16")
                x = _splat(A, g, "int8", 4, True, groups)
                return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_SMULL), half_of(w, high),
                                               half_of(x, high), dtype="int16x8")

            total = smull(0)
            for g in range(1, groups):
                total = total + smull(g)
            return total

        pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v8i16"),
                                        products(False), products(True), dtype="int16x8")
        return C.vload([0], "int32x4") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"), pairs, dtype="int32x4")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sb = T.int32()
        A = T.match_buffer(a, (channels,), "int8", offset_factor=1)
        B = T.match_buffer(b, (groups, 4, TAP), "int8", strides=[sb, TAP, 1], offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:channels], B[0:groups, 0:4, 0:TAP])
            T.writes(C[0:4])
            C[T.ramp(T.int32(0), 1, 4)] = update(A, B, C)

    return impl


_INTRINS: dict[str, DotIntrin] = {}


#: intrinsics over 16 input channels per call, used where the block's slots allow it (by isa)
_DEEP: dict[str, DotIntrin] = {}


def _register(isa: str, lanes: int, act_dtype: str, max_bits: int, impl, channels: int = 2 * TAP) -> None:
    name = f"dsconv_dot_{lanes}x{channels}_{isa}"
    try:
        TensorIntrin.get(name)
    except Exception:  # noqa: BLE001  (not registered yet in this process)
        TensorIntrin.register(name, _desc(lanes, act_dtype, channels), impl)
    (_INTRINS if channels == 2 * TAP else _DEEP)[isa] = DotIntrin(name, isa, lanes, act_dtype, max_bits, channels)


def register() -> None:
    """Register every DSConv dot-product intrinsic (idempotent; trace replay needs them)."""
    if _INTRINS:
        return
    _register("avx2", 8, "uint8", 6, _x86_pmadd(8, "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"))
    _register("avx512", 16, "uint8", 6,
              _x86_pmadd(16, "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"))
    _register("vnni", 16, "uint8", 8, _accumulating_dot(16, "uint8", "llvm.x86.avx512.vpdpbusd.512", False))
    _register("vnni256", 8, "uint8", 8, _accumulating_dot(8, "uint8", "llvm.x86.avx512.vpdpbusd.256", False))
    _register("sdot", 4, "int8", 8, _accumulating_dot(4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", True, True))
    _register("neon", 4, "int8", 6, _neon(2 * TAP))
    _register("neon", 4, "int8", 5, _neon(4 * TAP), 4 * TAP)


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


def select(target, bits: int, act_dtype: str, out_channels: int | None = None,
           slots: int | None = None) -> DotIntrin | None:
    """The intrinsic for a layer on ``target``, or None when the plain vector schedule is used.
    With ``out_channels``, one whose lanes divide it (the narrower one of :data:`NARROWER` when the
    widest does not)."""
    isa = isa_of(target)
    if isa is None:
        return None
    register()
    deep = _DEEP.get(isa)
    # only where the block keeps a loop of such steps: a single 16-channel step per block and
    # tap (blocks of 16) measured slower on the A72 (ResNet-20's 16-channel layers: +35 %)
    if (deep and slots and slots % deep.channels == 0 and slots > deep.channels and bits <= deep.max_bits
            and act_dtype == deep.act_dtype
            and (out_channels is None or out_channels % deep.lanes == 0)):
        return deep
    for cand in (isa, *NARROWER.get(isa, ())):
        intrin = _INTRINS.get(cand) if cand else None
        if intrin is None or bits > intrin.max_bits or act_dtype != intrin.act_dtype:
            continue
        if out_channels is None or out_channels % intrin.lanes == 0 or cand == isa and cand not in NARROWER:
            return intrin
    intrin = _INTRINS[isa]
    return intrin if bits <= intrin.max_bits and act_dtype == intrin.act_dtype else None
