"""Fused BFP between DSConv layers: a producer whose epilogue writes its consumers' BFP input
(mantissas, exponents) and a consumer that reads it, against the numpy reference.

The integers must be exactly the numpy ones: the producer's exponents and stored mantissas are
those of ``bfp_quantize`` applied to the producer's own float output, and a consumer given BFP
input computes bit for bit what the same layer computes from the float input."""

import dataclasses

import numpy as np
import pytest
import tvm

from dsconv_tvm.backends.cpu.kernels import dsconv_primfunc
from dsconv_tvm.backends.cpu.layout import bfp_format, bfp_input_arrays, layer_params
from dsconv_tvm.backends.cpu.schedule import schedule_dsconv_cpu
from dsconv_tvm.remote.tracker import board_session
from dsconv_tvm.scheme.geometry import ConvGeometry
from dsconv_tvm.scheme.layer import BFPFormat, DSConvLayer
from dsconv_tvm.scheme.reference import activate, dsconv2d
from dsconv_tvm.scheme.weights import quantize_weight
from dsconv_tvm.target import get_target

HOST = get_target("x86").tvm_target()
AVX2 = get_target("x86-avx2").tvm_target()

# producer: in_shape, CO, kernel, strides, padding, bits, block, unsigned input, residual, act;
# its consumers' format: block, mantissa, unsigned
PRODUCERS = [
    ((1, 64, 14, 14), 64, (1, 1), (1, 1), (0, 0, 0, 0), 4, 64, True, False, "relu", (64, 8, True)),
    ((1, 32, 9, 9), 64, (3, 3), (1, 1), (1, 1, 1, 1), 4, 32, False, True, "relu", (32, 8, True)),
    ((1, 64, 8, 8), 128, (1, 1), (1, 1), (0, 0, 0, 0), 4, 64, True, True, "none", (64, 8, False)),  # signed
    ((1, 32, 7, 7), 48, (3, 3), (2, 2), (1, 1, 1, 1), 4, 32, True, False, "relu", (16, 7, True)),
    ((1, 32, 6, 6), 40, (1, 1), (1, 1), (0, 0, 0, 0), 4, 32, True, False, "relu", (32, 8, True)),   # 40 % 32
    ((1, 32, 6, 6), 32, (3, 3), (1, 1), (1, 1, 1, 1), 8, 32, True, False, "relu", (32, 8, False)),  # int8 weights
    ((1, 16, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), 4, 16, True, False, "none", (4, 6, False)),   # 4 < 8 slots
    ((1, 32, 6, 6), 32, (3, 3), (1, 1), (1, 1, 1, 1), 2, 32, True, True, "relu", (32, 8, True)),    # crumbs
    ((1, 16, 6, 6), 24, (1, 1), (1, 1), (0, 0, 0, 0), 2, 16, False, False, "relu6", (8, 8, True)),  # 8 < 16 slots
]


def producer_layer(case, act_dtype="uint8", fp32_output=True):
    """The producer of ``case``; its consumers have its weight bits (their format's slots)."""
    in_shape, co, k, s, p, bits, block, uns, res, act, fmt = case
    layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p), bits, block, 8, uns, "float32", True, act, act_dtype,
                        res)
    consumer = DSConvLayer(layer.out_shape, 16, (1, 1), ConvGeometry(), bits, *fmt, act_dtype=act_dtype)
    return dataclasses.replace(layer, bfp_output=bfp_format(consumer), fp32_output=fp32_output)


def test_bfp_format_slots():
    """The BFP format a consumer reads: its block, mantissa bits, signedness and slots per block
    (x86 and ARM alike: no mantissa sums, x86's offset-binary weight fields are made signed bytes
    in the unpack)."""
    def fmt(bits, act):
        return bfp_format(DSConvLayer((1, 32, 4, 4), 16, (1, 1), ConvGeometry(), bits, 32, 8, True, act_dtype=act))

    assert fmt(4, "uint8") == fmt(4, "int8") == BFPFormat(32, 8, True, slots=32)
    assert fmt(8, "uint8") == BFPFormat(32, 8, True, slots=32)
    # 2-bit weights (crumbs) are unpacked in 16-channel steps: a block of 8 takes 16 slots
    small = DSConvLayer((1, 24, 4, 4), 16, (1, 1), ConvGeometry(), 2, 8, 8, True)
    assert bfp_format(small) == BFPFormat(8, 8, True, slots=16)
    assert bfp_format(dataclasses.replace(small, bits=4)).slots == 8


