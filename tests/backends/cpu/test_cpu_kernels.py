"""The DSConv TensorIR kernel, scheduled and compiled, against the numpy reference."""

import dataclasses
import re

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from dsconv_tvm.scheme.layer import DSConvLayer
from dsconv_tvm.backends.cpu.kernels import dsconv_primfunc
from dsconv_tvm.backends.cpu.layout import layer_params, pack_weights, unpack_weights
from dsconv_tvm.scheme.geometry import ConvGeometry
from dsconv_tvm.scheme.reference import activate, dsconv2d
from dsconv_tvm.backends.cpu.intrinsics import activation_dtype, isa_of
from dsconv_tvm.backends.cpu.schedule import dot_intrin, schedule_dsconv_cpu, tile_options
from dsconv_tvm.backends.common import is_dsconv
from dsconv_tvm.target import get_target
from dsconv_tvm.scheme.weights import quantize_weight

HOST = get_target("x86").tvm_target()
HOST_ISA = isa_of(HOST)
# x86 builds that run on this machine, one per dot-product path: the host's best, AVX2
# (vpmaddubsw), AVX-512BW where the CPU has it, and the plain vector schedule ("novec": a target
# without an intrinsic, x86-64 baseline)
RUNNABLE = {"host": HOST, "avx2": get_target("x86-avx2").tvm_target()}
if HOST_ISA in ("avx512", "vnni"):
    RUNNABLE["avx512"] = get_target("x86-avx512").tvm_target()
RUNNABLE["plain"] = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64",
                                       "num-cores": 2})

# Tolerance: the kernel and the reference compute the same integers (block dot products, BFP
# mantissas and exponents are exact), and every float term acc * xi * 2^(e-f) is the same float32
# product; only the order of the float32 sum over blocks and taps differs.  So the difference is
# a few float32 roundings of the partial sums: bounded by ~1e-6 x (number of terms) x max term.
RTOL = 2e-6


def _run_layer(layer: DSConvLayer, seed: int, scheduled: bool = True, target=HOST, tile=None):
    rng = np.random.default_rng(seed)
    n, c, h, w = layer.in_shape
    co = layer.out_channels
    kh, kw = layer.kernel
    x = rng.standard_normal(layer.in_shape).astype(np.float32) * 3
    if layer.unsigned:
        x = np.maximum(x, 0)
    pro = []
    if layer.has_prologue:
        # BN-like constants; numpy rounds every op on its own (no FMA), the kernel must too: one
        # product rounded otherwise would flip mantissas of ~0.1 % of the outputs (well beyond RTOL)
        x = rng.standard_normal(layer.in_shape).astype(np.float32) * 3
        pro = [(rng.random(c) + 0.5 if op == "divide" else
                (rng.random(c) + 0.5) * rng.choice([-1, 1], c) if op == "multiply" else
                rng.standard_normal(c)).astype(np.float32) for op in layer.prologue]
    wf = rng.standard_normal((co, c, kh, kw)).astype(np.float32)
    qw = quantize_weight(wf, layer.bits, layer.block, "l2", layer.scale_dtype)
    bias = rng.standard_normal(co).astype(np.float32) if layer.has_bias else None
    func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
    mod = schedule_dsconv_cpu(func, target, tile).mod if scheduled else func
    ex = tvm.compile(mod, target)
    args = [x, *layer_params(layer, qw.q, qw.xi, bias), *pro]
    res = rng.standard_normal(layer.out_shape).astype(np.float32) if layer.has_residual else None
    if res is not None:
        args.append(res)
    out = tvm.runtime.tensor(np.zeros(layer.out_shape, np.float32))
    ex(*[tvm.runtime.tensor(a) for a in args], out)
    for op, const in zip(layer.prologue, pro):
        x = getattr(np, op)(x, const[:, None, None]).astype(np.float32)
    if layer.prologue_relu:
        x = np.maximum(x, 0)
    ref = dsconv2d(x, qw.q, qw.xi, layer.block, layer.mantissa, layer.geom, bias, layer.unsigned)
    if res is not None:
        ref = ref + res
    ref = activate(ref, layer.activation)
    # scale of the float sum: the sum of |terms| bounds its rounding error
    absref = dsconv2d(np.abs(x), np.abs(qw.q.astype(np.int16)), np.abs(qw.xi), layer.block, layer.mantissa, layer.geom,
                      None, layer.unsigned)
    terms = layer.groups * kh * kw
    extra = 0.0 if res is None else 1e-6 * float(np.abs(res).max() + absref.max())   # one more rounding
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=float(RTOL * terms * absref.max() + extra + 1e-30))
    return out.numpy(), ref


