"""The kernels of an inverted residual block run channel-innermost (rewrite/nhwc.py): the depthwise
fp32 conv on [N, H, W, C] against numpy, and a DSConv layer reading its float input [N, H, W, C]
(``input_nhwc``) against the same layer reading it NCHW: the same integers, bit for bit."""

import dataclasses

import numpy as np
import pytest
import tvm

from dsconv_tvm.backends.cpu.depthwise import depthwise_nhwc_params, depthwise_nhwc_primfunc, \
    schedule_depthwise_nhwc
from dsconv_tvm.backends.cpu.layout import bfp_input_arrays
from dsconv_tvm.scheme.geometry import ConvGeometry
from dsconv_tvm.scheme.layer import ACTIVATIONS
from dsconv_tvm.target import get_target

from test_fused_bfp import AVX2, HOST, PRODUCERS, call, compiled, consumer_case, consumer_view, layer_args, \
    on_emulated_board, producer_layer, reference_output, run_local  # noqa: E402

# in_shape (N, C, H, W), strides, padding (top, left, bottom, right), dilation, bias, activation
DEPTHWISE = [
    ((1, 32, 12, 12), (1, 1), (1, 1, 1, 1), (1, 1), True, "relu6"),
    ((1, 48, 13, 14), (2, 2), (1, 1, 1, 1), (1, 1), True, "relu6"),
    ((1, 16, 12, 11), (2, 2), (0, 0, 1, 1), (1, 1), False, "none"),          # TF-style padding
    ((1, 24, 9, 9), (1, 1), (2, 2, 2, 2), (2, 2), True, "relu"),              # dilated, 8 lanes
    ((2, 20, 7, 7), (1, 1), (1, 1, 1, 1), (1, 1), True, "relu6"),             # 4 lanes, batch 2
]


