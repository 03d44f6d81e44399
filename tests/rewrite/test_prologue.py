"""A pre-activation BN + ReLU (DenseNet's, after a Concat) absorbed into the next DSConv layer's
input quantization: the pattern matched, the built model against the numpy reference model."""

import numpy as np
import pytest
from conftest import compiled_vs_reference, onnx_initializers  # noqa: E402

from dsconv_tvm.config import DSConvConfig


def dense_block_model(path):
    """A DenseNet block, small: stem conv, a conv on it, Concat, BN + Relu, 1x1 bottleneck (its own
    BN folded, Relu), 3x3 growth conv, Concat, a per-channel Mul + Add without Relu, 1x1
    transition conv.  (Opset 15: ONNX's reference evaluator gets opset 13's BN wrong.)"""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng, t, bn_init = onnx_initializers(3)

    def bn(prefix, c):
        return bn_init(prefix, c, s_beta=0.5, s_mean=0.3)

    def affine(prefix, c):
        return [numpy_helper.from_array((rng.random((c, 1, 1)) + 0.5).astype(np.float32), prefix + "_s"),
                t(prefix + "_t", c, 1, 1, s=0.5)]

    inits = [t("w0", 16, 3, 3, 3), t("w1", 16, 16, 3, 3, s=0.1), *bn("bn1", 32), t("w2", 32, 32, 1, 1, s=0.2),
             *bn("bn2", 32), t("w3", 16, 32, 3, 3, s=0.1), *affine("bn3", 48), t("w4", 24, 48, 1, 1, s=0.2)]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        n("Conv", ["c0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        n("Concat", ["c0", "c1"], ["cat1"], axis=1),
        n("BatchNormalization", ["cat1", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["n1"]),
        n("Relu", ["n1"], ["r1"]),
        n("Conv", ["r1", "w2"], ["c2"], name="bottleneck"),
        n("BatchNormalization", ["c2", "bn2_g", "bn2_b", "bn2_m", "bn2_v"], ["n2"]),
        n("Relu", ["n2"], ["r2"]),
        n("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1], name="growth"),
        n("Concat", ["cat1", "c3"], ["cat2"], axis=1),
        n("Mul", ["bn3_s", "cat2"], ["m3"]),
        n("Add", ["m3", "bn3_t"], ["n3"]),
        n("Conv", ["n3", "w4"], ["out"], name="transition"),
    ]
    graph = helper.make_graph(nodes, "dense",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 24, 10, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), path)
    return path


@pytest.mark.parametrize("block", [16, 32])
def test_bn_relu_before_conv_is_absorbed_and_matches_reference(tmp_path, monkeypatch, block):
    """The Concat's BN + ReLU runs in the bottleneck's quantization (unsigned mantissas), the Mul +
    Add in the transition's (signed); no elementwise pass is left; the .so matches the
    numpy reference model (ONNX's BN and Relu) and, bit for bit, the model compiled without them."""
    from dsconv_tvm.backends.cpu.backend import CPUBackend
    from dsconv_tvm.driver.compile import build_relax, compile_model
    from dsconv_tvm.execute.runner import predict
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.target import get_target

    path = dense_block_model(str(tmp_path / "dense.onnx"))
    cfg = DSConvConfig(block=block)
    result, _ = compiled_vs_reference(path, str(tmp_path / "f.so"), cfg)
    layers = {layer.name: (layer.fused, layer.unsigned, layer.layer.has_prologue, layer.layer.prologue_relu)
              for layer in result.report.converted}
    assert layers == {"conv1": ((), False, False, False),
                      "bottleneck": (("bn+relu<", "bias", "relu"), True, True, True),
                      "growth": ((), True, False, False),
                      "transition": (("bn<",), False, True, False)}
    mod, _ = build_relax(load_onnx(path), cfg, get_target("x86"))
    text = mod["main"].script(show_meta=False)
    assert not any(f"R.{op}(" in text for op in ("subtract", "divide", "multiply", "add", "nn.relu"))
    # without the prologues: separate elementwise passes, the same float32 ops in the same order
    # (LLVM contracts the multiply-adds alike in both builds): the same bits
    unfused = str(tmp_path / "u.so")
    monkeypatch.setattr(CPUBackend, "fuses_prologue", False)
    plain = compile_model(path, "x86", unfused, cfg, check=False)
    assert all(not layer.layer.has_prologue for layer in plain.report.converted)
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal((1, 3, 10, 10)).astype(np.float32)
        np.testing.assert_array_equal(predict(str(tmp_path / "f.so"), x), predict(unfused, x))


def test_resnet_pattern_is_unchanged(tmp_path):
    """A conv's own BN + ReLU stays in its epilogue (the producer takes it first), so no layer of a
    post-activation network gets a prologue."""
    from conftest import residual_model

    from dsconv_tvm.driver.compile import build_relax
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.target import get_target

    path = residual_model(str(tmp_path / "r.onnx"))
    _, report = build_relax(load_onnx(path), DSConvConfig(block=8), get_target("x86"))
    assert report.converted and not any(la.layer.has_prologue or la.layer.prologue_relu for la in report.converted)