def consumer_view(layer: DSConvLayer) -> DSConvLayer:
    """A 1x1 consumer of the producer's output in its BFP format (what bfp_input_arrays needs): one
    whose weight width gives that format's slots."""
    fmt = layer.bfp_output
    for bits in (2, 4, 8):
        view = DSConvLayer(layer.out_shape, 16, (1, 1), ConvGeometry(), bits, fmt.block, fmt.mantissa, fmt.unsigned,
                           act_dtype=layer.act_dtype)
        if bfp_format(view) == fmt:
            return view
    raise AssertionError(f"no consumer reads {fmt}")


def layer_args(layer: DSConvLayer, seed: int, x=None):
    rng = np.random.default_rng(seed)
    if x is None:
        x = rng.standard_normal(layer.in_shape).astype(np.float32) * 3
        if layer.unsigned:
            x = np.maximum(x, 0)
    wf = rng.standard_normal((layer.out_channels, layer.in_shape[1], *layer.kernel)).astype(np.float32)
    qw = quantize_weight(wf, layer.bits, layer.block, "l2", layer.scale_dtype)
    bias = rng.standard_normal(layer.out_channels).astype(np.float32)
    consts = layer_params(layer, qw.q, qw.xi, bias)
    res = rng.standard_normal(layer.out_shape).astype(np.float32) if layer.has_residual else None
    return x, qw, bias, consts, res


def output_shapes(layer: DSConvLayer):
    n, co, oh, ow = layer.out_shape
    outs = [((n, oh, ow, co) if layer.fp32_nhwc else layer.out_shape, "float32")] if layer.fp32_output else []
    if layer.bfp_output is None:
        return outs
    arrays = bfp_input_arrays(np.zeros(layer.out_shape, np.float32), consumer_view(layer))
    return outs + [(a.shape, str(a.dtype)) for a in arrays]


def compiled(layer: DSConvLayer, target):
    func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
    return tvm.compile(schedule_dsconv_cpu(func, target).mod, target)


def call(fn, layer: DSConvLayer, inputs, dev=None):
    shapes = output_shapes(layer)
    outs = [tvm.runtime.tensor(np.zeros(s, d), dev) for s, d in shapes]
    fn(*[tvm.runtime.tensor(a, dev) for a in inputs], *outs)
    return [o.numpy() for o in outs]


def run_local(layer: DSConvLayer, inputs, target=HOST):
    return call(compiled(layer, target), layer, inputs)


def reference_output(layer, x, qw, bias, res):
    ref = dsconv2d(x, qw.q, qw.xi, layer.block, layer.mantissa, layer.geom, bias, layer.unsigned)
    if res is not None:
        ref = ref + res
    return activate(ref, layer.activation)


def check_producer(layer, outs, x, qw, bias, res, bfp_only=None):
    """The float output against the reference; the BFP outputs exactly the numpy quantization of
    that float output (and equal to ``bfp_only``, the outputs of the variant without float output)."""
    y = outs[0]
    ref = reference_output(layer, x, qw, bias, res)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * float(np.abs(ref).max()) + 1e-6)
    expect = bfp_input_arrays(y, consumer_view(layer))
    assert len(outs) == 1 + len(expect)
    for got, want, what in zip(outs[1:], expect, ("mantissas", "exponents")):
        assert got.dtype == want.dtype, what
        np.testing.assert_array_equal(got, want, err_msg=what)
    if bfp_only is not None:
        for got, want in zip(bfp_only, outs[1:]):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize("case", PRODUCERS, ids=lambda c: f"{c[0]}-co{c[1]}-k{c[2]}-b{c[5]}-fmt{c[10]}")