def numpy_depthwise(x, w, bias, geom, activation):
    """x [N, C, H, W], w [C, 1, KH, KW]: the float32 depthwise conv, + bias, clamped."""
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = geom.strides, geom.padding, geom.dilation
    n, c, h, wd = x.shape
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = geom.out_size(h, wd, kh, kw)
    out = np.zeros((n, c, oh, ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            out += xp[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw] * w[None, :, 0, i, j, None, None]
    if bias is not None:
        out = out + bias[None, :, None, None]
    lo, hi = ACTIVATIONS[activation]
    return np.clip(out, lo, hi).astype(np.float32)


def depthwise_case(case, seed):
    in_shape, s, p, d, has_bias, act = case
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(in_shape) * 3).astype(np.float32)
    w = rng.standard_normal((in_shape[1], 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(in_shape[1]).astype(np.float32) if has_bias else None
    geom = ConvGeometry(s, p, d)
    func = depthwise_nhwc_primfunc(in_shape, (3, 3), geom, has_bias, act).with_attr("global_symbol", "main")
    return x, w, bias, geom, func


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: f"{c[0]}-s{c[1][0]}-p{c[2]}-d{c[3][0]}-{c[5]}")
def test_depthwise_nhwc_matches_numpy(case, target):
    check_depthwise(case, lambda func: tvm.compile(schedule_depthwise_nhwc(func, target).mod, target)["main"])


def check_depthwise(case, build, dev=None):
    """The depthwise kernel of ``case`` built by ``build`` (PrimFunc -> callable) against numpy."""
    x, w, bias, geom, func = depthwise_case(case, seed=sum(case[0]))
    ref = numpy_depthwise(x, w, bias, geom, case[5])
    out = tvm.runtime.tensor(np.zeros(ref.transpose(0, 2, 3, 1).shape, np.float32), dev)
    build(func)(*[tvm.runtime.tensor(a, dev) for a in [np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
                                                       *depthwise_nhwc_params(w, bias)]], out)
    # float32, the nine taps summed in another order
    np.testing.assert_allclose(out.numpy().transpose(0, 3, 1, 2), ref, rtol=0,
                               atol=2e-6 * 9 * float(np.abs(x).max() * np.abs(w).max()) + 1e-6)


@pytest.mark.parametrize("target_name", ["rpi4", "rpi5"])
def test_depthwise_nhwc_builds_for_aarch64(target_name):
    target = get_target(target_name).tvm_target()
    for case in (DEPTHWISE[1], DEPTHWISE[4]):
        func = depthwise_case(case, seed=0)[-1]
        assert tvm.compile(schedule_depthwise_nhwc(func, target).mod, target) is not None


# in_shape, CO, kernel, strides, padding, bits, block, unsigned, residual
CONSUMERS = [
    ((1, 128, 7, 7), 32, (1, 1), (1, 1), (0, 0, 0, 0), 4, 64, True, True),      # MobileNetV2's projection
    ((1, 96, 14, 14), 24, (1, 1), (1, 1), (0, 0, 0, 0), 4, 32, True, False),
    ((1, 64, 9, 9), 32, (1, 1), (2, 2), (0, 0, 0, 0), 4, 32, False, False),     # stride 2, signed
    ((1, 40, 6, 6), 16, (3, 3), (2, 2), (0, 1, 2, 1), 4, 32, True, False),      # partial block, padded
    ((1, 32, 6, 6), 16, (3, 3), (1, 1), (1, 1, 1, 1), 8, 32, False, False),     # int8 weights
    ((1, 24, 6, 6), 16, (1, 1), (1, 1), (0, 0, 0, 0), 2, 8, True, True),        # crumbs: block 8 in 16 slots
    ((1, 12, 5, 5), 16, (1, 1), (1, 1), (0, 0, 0, 0), 4, 4, True, False),       # blocks under 8 lanes
]


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
@pytest.mark.parametrize("case", CONSUMERS, ids=lambda c: f"{c[0]}-co{c[1]}-k{c[2]}-s{c[3]}-b{c[5]}-B{c[6]}")
def test_channel_innermost_input_equals_the_nchw_kernel(case, target):
    layer, x, qw, bias, resid, tail = consumer_case(case, "relu6")
    (y_nchw,) = run_local(layer, [x, *tail], target)
    (y_nhwc,) = run_local(dataclasses.replace(layer, input_nhwc=True),
                          [np.ascontiguousarray(x.transpose(0, 2, 3, 1)), *tail], target)
    np.testing.assert_array_equal(y_nhwc, y_nchw)
    ref = reference_output(layer, x, qw, bias, resid)
    np.testing.assert_allclose(y_nhwc, ref, rtol=0, atol=2e-5 * float(np.abs(ref).max()) + 1e-6)


@pytest.mark.parametrize("target", [HOST, AVX2], ids=["host", "avx2"])
def test_channel_innermost_input_with_bfp_output(target):
    """A layer reading NHWC float input that also writes its consumers' BFP (fused) output."""
    layer = producer_layer(PRODUCERS[0])
    x, _, _, consts, _ = layer_args(layer, seed=11)
    nchw = run_local(layer, [x, *consts], target)
    nhwc = run_local(dataclasses.replace(layer, input_nhwc=True),
                     [np.ascontiguousarray(x.transpose(0, 2, 3, 1)), *consts], target)
    for a, b in zip(nhwc, nchw):
        np.testing.assert_array_equal(a, b)
    for got, want in zip(nhwc[1:], bfp_input_arrays(nhwc[0], consumer_view(layer))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target_name", ["rpi4", "rpi5"])
def test_nhwc_kernels_on_emulated_arm_board(emulated_board, tmp_path, target_name):
    """The depthwise kernel against numpy, and NHWC-input layers (int8 mantissas, NEON / sdot)
    equal to the NCHW ones, on the emulated Raspberry Pi."""
    on_emulated_board(emulated_board, target_name, tmp_path, _board_checks)


def _board_checks(load, dev, target):
    for case in (DEPTHWISE[0], DEPTHWISE[1], DEPTHWISE[4]):
        check_depthwise(case, lambda func: load(tvm.compile(schedule_depthwise_nhwc(func, target).mod, target)),
                        dev)
    for case in (CONSUMERS[0], CONSUMERS[1], CONSUMERS[3], CONSUMERS[5]):
        layer, x, _, _, _, tail = consumer_case(case, "relu6", "int8")
        nhwc = dataclasses.replace(layer, input_nhwc=True)
        (y_nchw,) = call(load(compiled(layer, target)), layer, [x, *tail], dev)
        (y_nhwc,) = call(load(compiled(nhwc, target)), nhwc, [np.ascontiguousarray(x.transpose(0, 2, 3, 1)), *tail],
                         dev)
        np.testing.assert_array_equal(y_nhwc, y_nchw)