CASES = [
    # in_shape, CO, kernel, strides, padding, dilation, bits, block, mantissa, unsigned, bias, act
    ((1, 8, 6, 6), 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 4, 8, False, False, "none"),
    ((1, 10, 7, 5), 6, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 4, 4, 8, True, True, "relu"),
    ((2, 5, 6, 6), 3, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 3, 3, 6, False, True, "none"),
    ((1, 16, 5, 5), 8, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 8, 32, 8, False, False, "none"),
    ((1, 7, 5, 5), 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6, 1, 5, True, False, "none"),
    ((1, 64, 14, 14), 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 32, 8, True, True, "relu"),
    ((1, 40, 9, 9), 24, (3, 3), (2, 2), (0, 1, 2, 1), (1, 1), 4, 32, 8, False, True, "none"),  # partial block
    ((1, 16, 8, 8), 16, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 2, 16, 4, True, False, "relu"),
    ((1, 24, 8, 11), 20, (1, 3), (1, 2), (0, 1, 0, 1), (1, 1), 5, 8, 7, False, True, "relu"),  # non-square
    ((1, 32, 6, 6), 24, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, 32, 8, True, True, "relu6"),
    ((1, 33, 6, 6), 17, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 64, 8, True, False, "none"),  # B > C
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-co{c[1]}-k{c[2]}-s{c[3]}-b{c[6]}B{c[7]}m{c[8]}")
def test_scheduled_kernel_matches_reference(case):
    in_shape, co, k, s, p, d, bits, block, m, uns, bias, act = case
    layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p, d), bits, block, m, uns, "float32", bias, act)
    _run_layer(layer, seed=hash(case) % 1000)


TENSORIZED = [
    # in_shape, CO, kernel, strides, padding, bits, block, unsigned, act_dtype, residual
    ((1, 64, 14, 14), 64, (3, 3), (1, 1), (1, 1, 1, 1), 4, 32, True, "uint8", False),
    ((1, 64, 9, 9), 32, (3, 3), (2, 2), (1, 1, 1, 1), 4, 64, False, "uint8", True),   # signed: offset +128
    ((1, 48, 7, 7), 16, (1, 1), (1, 1), (0, 0, 0, 0), 4, 16, True, "uint8", True),
    ((1, 40, 6, 6), 32, (3, 3), (1, 1), (1, 1, 1, 1), 6, 32, True, "uint8", False),   # int8 weights, partial
    ((1, 32, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), 4, 32, True, "int8", False),    # ARM storage: -128
    ((1, 32, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), 8, 32, False, "uint8", False),  # 8 bits: vnni only
    ((1, 128, 1, 1), 40, (1, 1), (1, 1), (0, 0, 0, 0), 4, 64, True, "uint8", False),  # 40 = 2 x 16 + 8
    # 2-bit weights, four per byte (16-channel unpack steps): signed (offset), partial, ARM storage
    ((1, 64, 9, 9), 32, (3, 3), (1, 1), (1, 1, 1, 1), 2, 32, True, "uint8", True),
    ((1, 40, 7, 7), 16, (3, 3), (2, 2), (1, 1, 1, 1), 2, 32, False, "uint8", False),   # partial block
    ((1, 48, 6, 6), 16, (1, 1), (1, 1), (0, 0, 0, 0), 2, 8, True, "uint8", False),     # B=8 < 16 slots
    ((1, 32, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), 2, 32, True, "int8", False),
    ((1, 64, 7, 7), 24, (1, 1), (1, 1), (0, 0, 0, 0), 8, 32, True, "uint8", True),     # 8-bit, 24 = 3 x 8
    # fully connected layers (1x1 maps: the matrix-vector schedule), 4-, 2- and 8-bit weights
    ((1, 1024, 1, 1), 64, (1, 1), (1, 1), (0, 0, 0, 0), 4, 64, True, "uint8", False),
    ((1, 512, 1, 1), 2064, (1, 1), (1, 1), (0, 0, 0, 0), 4, 64, False, "uint8", False),  # 2 chunks + 16
    ((1, 256, 1, 1), 48, (1, 1), (1, 1), (0, 0, 0, 0), 2, 32, True, "uint8", False),
    ((1, 192, 1, 1), 32, (1, 1), (1, 1), (0, 0, 0, 0), 8, 64, True, "uint8", False),
]