def test_producer_writes_the_numpy_bfp_of_its_output(case, target):
    layer = producer_layer(case)
    x, qw, bias, consts, res = layer_args(layer, seed=sum(case[0]) + case[1])
    inputs = [x, *consts] + ([res] if res is not None else [])
    outs = run_local(layer, inputs, target)
    bfp_only = run_local(dataclasses.replace(layer, fp32_output=False), inputs, target)
    check_producer(layer, outs, x, qw, bias, res, bfp_only)


CONSUMERS = [
    # in_shape, CO, kernel, strides, padding, bits, block, unsigned, residual
    ((1, 64, 14, 14), 64, (3, 3), (1, 1), (1, 1, 1, 1), 4, 64, True, False),
    ((1, 128, 7, 7), 32, (1, 1), (1, 1), (0, 0, 0, 0), 4, 64, True, True),
    ((1, 64, 9, 9), 32, (1, 1), (2, 2), (0, 0, 0, 0), 4, 32, False, False),   # stride 2, signed
    ((1, 40, 6, 6), 16, (3, 3), (2, 2), (0, 1, 2, 1), 4, 32, True, False),    # partial block, odd padding
    ((1, 32, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), 8, 32, False, False),   # int8 weights
    ((1, 32, 8, 8), 16, (3, 3), (1, 1), (1, 1, 1, 1), 2, 32, True, False),    # crumbs
    ((1, 24, 6, 6), 16, (3, 3), (2, 2), (0, 1, 2, 1), 2, 8, False, True),     # crumbs, block 8 in 16 slots
]


def consumer_case(case, activation="relu", act_dtype="uint8"):
    """The layer of a :data:`CONSUMERS` case and its arguments: (layer, x, qw, bias, residual, the
    arguments after the input)."""
    in_shape, co, k, s, p, bits, block, uns, res = case
    layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p), bits, block, 8, uns, "float32", True, activation,
                        act_dtype, res)
    x, qw, bias, consts, resid = layer_args(layer, seed=sum(in_shape) + co)
    return layer, x, qw, bias, resid, [*consts] + ([resid] if resid is not None else [])


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize("case", CONSUMERS, ids=lambda c: f"{c[0]}-co{c[1]}-k{c[2]}-s{c[3]}-b{c[5]}")
def test_consumer_of_bfp_input_equals_the_float_input_kernel(case, target):
    layer, x, qw, bias, resid, tail = consumer_case(case)
    fused = dataclasses.replace(layer, bfp_input=True)
    (y_float,) = run_local(layer, [x, *tail], target)
    (y_bfp,) = run_local(fused, [*bfp_input_arrays(x, layer), *tail], target)
    np.testing.assert_array_equal(y_bfp, y_float)           # the same integers, the same float order
    ref = reference_output(layer, x, qw, bias, resid)
    np.testing.assert_allclose(y_bfp, ref, rtol=0, atol=2e-5 * float(np.abs(ref).max()) + 1e-6)


def on_emulated_board(emulated_board, target_name, tmp_path, checks) -> None:
    """``checks(load, dev, target)`` on the emulated Raspberry Pi ``target_name``: ``load(lib)``
    exports a compiled library, uploads it and returns its ``main`` there.  Every remote object
    lives in the ``checks`` call only: gone when it returns, before the session ends."""
    spec = get_target(target_name)
    count = iter(range(100))
    with board_session(emulated_board.tracker, emulated_board.key, timeout=120, session_timeout=600) as remote:
        def load(lib):
            path = tmp_path / f"lib{next(count)}.so"
            spec.export_library(lib, str(path))
            remote.upload(str(path))
            return remote.load_module(path.name)["main"]

        checks(load, remote.cpu(), spec.tvm_target())


@pytest.mark.parametrize("target_name", ["rpi4", "rpi5"])
def test_fused_bfp_on_emulated_arm_board(emulated_board, tmp_path, target_name):
    """The same checks on the emulated Raspberry Pi (int8 mantissa storage, NEON / sdot kernels)."""
    on_emulated_board(emulated_board, target_name, tmp_path, _board_checks)


