"""Whole models: compiled DSConv .so == numpy DSConv reference model; cross-compiled .so files."""

import glob
import os

import pytest

from dsconv_tvm.driver.compile import compile_model
from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.host import elf_machine

from conftest import compiled_vs_reference, residual_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "models", "*.onnx")))


@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory):
    return residual_model(str(tmp_path_factory.mktemp("m") / "resblock.onnx"))


@pytest.mark.parametrize("cfg", [DSConvConfig(block=8), DSConvConfig(bits=3, block=4, mantissa=6, first_layer="dsconv"),
                                 DSConvConfig(bits=8, block=16, fit="l2", scale_dtype="float16"),
                                 DSConvConfig(block=5, unsigned_after_relu=False)],
                         ids=["W4B8m8", "W3B4m6-first", "W8B16-l2-f16", "W4B5-signed"])
def test_residual_model_matches_reference(residual_onnx, tmp_path, cfg):
    result, _ = compiled_vs_reference(residual_onnx, str(tmp_path / "m.so"), cfg)
    names = [layer.name for layer in result.report.converted]
    assert "block_conv1" in names and "dilated" in names and "down" in names
    assert len(result.folded_bn if hasattr(result, "folded_bn") else []) == 3


def test_batch_of_four(residual_onnx, tmp_path):
    compiled_vs_reference(residual_onnx, str(tmp_path / "m4.so"), DSConvConfig(block=8),
                           {"input": [4, 3, 20, 20]}, n_inputs=1)


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_models_match_reference(path, tmp_path):
    result, worst = compiled_vs_reference(path, str(tmp_path / "e.so"), DSConvConfig(), n_inputs=1)
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


@pytest.mark.parametrize("cfg", [DSConvConfig(block=8), DSConvConfig(block=8, unsigned_after_relu=False)],
                         ids=["unsigned", "signed"])
def test_fused_bfp_between_layers_changes_no_bit(residual_onnx, tmp_path, cfg):
    """Chained layers (the producer's epilogue writes the consumer's BFP input, here also after a
    residual add and before a padded, dilated consumer) compute exactly what separate layers do."""
    import numpy as np

    from dsconv_tvm.execute.runner import predict

    fused = compile_model(residual_onnx, "x86", str(tmp_path / "f.so"), cfg, check=False)
    plain = compile_model(residual_onnx, "x86", str(tmp_path / "p.so"), cfg.replace(fuse_bfp=False), check=False)
    chain = {layer.name: layer.bfp for layer in fused.report.converted}
    assert chain == {"block_conv1": ("out",), "block_conv2": ("in", "out"), "down": ("in", "out"),
                     "dilated": ("in",)}
    assert all(layer.bfp == () for layer in plain.report.converted)
    x = np.random.default_rng(0).standard_normal((1, 3, 20, 20)).astype(np.float32)
    np.testing.assert_array_equal(predict(str(tmp_path / "f.so"), x), predict(str(tmp_path / "p.so"), x))


@pytest.mark.parametrize("cfg", [DSConvConfig(bits=2, block=16), DSConvConfig(bits=2, block=8),
                                 DSConvConfig(block=16, layer_bits={"block_conv2": 2, "down": 8}),
                                 DSConvConfig(block=8, layer_bits={"block_conv2": 2, "down": 2})],
                         ids=["W2B16", "W2B8", "mixed-B16", "mixed-B8"])
def test_fused_bfp_every_weight_width_changes_no_bit(residual_onnx, tmp_path, cfg):
    """2-bit weights (crumbs: 16-slot steps, so a block of 8 is stored in 16 slots and quantized in a
    separate pass after the producer's conv) and mixed widths among a producer's consumers (one
    format when their slots agree): fused == unfused bit for bit."""
    import numpy as np

    from dsconv_tvm.execute.runner import predict

    fused = compile_model(residual_onnx, "x86", str(tmp_path / "f.so"), cfg, check=False)
    compile_model(residual_onnx, "x86", str(tmp_path / "p.so"), cfg.replace(fuse_bfp=False), check=False)
    assert any(layer.bfp for layer in fused.report.converted)
    x = np.random.default_rng(1).standard_normal((1, 3, 20, 20)).astype(np.float32)
    np.testing.assert_array_equal(predict(str(tmp_path / "f.so"), x), predict(str(tmp_path / "p.so"), x))