BN = ("subtract", "divide", "multiply", "add")
PROLOGUE = [
    # in_shape, CO, kernel, padding, bits, block, prologue ops, relu, act_dtype
    ((1, 64, 7, 7), 32, (1, 1), (0, 0, 0, 0), 4, 32, ("multiply", "add"), True, "uint8"),   # DenseNet
    ((1, 40, 6, 6), 16, (3, 3), (1, 1, 1, 1), 4, 32, BN + ("multiply", "add"), True, "uint8"),  # padding
    ((1, 48, 6, 6), 16, (1, 1), (0, 0, 0, 0), 2, 16, BN, False, "uint8"),    # BN alone: signed
    ((1, 32, 5, 5), 8, (3, 3), (1, 1, 1, 1), 4, 32, (), True, "uint8"),       # ReLU alone
    ((1, 32, 6, 6), 16, (3, 3), (1, 1, 1, 1), 4, 32, ("multiply", "add"), True, "int8"),    # ARM storage
    ((1, 10, 5, 5), 6, (3, 3), (1, 1, 1, 1), 6, 4, ("add",), True, "uint8"),  # plain schedule path
    ((1, 40, 5, 5), 16, (1, 1), (0, 0, 0, 0), 4, 32, BN + ("multiply", "add"), True, "uint8"),  # 32 + 8
    ((1, 20, 5, 5), 8, (1, 1), (0, 0, 0, 0), 4, 6, ("multiply", "add"), True, "uint8"),   # slots > block
]


@pytest.mark.parametrize("path", ["host", "avx2", "plain"])
@pytest.mark.parametrize("case", PROLOGUE,
                         ids=lambda c: f"{c[0]}-k{c[2]}-b{c[4]}B{c[5]}-{len(c[6])}ops-r{int(c[7])}-{c[8]}")
def test_prologue_kernels_match_reference(case, path):
    """A layer that applies per-channel ops (an absorbed BN) and / or a ReLU to its float input
    before quantizing it: the same integers and output as numpy on the prologue's output."""
    in_shape, co, k, p, bits, block, ops, relu, act = case
    layer = DSConvLayer(in_shape, co, k, ConvGeometry((1, 1), p), bits, block, 8, relu, "float32", True, "relu",
                        act, prologue=ops, prologue_relu=relu)
    assert dsconv_primfunc(layer).script().count("pro_") >= len(ops)
    _run_layer(layer, seed=co + bits, target=RUNNABLE[path])


@pytest.mark.parametrize("k", [1, 3])
def test_prologue_rounds_every_op_on_its_own(k):
    """On a DenseNet-sized input (128 x 56 x 56; per row and inlined), a multiply-add contracted
    to an FMA would round ~15 % of the prologue's values differently from numpy and flip some
    mantissas, far beyond the tolerance: the kernel keeps every float32 op separate."""
    layer = DSConvLayer((1, 128, 56, 56), 32, (k, k), ConvGeometry((1, 1), (k // 2,) * 4), 4, 64, 8, True,
                        "float32", False, "none", prologue=("multiply", "add"), prologue_relu=True)
    _run_layer(layer, seed=7)


def test_narrower_intrinsic_when_the_wide_one_does_not_divide_the_channels():
    """A 1000-class classifier on AVX-512 / VNNI: 8-lane ymm dot products, not the plain schedule."""
    layer = DSConvLayer((1, 256, 1, 1), 1000, (1, 1), ConvGeometry(), 4, 64, 8, True, "float32", True, "none")
    func = dsconv_primfunc(layer)
    for name in ("x86-avx512", "x86-vnni"):
        assert dot_intrin(func, get_target(name).tvm_target()).isa == "avx2"
    wide = DSConvLayer((1, 256, 1, 1), 1008, (1, 1), ConvGeometry(), 4, 64, 8, True, "float32", True, "none")
    assert dot_intrin(dsconv_primfunc(wide), get_target("x86-vnni").tvm_target()).isa == "vnni"
    w8 = DSConvLayer((1, 96, 8, 8), 24, (1, 1), ConvGeometry(), 8, 32, 8, True, "float32", True, "none")
    assert dot_intrin(dsconv_primfunc(w8), get_target("x86-vnni").tvm_target()).isa == "vnni256"
    assert re.search(r"\bvpdpbusd\s+%ymm", _asm("x86-vnni", w8))      # not the plain vector schedule
    arm = DSConvLayer((1, 256, 1, 1), 1000, (1, 1), ConvGeometry(), 4, 64, 8, True, "float32", True, "none", "int8")
    assert dot_intrin(dsconv_primfunc(arm), get_target("rpi5").tvm_target()).isa == "sdot"


@pytest.mark.parametrize("path", list(RUNNABLE))
@pytest.mark.parametrize("case", TENSORIZED, ids=lambda c: f"{c[0]}-co{c[1]}-k{c[2]}-b{c[5]}B{c[6]}-{c[8]}")
def test_dot_product_kernels_match_reference(case, path):
    """Every runnable dot-product path (and every register tile it would try) against numpy."""
    in_shape, co, k, s, p, bits, block, uns, act, residual = case
    layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p), bits, block, 8, uns, "float32", True, "relu",
                        act, residual)
    target = RUNNABLE[path]
    func = dsconv_primfunc(layer)
    intrin = dot_intrin(func, target)
    if path in ("avx2", "avx512"):
        assert (intrin is not None) == (bits <= 6 and act == "uint8"), intrin
    if path == "plain":
        assert intrin is None
    for tile in tile_options(func, target)[:3]:
        _run_layer(layer, seed=co + bits, target=target, tile=tile)