def _board_checks(load, dev, target):
    def run(layer, inputs):
        return call(load(compiled(layer, target)), layer, inputs, dev)

    for case in (PRODUCERS[0], PRODUCERS[1], PRODUCERS[2], PRODUCERS[5], PRODUCERS[7], PRODUCERS[8]):
        layer = producer_layer(case, "int8")
        x, qw, bias, consts, res = layer_args(layer, seed=sum(case[0]) + case[1])
        inputs = [x, *consts] + ([res] if res is not None else [])
        bfp_only = run(dataclasses.replace(layer, fp32_output=False), inputs)
        check_producer(layer, run(layer, inputs), x, qw, bias, res, bfp_only)
    layer = producer_layer(PRODUCERS[2], "int8")                       # the channel-innermost residual stream
    x, qw, bias, consts, res = layer_args(layer, seed=7)
    nchw = run(layer, [x, *consts, res])
    nhwc = run(dataclasses.replace(layer, residual_nhwc=True, fp32_nhwc=True),
               [x, *consts, np.ascontiguousarray(res.transpose(0, 2, 3, 1))])
    np.testing.assert_array_equal(nhwc[0], nchw[0].transpose(0, 2, 3, 1))
    for a, b in zip(nhwc[1:], nchw[1:]):
        np.testing.assert_array_equal(a, b)
    for in_shape, co, k, s, p, bits, block, uns, res in CONSUMERS[:4] + CONSUMERS[5:]:
        layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p), bits, block, 8, uns, "float32", True, "relu",
                            "int8", res)
        x, qw, bias, consts, resid = layer_args(layer, seed=sum(in_shape) + co)
        tail = [*consts] + ([resid] if resid is not None else [])
        (y_float,) = run(layer, [x, *tail])
        (y_bfp,) = run(dataclasses.replace(layer, bfp_input=True), [*bfp_input_arrays(x, layer), *tail])
        np.testing.assert_array_equal(y_bfp, y_float)


def test_metaschedule_space_of_fused_layers_builds_and_matches():
    """The tuning template (register tile sampled) on a producer and a consumer: a sampled
    schedule builds and gives the same integers."""
    from tvm import s_tir

    case = PRODUCERS[0]
    layer = dataclasses.replace(producer_layer(case), fp32_output=False, bfp_input=True)
    base = dataclasses.replace(layer, bfp_input=False, bfp_output=None)
    x, qw, bias, consts, res = layer_args(base, seed=3)
    func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
    sch = schedule_dsconv_cpu(func, HOST, sch=s_tir.Schedule(func, seed=1), sample=True)
    outs = call(tvm.compile(sch.mod, HOST), layer, [*bfp_input_arrays(x, base), *consts])
    np.testing.assert_array_equal(outs[0], run_local(layer, [*bfp_input_arrays(x, base), *consts])[0])


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
def test_channel_innermost_residual_stream(target):
    """A producer that reads its residual and writes its float output channel-innermost ([N, H, W,
    C], the bottleneck outputs of a ResNet chain) computes what the NCHW one does."""
    layer = producer_layer(PRODUCERS[2])                                  # 1x1 with residual
    x, qw, bias, consts, res = layer_args(layer, seed=7)
    nchw = run_local(layer, [x, *consts, res], target)
    nhwc = dataclasses.replace(layer, residual_nhwc=True, fp32_nhwc=True)
    got = run_local(nhwc, [x, *consts, np.ascontiguousarray(res.transpose(0, 2, 3, 1))], target)
    np.testing.assert_array_equal(got[0], nchw[0].transpose(0, 2, 3, 1))
    for a, b in zip(got[1:], nchw[1:]):
        np.testing.assert_array_equal(a, b)
    check_producer(layer, nchw, x, qw, bias, res)
    # a layer whose float output only residual adds read (a downsample conv): NHWC, no BFP
    plain = dataclasses.replace(layer, bfp_output=None, has_residual=False)
    (y,) = run_local(plain, [x, *consts], target)
    (y_nhwc,) = run_local(dataclasses.replace(plain, fp32_nhwc=True), [x, *consts], target)
    np.testing.assert_array_equal(y_nhwc, y.transpose(0, 2, 3, 1))
