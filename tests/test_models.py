"""Whole models: compiled DSConv .so == numpy DSConv reference model; cross-compiled .so files."""

import glob
import os

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

from dsconv_tvm.compiler import compile_model, run_executable, sample_inputs
from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.frontend import load_onnx
from dsconv_tvm.reference import reference_model
from dsconv_tvm.targets import elf_machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "models", "*.onnx")))


def _residual_model(path):
    """conv-bn-relu, maxpool, a residual block (conv-bn-relu-conv-bn + identity, relu), 1x1 conv
    with stride 2, dilated conv, avgpool, gemm: the ops the example models use."""
    rng = np.random.default_rng(1)

    def t(name, *shape, s=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    def bn(prefix, c):
        return [numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), prefix + "_g"),
                t(prefix + "_b", c, s=0.1), t(prefix + "_m", c, s=0.1),
                numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), prefix + "_v")]

    inits = [t("w0", 16, 3, 3, 3), *bn("bn0", 16), t("w1", 16, 16, 3, 3, s=0.1), *bn("bn1", 16),
             t("w2", 16, 16, 3, 3, s=0.1), *bn("bn2", 16), t("w3", 40, 16, 1, 1), t("b3", 40, s=0.1),
             t("w4", 24, 40, 3, 3, s=0.05), t("wf", 10, 24), t("bf", 10)]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        n("BatchNormalization", ["c0", "bn0_g", "bn0_b", "bn0_m", "bn0_v"], ["n0"]),
        n("Relu", ["n0"], ["r0"]),
        n("MaxPool", ["r0"], ["p0"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="block_conv1"),
        n("BatchNormalization", ["c1", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["n1"]),
        n("Relu", ["n1"], ["r1"]),
        n("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="block_conv2"),
        n("BatchNormalization", ["c2", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["n2"]),
        n("Add", ["n2", "p0"], ["s2"]),
        n("Relu", ["s2"], ["r2"]),
        n("Conv", ["r2", "w3", "b3"], ["c3"], strides=[2, 2], name="down"),
        n("Relu", ["c3"], ["r3"]),
        n("Conv", ["r3", "w4"], ["c4"], pads=[2, 2, 2, 2], dilations=[2, 2], name="dilated"),
        n("GlobalAveragePool", ["c4"], ["g"]),
        n("Flatten", ["g"], ["f"]),
        n("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "resblock", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 20, 20])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory):
    return _residual_model(str(tmp_path_factory.mktemp("m") / "resblock.onnx"))


def _compiled_vs_reference(path, out, cfg, shapes=None, n_inputs=2):
    result = compile_model(path, "x86", out, cfg, shapes, check=False)
    loaded = load_onnx(path, shapes)
    ref = reference_model(loaded, result.report, cfg.mantissa, cfg.block)
    lib = tvm.runtime.load_module(out)
    worst = 0.0
    for seed in range(n_inputs):
        x = sample_inputs(loaded, seed)
        a, b = run_executable(lib, x), ref(*x)
        # Tolerance (see README "Correctness"): each layer's integers are exact, but the float sums run
        # in another order, so the next layer's input can differ by float32 rounding; where that moves
        # a value across a mantissa rounding boundary the mantissa differs by one step (2^-7 of the
        # block maximum at m=8).  Such flips are rare and stay local, so we bound the error relative
        # to the output scale by 1e-3 and require most outputs to agree to 1e-5.
        scale = np.abs(b).max()
        err = np.abs(a - b)
        assert err.max() <= 1e-3 * scale, (err.max(), scale)
        assert np.mean(err <= 1e-5 * scale + 1e-6) >= 0.9
        worst = max(worst, err.max() / scale)
    return result, worst


@pytest.mark.parametrize("cfg", [DSConvConfig(block=8), DSConvConfig(bits=3, block=4, mantissa=6, first_layer="dsconv"),
                                 DSConvConfig(bits=8, block=16, fit="l2", scale_dtype="float16"),
                                 DSConvConfig(block=5, unsigned_after_relu=False)],
                         ids=["W4B8m8", "W3B4m6-first", "W8B16-l2-f16", "W4B5-signed"])
def test_residual_model_matches_reference(residual_onnx, tmp_path, cfg):
    result, _ = _compiled_vs_reference(residual_onnx, str(tmp_path / "m.so"), cfg)
    names = [layer.name for layer in result.report.converted]
    assert "block_conv1" in names and "dilated" in names and "down" in names
    assert len(result.folded_bn if hasattr(result, "folded_bn") else []) == 3


def test_batch_of_four(residual_onnx, tmp_path):
    _compiled_vs_reference(residual_onnx, str(tmp_path / "m4.so"), DSConvConfig(block=8),
                           {"input": [4, 3, 20, 20]}, n_inputs=1)


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_models_match_reference(path, tmp_path):
    result, worst = _compiled_vs_reference(path, str(tmp_path / "e.so"), DSConvConfig(), n_inputs=1)
    assert result.report.converted


def test_example_models_are_committed():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"resnet20.onnx", "vgg_small.onnx", "mobilenet_small.onnx"} <= names


@pytest.mark.parametrize("target,machine", [("arm", "AArch64"), ("rpi4", "AArch64"), ("rpi5", "AArch64"),
                                            ("rpi-armv7", "ARM"), ("x86-avx2", "x86-64")])
def test_cross_compiled_dsconv_models(residual_onnx, tmp_path, target, machine):
    out = str(tmp_path / f"m-{target}.so")
    result = compile_model(residual_onnx, target, out, DSConvConfig(block=8), check=False)
    assert elf_machine(out) == machine
    assert len(result.report.converted) == 4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