@settings(max_examples=12, deadline=None)
@given(c=st.integers(1, 20), co=st.integers(1, 20), hw=st.integers(3, 9), k=st.sampled_from([1, 2, 3]),
       s=st.integers(1, 2), pad=st.integers(0, 2), d=st.integers(1, 2), bits=st.integers(2, 8),
       block=st.integers(1, 24), m=st.integers(2, 8), uns=st.booleans(), bias=st.booleans(),
       scale16=st.booleans())
def test_random_layers_match_reference(c, co, hw, k, s, pad, d, bits, block, m, uns, bias, scale16):
    if hw + 2 * pad < d * (k - 1) + 1:
        return
    layer = DSConvLayer((1, c, hw, hw), co, (k, k), ConvGeometry((s, s), (pad,) * 4, (d, d)), bits, block,
                        m, uns, "float16" if scale16 else "float32", bias, "relu" if bias else "none")
    _run_layer(layer, seed=c * 31 + co)


@pytest.mark.parametrize("in_shape, k, pad, strides, act", [
    ((1, 72, 16, 16), (3, 3), (1, 1, 1, 1), (1, 1), "uint8"),     # padded, a partial second block
    ((1, 48, 16, 16), (1, 1), (0, 0, 0, 0), (1, 1), "uint8"),     # unpadded: the fused row pass
    ((1, 48, 16, 16), (3, 3), (0, 1, 2, 1), (2, 2), "int8"),      # ARM storage, uneven padding
])
def test_input_rows_copied_where_channel_loads_share_l1_sets(in_shape, k, pad, strides, act):
    """A 16x16 map (a 1 KB channel stride: 4 L1 sets for 48+ channels) makes the mantissa stage
    read the input from a row copy (``x_global``); the integers stay those of the reference."""
    layer = DSConvLayer(in_shape, 16, k, ConvGeometry(strides, pad), 4, 64, 8, True, "float32", True, "relu",
                        act)
    target = HOST if act == "uint8" else RUNNABLE["plain"]
    sch = schedule_dsconv_cpu(dsconv_primfunc(layer).with_attr("global_symbol", "main"), target)
    assert "x_global" in sch.mod.script()
    _run_layer(layer, seed=in_shape[1], target=target)


def test_unscheduled_and_scheduled_agree_bitwise_on_integers():
    """One block and one tap: a single float term per output, so results must be identical."""
    layer = DSConvLayer((1, 16, 6, 6), 8, (1, 1), ConvGeometry(), 4, 16, 8, False, "float32", False, "none")
    a, ref = _run_layer(layer, 3, scheduled=True)
    b, _ = _run_layer(layer, 3, scheduled=False)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-co{c[1]}-k{c[2]}-b{c[6]}B{c[7]}m{c[8]}")
def test_arm_layout_kernel_matches_reference_on_host(case):
    """The ARM kernels' TE (int8 mantissas, two's complement nibbles, no mantissa sum, the
    vectorized rounding) under the host's plain vector schedule: the same integers as the
    reference (the ARM instructions themselves run in tests/backends/cpu/test_arm_kernels.py)."""
    in_shape, co, k, s, p, d, bits, block, m, uns, bias, act = case
    layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p, d), bits, block, m, uns, "float32", bias, act, "int8")
    _run_layer(layer, 7, target=RUNNABLE["plain"])