def test_fused_bfp_residual_stream_changes_no_bit(tmp_path):
    """ResNet-20: bottleneck outputs read by the next block's first conv (BFP) and its residual add
    (a channel-innermost float tensor); the same bits as unfused layers."""
    import numpy as np

    from dsconv_tvm.execute.runner import predict

    path = os.path.join(REPO, "models", "resnet20.onnx")
    cfg = DSConvConfig()
    fused = compile_model(path, "x86", str(tmp_path / "f.so"), cfg, check=False)
    compile_model(path, "x86", str(tmp_path / "p.so"), cfg.replace(fuse_bfp=False), check=False)
    kinds = [b for layer in fused.report.converted for b in layer.bfp]
    assert {"out+fp32-nhwc", "fp32-nhwc", "out", "in"} <= set(kinds)
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(predict(str(tmp_path / "f.so"), x), predict(str(tmp_path / "p.so"), x))


def save_graph(path, nodes, inits, in_chw, out_chw):
    """Save an opset-13 ONNX model of ``nodes`` from "input" [N, *in_chw] to "out" [N, *out_chw]."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_chw])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", *out_chw])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def relu6_model(path):
    """MobileNetV2's pattern: Conv -> Clip(0, 6) (bounds as inputs, opset 13), a 1x1 expansion, a
    3x3 conv added to the block's input then clipped, and a Clip with only a lower bound (a relu)."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(2)

    def t(name, *shape, s=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [t("w0", 16, 3, 3, 3), t("b0", 16), t("w1", 32, 16, 1, 1), t("b1", 32), t("w2", 16, 32, 3, 3, s=0.1),
             t("b2", 16), t("w3", 16, 16, 1, 1), numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
        n("Clip", ["c0", "lo", "hi"], ["r0"]),
        n("Conv", ["r0", "w1", "b1"], ["c1"], name="expand"),
        n("Clip", ["c1", "lo", "hi"], ["r1"]),
        n("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv3x3"),
        n("Add", ["c2", "r0"], ["s2"]),
        n("Clip", ["s2", "lo", "hi"], ["r2"]),
        n("Conv", ["r2", "w3"], ["c3"], name="head"),
        n("Clip", ["c3", "lo", ""], ["out"]),
    ]
    return save_graph(path, nodes, inits, (3, 10, 10), (16, 10, 10))


def test_clip_is_fused_into_the_epilogue_and_matches_reference(tmp_path):
    """Every Clip(0, 6) (and the Clip that is a relu) is in its conv's epilogue, no separate
    maximum/minimum kernel is left, the layers after them read unsigned mantissas, chained in BFP,
    and the .so equals the numpy DSConv reference model (with ONNX's Clip) and the unfused .so."""
    import numpy as np

    from dsconv_tvm.driver.compile import build_relax
    from dsconv_tvm.execute.runner import predict
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.target import get_target

    path = relu6_model(str(tmp_path / "relu6.onnx"))
    cfg = DSConvConfig(block=16, first_layer="dsconv")
    result, _ = compiled_vs_reference(path, str(tmp_path / "f.so"), cfg)
    layers = {layer.name: (layer.fused, layer.unsigned, layer.bfp) for layer in result.report.converted}
    assert layers == {"stem": (("bias", "relu6"), False, ("out+fp32-nhwc",)),
                      "expand": (("bias", "relu6"), True, ("in", "out")),
                      "conv3x3": (("bias", "residual", "relu6"), True, ("in", "out")),
                      "head": (("relu",), True, ("in",))}
    mod, _ = build_relax(load_onnx(path), cfg, get_target("x86"))
    text = mod["main"].script(show_meta=False)
    assert text.count("R.call_tir") == 4 and "maximum" not in text and "minimum" not in text
    compile_model(path, "x86", str(tmp_path / "p.so"), cfg.replace(fuse_bfp=False), check=False)
    x = np.random.default_rng(0).standard_normal((1, 3, 10, 10)).astype(np.float32) * 3
    np.testing.assert_array_equal(predict(str(tmp_path / "f.so"), x), predict(str(tmp_path / "p.so"), x))


def grouped_model(path):
    """AlexNet's pattern, smaller: a conv, then grouped convs with bias and ReLU (groups=2, 5x5,
    stride 2, 12 input channels a group: not a multiple of the block 8; groups=4, 3x3, stride 1,
    8 a group) and a grouped conv without bias or ReLU (groups=4, stride 2, 10 output channels a
    group: padded to 16 by the x86 backend) feeding 1x1 convs chained in fused BFP."""
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(3)

    def t(name, *shape, s=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [t("w0", 24, 8, 3, 3), t("b0", 24), t("w1", 32, 12, 5, 5, s=0.1), t("b1", 32),
             t("w2", 32, 8, 3, 3), t("b2", 32), t("w3", 40, 8, 3, 3), t("w4", 16, 40, 1, 1), t("b4", 16),
             t("w5", 16, 16, 1, 1)]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv"),
        n("Relu", ["c0"], ["r0"]),
        n("Conv", ["r0", "w1", "b1"], ["c1"], pads=[2, 2, 2, 2], strides=[2, 2], group=2, name="g2"),
        n("Relu", ["c1"], ["r1"]),
        n("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=4, name="g4"),
        n("Relu", ["c2"], ["r2"]),
        n("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2], group=4, name="g4s2"),
        n("Conv", ["c3", "w4", "b4"], ["c4"], name="head"),
        n("Relu", ["c4"], ["r4"]),
        n("Conv", ["r4", "w5"], ["out"], name="tail"),
    ]
    return save_graph(path, nodes, inits, (8, 15, 15), (16, 4, 4))


def test_grouped_convs_are_one_dsconv_layer_a_group(tmp_path):
    """A grouped conv is split into one DSConv layer per group (bias and ReLU in each group's
    epilogue, float in and out): the .so equals the numpy DSConv reference of the per-group convs
    and is close to the fp32 model (4-bit weights)."""
    import numpy as np
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    from dsconv_tvm.accuracy.evaluate import layer_sqnr
    from dsconv_tvm.execute.runner import predict
    from dsconv_tvm.frontend.onnx import load_onnx
    from dsconv_tvm.scheme.metrics import sqnr_db

    path = grouped_model(str(tmp_path / "grouped.onnx"))
    cfg = DSConvConfig(block=8, first_layer="dsconv")
    result, _ = compiled_vs_reference(path, str(tmp_path / "g.so"), cfg)
    rep = result.report
    assert not rep.kept
    layers = {la.name: (la.weight_shape, la.in_shape[1], la.fused, la.bfp) for la in rep.converted}
    assert layers == {
        "conv": ((24, 8, 3, 3), 8, ("bias", "relu"), ()),
        **{f"g2/g{g}": ((16, 12, 5, 5), 12, ("bias", "relu"), ()) for g in range(2)},
        **{f"g4/g{g}": ((8, 8, 3, 3), 8, ("bias", "relu"), ()) for g in range(4)},
        **{f"g4s2/g{g}": ((10, 8, 3, 3), 8, (), ()) for g in range(4)},
        "head": ((16, 40, 1, 1), 40, ("bias", "relu"), ("out",)),
        "tail": ((16, 16, 1, 1), 16, (), ("in",)),
    }
    # each group quantized on its own: its weights, its bytes, its own (unsigned: after a ReLU) input
    w1 = numpy_helper.to_array({t.name: t for t in load_onnx(path).model.graph.initializer}["w1"])
    for g in range(2):
        la = next(la for la in rep.converted if la.name == f"g2/g{g}")
        assert la.unsigned and la.fp32_bytes == w1[16 * g:16 * (g + 1)].nbytes
        assert la.deployed_bytes < la.fp32_bytes and 10 < la.sqnr_db < 40
        assert sqnr_db(w1[16 * g:16 * (g + 1)], la.quantized.dequantize()) == la.sqnr_db
    assert len({la.func_name for la in rep.converted}) >= 4 and all(la.func_name for la in rep.converted)
    # 10 output channels a group (no dot-product lanes divide them): computed as 16, 10 written
    assert {la.name: la.layer.out_slots for la in rep.converted if la.layer.out_slots} == \
        {f"g4s2/g{g}": 16 for g in range(4)}
    x = np.random.default_rng(0).standard_normal((2, 8, 15, 15)).astype(np.float32)
    fp32 = ReferenceEvaluator(load_onnx(path).model).run(None, {"input": x})[0]
    assert sqnr_db(fp32, predict(str(tmp_path / "g.so"), x)) > 12      # 15.8 dB: 7 layers of ~24 dB weights
    # eval's per-conv SQNR (by ONNX node) counts a grouped conv as converted
    rows = layer_sqnr(path, cfg, x, 2, str(tmp_path))
    assert [r.name for r in rows] == ["conv", "g2", "g4", "g4s2", "head", "tail"] and all(r.converted for r in rows)


def test_grouped_conv_with_fused_neighbours_changes_no_bit(tmp_path):
    """Fused BFP next to grouped convs (which read and write float) changes no bit."""
    import numpy as np

    from dsconv_tvm.execute.runner import predict

    path = grouped_model(str(tmp_path / "grouped.onnx"))
    cfg = DSConvConfig(block=8, first_layer="dsconv")
    compile_model(path, "x86", str(tmp_path / "f.so"), cfg, check=False)
    compile_model(path, "x86", str(tmp_path / "p.so"), cfg.replace(fuse_bfp=False), check=False)
    x = np.random.default_rng(1).standard_normal((1, 8, 15, 15)).astype(np.float32)
    np.testing.assert_array_equal(predict(str(tmp_path / "f.so"), x), predict(str(tmp_path / "p.so"), x))
