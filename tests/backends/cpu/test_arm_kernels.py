"""The ARM dot-product kernels (Cortex-A72 smull/addp/sadalp, Cortex-A76 by-element sdot) and the
AArch64 fp32 conv schedule run on the emulated Raspberry Pi (qemu-aarch64, TVM's aarch64 runtime)
and compared with the numpy DSConv reference / numpy."""

import numpy as np
import pytest
import tvm

from dsconv_tvm.scheme.layer import DSConvLayer
from dsconv_tvm.backends.cpu.kernels import dsconv_primfunc
from dsconv_tvm.backends.cpu.layout import layer_params
from dsconv_tvm.scheme.geometry import ConvGeometry
from dsconv_tvm.scheme.reference import dsconv2d
from dsconv_tvm.backends.cpu.schedule import dot_intrin, schedule_dsconv_cpu
from dsconv_tvm.remote.tracker import board_session
from dsconv_tvm.target import get_target
from dsconv_tvm.scheme.weights import quantize_weight

CASES = [
    # in_shape, CO, kernel, strides, padding, bits, block, unsigned, residual
    ((1, 32, 8, 8), 16, (3, 3), (1, 1), (1, 1, 1, 1), 4, 32, True, False),
    ((1, 48, 7, 7), 8, (3, 3), (2, 2), (1, 1, 1, 1), 4, 16, False, False),
    ((1, 24, 5, 5), 12, (1, 1), (1, 1), (0, 0, 0, 0), 4, 32, True, True),     # partial block
    ((1, 16, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), 8, 16, False, False),    # int8 weights
    ((1, 40, 9, 9), 16, (3, 3), (2, 2), (0, 1, 2, 1), 2, 16, True, False),    # 2-bit crumbs, blocks of 16, partial
    ((1, 24, 7, 7), 24, (1, 1), (1, 1), (0, 0, 0, 0), 6, 8, False, True),     # 6-bit weights, 3 blocks
    ((1, 64, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), 2, 32, True, True),      # 2-bit: four per byte
    ((1, 40, 5, 5), 12, (1, 1), (1, 1), (0, 0, 0, 0), 2, 32, False, False),   # 2-bit, partial block
    ((1, 24, 5, 5), 8, (3, 3), (1, 1), (1, 1, 1, 1), 3, 8, False, False),     # 3-bit nibbles
    ((1, 64, 5, 5), 8, (1, 1), (1, 1), (0, 0, 0, 0), 5, 64, True, False),     # 5-bit: 16-channel A72 calls
    ((1, 64, 5, 5), 8, (1, 1), (1, 1), (0, 0, 0, 0), 7, 32, False, False),    # 7-bit (A72: plain vector code)
    ((1, 48, 16, 16), 8, (3, 3), (1, 1), (1, 1, 1, 1), 4, 64, True, False),  # input rows copied (1 KB stride)
    # an absorbed BN + ReLU before the conv (the prologue): per row of the quantization, inlined
    ((1, 64, 5, 5), 16, (1, 1), (1, 1), (0, 0, 0, 0), 4, 32, True, False, ("subtract", "divide", "multiply", "add")),
    ((1, 40, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), 4, 32, True, False, ("multiply", "add")),
]


@pytest.mark.parametrize("target_name, isa", [("rpi4", "neon"), ("rpi5", "sdot")])
def test_arm_kernels_on_emulated_board_match_reference(emulated_board, tmp_path, target_name, isa):
    # a bounded request, and the session closed when the block ends (the board is free for the
    # next test: the ``board_free_after_test`` fixture checks it)
    with board_session(emulated_board.tracker, emulated_board.key, timeout=120,
                       session_timeout=600) as remote:
        _run_cases(remote, tmp_path, target_name, isa)


FP32_CASES = [(3, 16, 30, 7, 2), (5, 24, 12, 3, 1)]      # ci, co, hw, k, stride: the stem's shape
DEPTHWISE_CASES = [(3, 3, 28, 3, 1), (6, 6, 14, 3, 2), (3, 3, 7, 3, 1)]   # depthwise: ci = co = groups