@settings(max_examples=60, deadline=None)
@given(co=st.integers(1, 9), ci=st.integers(1, 40), k=st.integers(1, 3), bits=st.integers(2, 8),
       block=st.integers(1, 33), seed=st.integers(0, 2 ** 16), signed=st.booleans())
def test_pack_unpack_roundtrip(co, ci, k, bits, block, seed, signed):
    rng = np.random.default_rng(seed)
    q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (co, ci, k, k)).astype(np.int8)
    wp = pack_weights(q, bits, block, signed)
    g = -(-ci // block)
    per = 4 if bits == 2 else 2 if bits <= 4 else 1           # fields per byte, written out here
    bp = -(-block // (4 * max(per, 2))) * 4 * max(per, 2)
    assert wp.dtype == (np.uint8 if per > 1 else np.int8) and wp.shape == (g, k, k, bp // (4 * per), co, 4)
    assert np.array_equal(unpack_weights(wp, bits, block, ci, signed), q)


def test_two_bit_fields_by_hand():
    """Channel c = 16k + 4h + t of a block: crumb h of byte [k, o, t] holds w + 2 (x86) or w in
    two's complement (ARM, signed)."""
    q = np.zeros((1, 16, 1, 1), np.int8)
    q[0, [0, 4, 8, 12, 13], 0, 0] = [-2, -1, 1, 0, 1]
    wp = pack_weights(q, 2, 16)
    assert wp.shape == (1, 1, 1, 1, 1, 4)
    assert wp[0, 0, 0, 0, 0, 0] == 0 | 1 << 2 | 3 << 4 | 2 << 6
    assert wp[0, 0, 0, 0, 0, 1] == 2 | 2 << 2 | 2 << 4 | 3 << 6     # channels 1, 5, 9 (0) and 13 (1)
    ws = pack_weights(q, 2, 16, signed=True)
    assert ws.shape == wp.shape and ws.dtype == np.uint8
    assert ws[0, 0, 0, 0, 0, 0] == 2 | 3 << 2 | 1 << 4 | 0 << 6
    assert ws[0, 0, 0, 0, 0, 1] == 1 << 6


def test_packed_bytes_follow_the_bits():
    q = np.zeros((64, 64, 3, 3), np.int8)
    assert pack_weights(q, 2, 32).nbytes == q.size // 4
    assert pack_weights(q, 3, 32).nbytes == q.size // 2
    assert pack_weights(q, 4, 32).nbytes == q.size // 2
    assert pack_weights(q, 8, 32).nbytes == q.size


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_weights(np.full((1, 1, 1, 1), 8, np.int8), 4, 1)


def test_is_dsconv():
    layer = DSConvLayer((1, 8, 4, 4), 4, (3, 3), ConvGeometry(), 4, 8, 8)
    assert is_dsconv(dsconv_primfunc(layer))
    from tvm import te
    a = te.placeholder((4,), name="a")
    assert not is_dsconv(te.create_prim_func([a, te.compute((4,), lambda i: a[i] * 2)]))


def _asm(target_name, layer):
    spec = get_target(target_name)
    target = spec.tvm_target()
    func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
    ex = tvm.compile(schedule_dsconv_cpu(func, target).mod, target)
    return ex.mod.inspect_source("asm")


@pytest.mark.parametrize("target, isa, pattern, least", [
    # x86 AVX2: u8 x s8 byte dot products (vpmaddubsw), pairs to i32 (vpmaddwd), on ymm
    ("x86-avx2", "avx2", r"\bvpmaddubsw\s+%ymm", 16),
    # AVX-512BW: the same on zmm
    ("x86-avx512", "avx512", r"\bvpmaddubsw\s+%zmm", 16),
    # AVX-512 VNNI: vpdpbusd (cannot run on every x86; checked in the assembly)
    ("x86-vnni", "vnni", r"\bvpdpbusd\s+%zmm", 16),
    # Cortex-A72 (Raspberry Pi 4): widening multiplies, pairwise adds, accumulate long
    ("rpi4", "neon", r"\bsmull2?\s+v\d+\.8h|\bsadalp\s+v\d+\.4s", 16),
    ("arm", "neon", r"\bsmull2?\s+v\d+\.8h|\bsadalp\s+v\d+\.4s", 16),
    # Cortex-A76 (Raspberry Pi 5): sdot
    ("rpi5", "sdot", r"\bsdot\s+v\d+\.4s", 16),
])
def test_assembly_has_the_dot_product_instructions(target, isa, pattern, least):
    tvm_target = get_target(target).tvm_target()
    assert isa_of(tvm_target) == isa
    act = "int8" if isa in ("neon", "sdot") else "uint8"
    layer = DSConvLayer((1, 64, 14, 14), 64, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)), 4, 32, 8, True,
                        "float32", True, "relu", act)
    unpack = r"\bvpsrlw\s+\$4|\bvpand\s|\bushr\s+v\d+\.16b|\bsshr\s+v\d+\.16b|\band\s+v\d+\.16b"
    for bits in (4, 2):
        asm = _asm(target, dataclasses.replace(layer, bits=bits))
        assert len(re.findall(pattern, asm)) >= least
        # the 4- and 2-bit weights are unpacked in registers from the packed bytes (constant shifts:
        # x86 w + 2 crumbs shifted down, ARM two's complement crumbs sign-extended by sshr #6)
        assert re.search(unpack, asm)
        if bits == 2:
            assert re.search(r"\bvpsrlw\s+\$[246],|\bsshr\s+v\d+\.16b, v\d+\.16b, #6\b", asm)


@pytest.mark.parametrize("bits, block, channels", [(4, 64, 16), (5, 32, 16), (4, 24, 8), (4, 16, 8), (6, 64, 8),
                                                   (2, 32, 16), (2, 64, 16), (2, 16, 8), (2, 8, 8), (3, 32, 16)])
def test_a72_takes_16_channels_per_call_where_exact(bits, block, channels):
    """The A72's smull/smlal sequence sums 8 products in i16 when the block's slots allow 16
    channels per call (and more than one such step): only for weights of at most 5 bits
    (8 x 128 x 16 fits int16)."""
    layer = DSConvLayer((1, 64, 14, 14), 64, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)), bits, block, 8, True,
                        "float32", True, "relu", "int8")
    intrin = dot_intrin(dsconv_primfunc(layer), get_target("rpi4").tvm_target())
    assert intrin.isa == "neon" and intrin.channels == channels


