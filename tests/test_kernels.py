"""The DSConv TensorIR kernel, scheduled and compiled, against the numpy reference."""

import re

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from dsconv_tvm.kernels import DSConvLayer, dsconv_primfunc, pack_scales, pack_weights, unpack_weights
from dsconv_tvm.reference import ConvGeometry, dsconv2d
from dsconv_tvm.schedule import is_dsconv, schedule_dsconv_cpu
from dsconv_tvm.targets import get_target
from dsconv_tvm.weights import quantize_weight

HOST = get_target("x86").tvm_target()

# Tolerance: the kernel and the reference compute the same integers (block dot products, BFP
# mantissas and exponents are exact), and every float term acc * xi * 2^(e-f) is the same float32
# product; only the order of the float32 sum over blocks and taps differs.  So the difference is
# a few float32 roundings of the partial sums: bounded by ~1e-6 x (number of terms) x max term.
RTOL = 2e-6


def _run_layer(layer: DSConvLayer, seed: int, scheduled: bool = True, weights="random"):
    rng = np.random.default_rng(seed)
    n, c, h, w = layer.in_shape
    co = layer.out_channels
    kh, kw = layer.kernel
    x = rng.standard_normal(layer.in_shape).astype(np.float32) * 3
    if layer.unsigned:
        x = np.maximum(x, 0)
    wf = rng.standard_normal((co, c, kh, kw)).astype(np.float32)
    qw = quantize_weight(wf, layer.bits, layer.block, "l2", layer.scale_dtype)
    bias = rng.standard_normal(co).astype(np.float32) if layer.has_bias else None
    func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
    mod = schedule_dsconv_cpu(func, HOST).mod if scheduled else func
    ex = tvm.compile(mod, HOST)
    args = [x, pack_weights(qw.q, layer.bits, layer.block), pack_scales(qw.xi, layer.scale_dtype)]
    if bias is not None:
        args.append(bias)
    out = tvm.runtime.tensor(np.zeros(layer.out_shape, np.float32))
    ex(*[tvm.runtime.tensor(a) for a in args], out)
    ref = dsconv2d(x, qw.q, qw.xi, layer.block, layer.mantissa, layer.geom, bias, layer.unsigned)
    if layer.activation == "relu":
        ref = np.maximum(ref, 0)
    # scale of the float sum: the sum of |terms| bounds its rounding error
    absref = dsconv2d(np.abs(x), np.abs(qw.q.astype(np.int16)), np.abs(qw.xi), layer.block, layer.mantissa, layer.geom,
                      None, layer.unsigned)
    terms = layer.groups * kh * kw
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=float(RTOL * terms * absref.max() + 1e-30))
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
    ((1, 33, 6, 6), 17, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4, 64, 8, True, False, "none"),  # B > C
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-co{c[1]}-k{c[2]}-s{c[3]}-b{c[6]}B{c[7]}m{c[8]}")
def test_scheduled_kernel_matches_reference(case):
    in_shape, co, k, s, p, d, bits, block, m, uns, bias, act = case
    layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p, d), bits, block, m, uns, "float32", bias, act)
    _run_layer(layer, seed=hash(case) % 1000)


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


def test_unscheduled_and_scheduled_agree_bitwise_on_integers():
    """One block and one tap: a single float term per output, so results must be identical."""
    layer = DSConvLayer((1, 16, 6, 6), 8, (1, 1), ConvGeometry(), 4, 16, 8, False, "float32", False, "none")
    a, ref = _run_layer(layer, 3, scheduled=True)
    b, _ = _run_layer(layer, 3, scheduled=False)
    assert np.array_equal(a, b)


@settings(max_examples=60, deadline=None)
@given(co=st.integers(1, 9), ci=st.integers(1, 40), k=st.integers(1, 3), bits=st.integers(2, 8),
       block=st.integers(1, 33), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_roundtrip(co, ci, k, bits, block, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (co, ci, k, k)).astype(np.int8)
    wp = pack_weights(q, bits, block)
    g = -(-ci // block)
    if bits <= 4:
        assert wp.dtype == np.uint8 and wp.shape == (g, k, k, (block + block % 2) // 2, co)
    else:
        assert wp.dtype == np.int8 and wp.shape == (g, k, k, block, co)
    assert np.array_equal(unpack_weights(wp, bits, block, ci), q)


def test_packed_bytes_are_half_a_byte_per_weight():
    q = np.zeros((64, 64, 3, 3), np.int8)
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


LAYER_64 = DSConvLayer((1, 64, 14, 14), 64, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)), 4, 32, 8, True,
                       "float32", True, "relu")


def test_x86_assembly_has_vector_integer_multiply_adds():
    asm = _asm("x86-avx2", LAYER_64)
    # int32 lanes in ymm registers: widening multiply-add (vpmaddwd) or multiply (vpmulld) + add
    mults = len(re.findall(r"\bvpmaddwd\s+%ymm|\bvpmulld\s+%ymm", asm))
    adds = len(re.findall(r"\bvpaddd\s+%ymm", asm))
    unpack = len(re.findall(r"\bvps(ra|ll)[dw]\s+\$|\bvpmov[sz]xbd\s", asm))
    assert mults >= 8 and adds >= 8 and unpack >= 1, (mults, adds, unpack)


@pytest.mark.parametrize("target", ["arm", "rpi4", "rpi5"])
def test_aarch64_assembly_has_neon_integer_multiply_adds(target):
    asm = _asm(target, LAYER_64)
    # NEON integer multiply-accumulate on 32-bit lanes: mla/smlal/smlal2 (widening), or mul+add
    mla = len(re.findall(r"\b(s?mla[l2]*|smull2?|sadalp)\s+v\d+\.(4s|8h)", asm))
    assert mla >= 8, mla


def test_armv7_compiles_with_neon():
    asm = _asm("rpi-armv7", DSConvLayer((1, 32, 8, 8), 16, (3, 3), ConvGeometry((1, 1), (1, 1, 1, 1)),
                                        4, 32, 8, True))
    assert re.search(r"\bvml[a]\.i32\s+q\d+|\bvmlal\.s16\s+q\d+|\bvmul\.i32\s+q\d+", asm)