def _run_fp32_convs(remote, tmp_path, spec, target):
    """The fp32 convs a model keeps with their AArch64 schedules: the stem (outer-product tile)
    and MobileNet's depthwise convs (rows of NEON vectors, stride 2 split in even / odd halves)."""
    from tvm import te, topi

    from dsconv_tvm.backends.cpu.rules import schedule_fp32_conv

    dev = remote.cpu()
    for i, (ci, co, hw, k, s) in enumerate(FP32_CASES + DEPTHWISE_CASES):
        groups = 1 if i < len(FP32_CASES) else co
        pad = k // 2
        x = te.placeholder((1, ci, hw, hw), "float32", "x")
        wt = te.placeholder((co, ci // groups, k, k), "float32", "w")
        b = te.placeholder((1, co, 1, 1), "float32", "b")
        conv = (topi.nn.conv2d_nchw(x, wt, s, pad, 1) if groups == 1
                else topi.nn.conv(x, wt, s, pad, 1, groups, "NCHW", "OIHW", "float32"))
        y = topi.nn.relu(topi.add(conv, b))
        func = te.create_prim_func([x, wt, b, y]).with_attr("global_symbol", "main")
        lib_path = tmp_path / f"fp32_{i}.so"
        spec.export_library(tvm.compile(schedule_fp32_conv(func, target).mod, target), str(lib_path))
        remote.upload(str(lib_path))
        fn = remote.load_module(lib_path.name)["main"]
        rng = np.random.default_rng(i)
        xn, wn, bn = (rng.standard_normal(t).astype(np.float32)
                      for t in ((1, ci, hw, hw), (co, ci // groups, k, k), (1, co, 1, 1)))
        out = tvm.runtime.tensor(np.zeros([int(d) for d in y.shape], np.float32), dev)
        fn(*(tvm.runtime.tensor(a, dev) for a in (xn, wn, bn)), out)
        xp = np.pad(xn, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        oh = (hw + 2 * pad - k) // s + 1
        win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s][:, :, :oh, :oh]
        if groups == 1:
            ref = np.einsum("nchwij,fcij->nfhw", win, wn)
        else:
            ref = np.einsum("nchwij,cij->nchw", win, wn[:, 0])
        np.testing.assert_allclose(out.numpy(), np.maximum(ref + bn, 0), rtol=1e-5, atol=1e-4)


def _run_cases(remote, tmp_path, target_name, isa):
    """Every remote object lives in this frame only: gone when it returns."""
    spec = get_target(target_name)
    target = spec.tvm_target()
    _run_fp32_convs(remote, tmp_path, spec, target)
    dev = remote.cpu()
    for i, (in_shape, co, k, s, p, bits, block, uns, residual, *pro) in enumerate(CASES):
        ops = tuple(pro[0]) if pro else ()
        layer = DSConvLayer(in_shape, co, k, ConvGeometry(s, p), bits, block, 8, uns, "float32", True, "relu",
                            "int8", residual, prologue=ops, prologue_relu=bool(ops))
        func = dsconv_primfunc(layer).with_attr("global_symbol", "main")
        intrin = dot_intrin(func, target)
        if bits <= 6 or isa == "sdot":
            assert intrin is not None and intrin.isa == isa
        lib_path = tmp_path / f"layer{i}.so"
        spec.export_library(tvm.compile(schedule_dsconv_cpu(func, target).mod, target), str(lib_path))
        remote.upload(str(lib_path))
        fn = remote.load_module(lib_path.name)["main"]

        rng = np.random.default_rng(i)
        x = rng.standard_normal(in_shape).astype(np.float32) * 2
        if uns:
            x = np.maximum(x, 0)
        qw = quantize_weight(rng.standard_normal((co, in_shape[1], *k)).astype(np.float32), bits, block, "l2",
                             "float32")
        bias = rng.standard_normal(co).astype(np.float32)
        # prologue: BN-like constants, every op rounded on its own as numpy does (no FMA)
        consts = [(rng.random(in_shape[1]) + 0.5 if op in ("divide", "multiply") else
                   rng.standard_normal(in_shape[1])).astype(np.float32) for op in ops]
        args = [x, *layer_params(layer, qw.q, qw.xi, bias), *consts]
        for op, const in zip(ops, consts):
            x = getattr(np, op)(x, const[:, None, None]).astype(np.float32)
        if ops:
            x = np.maximum(x, 0)
        res = rng.standard_normal(layer.out_shape).astype(np.float32) if residual else None
        if res is not None:
            args.append(res)
        out = tvm.runtime.tensor(np.zeros(layer.out_shape, np.float32), dev)
        fn(*[tvm.runtime.tensor(a, dev) for a in args], out)
        ref = dsconv2d(x, qw.q, qw.xi, block, 8, layer.geom, bias, uns)
        if res is not None:
            ref = ref + res
        ref = np.maximum(ref, 0)
        # same integers; float32 sums in another order (see test_kernels.py for the bound)
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=2e-5 * float(np.abs(ref).max()) + 1e-6)