def test_x86_plain_vector_fallback_for_8_bit_weights():
    """8-bit weights would saturate vpmaddubsw's i16 pairs: AVX2 falls back to plain vector code."""
    layer = DSConvLayer((1, 64, 14, 14), 64, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)), 8, 32, 8, True,
                        "float32", True, "relu")
    assert dot_intrin(dsconv_primfunc(layer), get_target("x86-avx2").tvm_target()) is None
    asm = _asm("x86-avx2", layer)
    assert not re.search(r"\bvpmaddubsw\b", asm)
    assert len(re.findall(r"\bvpmaddwd\s+%ymm|\bvpmulld\s+%ymm", asm)) >= 8


def test_armv7_compiles_with_neon():
    asm = _asm("rpi-armv7", DSConvLayer((1, 32, 8, 8), 16, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)),
                                        4, 32, 8, True))
    assert re.search(r"\bvml[a]\.i32\s+q\d+|\bvmlal\.[su]16\s+q\d+|\bvmul\.i32\s+q\d+", asm)


# ---- the default schedules of the fp32 ops a DSConv model keeps (stem conv, pooling) ---------------
def _pool_reference(x, kind, k, s, pad):
    n, c, h, w = x.shape
    fill = -np.inf if kind == "max" else 0.0
    xp = np.full((n, c, h + 2 * pad, w + 2 * pad), fill, np.float32)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    win = np.stack([xp[:, :, i:i + s * oh:s, j:j + s * ow:s] for i in range(k) for j in range(k)])
    if kind == "max":
        return win.max(0)
    valid = np.stack([np.pad(np.ones((h, w), np.float32), pad)[i:i + s * oh:s, j:j + s * ow:s]
                      for i in range(k) for j in range(k)]).sum(0)
    return win.sum(0) / valid             # count_include_pad=False


@pytest.mark.parametrize("shape,kind,k,s,pad", [((1, 16, 23, 23), "max", 3, 2, 1), ((1, 8, 20, 20), "max", 3, 2, 0),
                                                 ((2, 8, 14, 14), "avg", 2, 2, 0), ((1, 8, 9, 9), "avg", 3, 1, 1)])
def test_pool_default_schedule_matches_numpy(shape, kind, k, s, pad):
    from tvm import te, topi

    from dsconv_tvm.backends.cpu.rules import schedule_pool

    x = te.placeholder(shape, "float32", "x")
    y = topi.nn.pool2d(x, (k, k), (s, s), (1, 1), (pad,) * 4, kind, count_include_pad=False)
    sch = schedule_pool(te.create_prim_func([x, y]), HOST)
    assert sch is not None
    lib = tvm.compile(sch.mod, target=HOST)
    xn = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros([int(d) for d in y.shape], np.float32))
    lib(tvm.runtime.tensor(xn), out)
    np.testing.assert_allclose(out.numpy(), _pool_reference(xn, kind, k, s, pad), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ci,co,hw,k,s,upper", [(3, 16, 30, 7, 2, None), (3, 24, 17, 3, 1, None),
                                                (5, 8, 12, 3, 2, None), (3, 64, 32, 7, 2, None),
                                                (3, 32, 56, 7, 2, None), (3, 32, 48, 3, 2, 6.0),
                                                (3, 16, 65, 3, 2, None), (3, 16, 77, 3, 2, None)])
@pytest.mark.parametrize("tname", ["host", "avx2"])
def test_fp32_conv_default_schedule_matches_numpy(ci, co, hw, k, s, upper, tname):
    """The kept first layer (conv + bias + ReLU, or ReLU6 with ``upper``: MobileNetV2's stem) with
    FP32ConvCPU's schedule, against numpy; on AVX-512 a stem-like conv (16k output channels) takes
    the outer-product tile (the weights copied channels-innermost: a ``w_global`` block; 33 output
    columns: 11 pixels a tile, 39: 3 pixels x 3 rows), AVX2 keeps the row-vectorized one."""
    from tvm import te, topi

    from dsconv_tvm.backends.cpu.rules import schedule_fp32_conv

    target = RUNNABLE[tname]

    pad = k // 2
    x = te.placeholder((1, ci, hw, hw), "float32", "x")
    wt = te.placeholder((co, ci, k, k), "float32", "w")
    b = te.placeholder((1, co, 1, 1), "float32", "b")
    y = topi.nn.relu(topi.add(topi.nn.conv2d_nchw(x, wt, s, pad, 1), b))
    if upper is not None:
        y = topi.minimum(y, tvm.tirx.const(upper, "float32"))
    sch = schedule_fp32_conv(te.create_prim_func([x, wt, b, y]), target)
    assert sch is not None
    names = [sch.get(blk).name_hint for blk in sch.get_child_blocks(sch.get_sblock("root"))]
    assert ("w_global" in names) == (tname == "host" and HOST_ISA in ("avx512", "vnni") and co % 16 == 0)
    lib = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(1)
    xn, wn, bn = (rng.standard_normal(t).astype(np.float32) for t in ((1, ci, hw, hw), (co, ci, k, k), (1, co, 1, 1)))
    out = tvm.runtime.tensor(np.zeros([int(d) for d in y.shape], np.float32))
    lib(*(tvm.runtime.tensor(a) for a in (xn, wn, bn)), out)
    xp = np.pad(xn, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (hw + 2 * pad - k) // s + 1
    ref = np.zeros((1, co, oh, oh), np.float64)
    for i in range(k):
        for j in range(k):
            ref += np.einsum("oc,nchw->nohw", wn[:, :, i, j], xp[:, :, i:i + s * oh:s, j:j + s * oh:s])
    np.testing.assert_allclose(out.numpy(), np.clip(ref + bn, 0, upper), rtol=1e-4, atol=1e-4)


def _depthwise(c, hw, k, s, pad):
    """A depthwise conv (groups = channels) + bias + clip(0, 6), as MobileNetV2's ONNX legalizes."""
    from tvm import te, topi

    x = te.placeholder((1, c, hw, hw), "float32", "x")
    wt = te.placeholder((c, 1, k, k), "float32", "w")
    b = te.placeholder((1, c, 1, 1), "float32", "b")
    y = topi.nn.conv(x, wt, s, pad, 1, c, "NCHW", "OIHW", "float32")
    y = topi.minimum(topi.maximum(topi.add(y, b), tvm.tirx.const(0.0, "float32")), tvm.tirx.const(6.0, "float32"))
    return te.create_prim_func([x, wt, b, y]), [int(d) for d in y.shape]


@pytest.mark.parametrize("c,hw,k,s", [(3, 112, 3, 1), (2, 112, 3, 2), (3, 56, 3, 1), (3, 56, 3, 2), (5, 28, 3, 1),
                                      (5, 28, 3, 2), (4, 14, 3, 1), (4, 14, 3, 2), (6, 7, 3, 1), (6, 7, 3, 2),
                                      (3, 30, 5, 1), (3, 23, 3, 2)])
@pytest.mark.parametrize("tname", ["host", "avx2"])
def test_depthwise_conv_default_schedule_matches_numpy(c, hw, k, s, tname):
    """MobileNetV2's depthwise convs (3x3, stride 1 and 2, bias + clip) with FP32ConvCPU's
    depthwise schedule, against numpy: rows of whole vectors and a partial one (56 = 3 x 16 + 8),
    rows under a vector (14, 7), a 5x5 kernel, and an odd width at stride 2 (no even/odd split)."""
    from dsconv_tvm.backends.cpu.rules import schedule_fp32_conv

    target = RUNNABLE[tname]
    pad = k // 2
    func, oshape = _depthwise(c, hw, k, s, pad)
    sch = schedule_fp32_conv(func, target)
    assert sch is not None
    names = [sch.get(blk).name_hint for blk in sch.get_child_blocks(sch.get_sblock("root"))]
    assert any(n.startswith("pad_temp_") for n in names)   # the depthwise schedule: the padding in parts
    padded = sch.mod["main"].body.block.alloc_buffers[0]
    assert len(padded.shape) == (5 if s == 2 and hw % 2 == 0 else 4)     # stride 2: even / odd halves
    lib = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(2)
    xn, wn, bn = (rng.standard_normal(t).astype(np.float32) for t in ((1, c, hw, hw), (c, 1, k, k), (1, c, 1, 1)))
    out = tvm.runtime.tensor(np.zeros(oshape, np.float32))
    lib(*(tvm.runtime.tensor(a) for a in (xn, wn, bn)), out)
    xp = np.pad(xn.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = oshape[2]
    ref = sum(wn[None, :, 0, i, j, None, None] * xp[:, :, i:i + s * oh:s, j:j + s * oh:s]
              for i in range(k) for j in range(k))
    np.testing.assert_allclose(out.numpy(), np.clip(ref + bn, 0, 6), rtol=1e-5, atol=1e-5)


def test_fully_connected_layers_read_the_weights_by_block():
    """A 1x1 map (a fully connected layer): blocks outside the channel tiles, chunks of output
    channels in parallel (the matrix-vector schedule of schedule._schedule_dense)."""
    layer = DSConvLayer((1, 1024, 1, 1), 4096, (1, 1), ConvGeometry(), 4, 64, 8, True, "float32", True, "relu")
    mod = schedule_dsconv_cpu(dsconv_primfunc(layer).with_attr("global_symbol", "main"), HOST).mod
    text = mod.script()
    assert "for rg, ri, rj, o_1 in T.grid(16, 1, 1, 32):" in text, text        # 1024 / 32 tiles per block
    assert re.search(r"in T\.parallel\(4\)", text)                             # 4 chunks of 1024
    layer_1000 = dataclasses.replace(layer, in_shape=(1, 256, 1, 1), out_channels=1000)
    _run_layer(layer_1000, seed=3)


@pytest.mark.parametrize("path", ["host", "avx2"])
@pytest.mark.parametrize("in_shape, co, k, s, p, residual", [
    ((1, 68, 14, 14), 68, (1, 1), (1, 1), (0, 0, 0, 0), False),     # a ShuffleNet group (g = 8)
    ((1, 34, 9, 9), 34, (3, 3), (2, 2), (1, 1, 1, 1), True),
    ((1, 6, 8, 8), 6, (1, 1), (1, 1), (0, 0, 0, 0), False)])
def test_padded_output_channels_match_reference(path, in_shape, co, k, s, p, residual):
    """Output channels the vector lanes do not divide: the backend pads them (``out_slots``, zero
    weights) so the dot-product schedule applies; the real channels match numpy, and only layers
    that need it are padded."""
    from dsconv_tvm.backends.cpu.backend import CPUBackend

    target = RUNNABLE[path]
    layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p), 4, 64, 8, True, "float32", True, "relu",
                        activation_dtype(target), residual)
    padded = CPUBackend(target).computed_layer(layer)
    lanes = 16 if path == "host" and HOST_ISA in ("avx512", "vnni") else 8
    assert padded.out_slots == -(-co // lanes) * lanes and padded.computed_channels % lanes == 0
    assert dot_intrin(dsconv_primfunc(padded), target) is not None
    _run_layer(padded, seed=co, target=target)
    same = DSConvLayer(in_shape, 2 * lanes, k, ConvGeometry(s, p), 4, 64, 8, True, "float32", True, "relu",
                       activation_dtype(target))
    assert CPUBackend(target).computed_layer(same) is same
