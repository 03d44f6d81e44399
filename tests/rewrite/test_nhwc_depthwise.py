"""Inverted residual blocks channel-innermost (rewrite/nhwc.py): expansion DSConv 1x1 -> depthwise
fp32 3x3 (+bias, ReLU6) -> projection DSConv 1x1, the tensors between them [N, H, W, C]; compiled
models against the numpy DSConv reference model, and the path really taken."""

import os

import numpy as np
import pytest

from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.driver.compile import compile_model
from dsconv_tvm.host import elf_machine

from conftest import compiled_vs_reference, onnx_initializers  # noqa: E402


def inverted_residual_model(path):
    """stem 3x3 (kept fp32) + ReLU6; a block without expansion (depthwise on the stem's output: stays
    NCHW) -> projection; a stride-1 block (expand 16 -> 64, depthwise, project 64 -> 16, residual
    add); a stride-2 block (expand 16 -> 96, depthwise stride 2, project 96 -> 32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _, t, _ = onnx_initializers(5)
    inits = [t("ws", 16, 3, 3, 3), t("bs", 16, s=0.1),
             t("wd0", 16, 1, 3, 3), t("bd0", 16, s=0.1), t("wp0", 16, 16, 1, 1), t("bp0", 16, s=0.1),
             t("we1", 64, 16, 1, 1), t("be1", 64, s=0.1), t("wd1", 64, 1, 3, 3), t("bd1", 64, s=0.1),
             t("wp1", 16, 64, 1, 1, s=0.1), t("bp1", 16, s=0.1),
             t("we2", 96, 16, 1, 1), t("be2", 96, s=0.1), t("wd2", 96, 1, 3, 3), t("bd2", 96, s=0.1),
             t("wp2", 32, 96, 1, 1, s=0.1), t("bp2", 32, s=0.1),
             numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    n = helper.make_node

    def conv(x, w, b, out, name, **kw):
        return n("Conv", [x, w, b], [out], name=name, **kw)

    def clip(x, out):
        return n("Clip", [x, "lo", "hi"], [out])

    nodes = [
        conv("input", "ws", "bs", "cs", "stem", pads=[1, 1, 1, 1]), clip("cs", "rs"),
        conv("rs", "wd0", "bd0", "cd0", "dw0", pads=[1, 1, 1, 1], group=16), clip("cd0", "rd0"),
        conv("rd0", "wp0", "bp0", "b0", "project0"),
        conv("b0", "we1", "be1", "ce1", "expand1"), clip("ce1", "re1"),
        conv("re1", "wd1", "bd1", "cd1", "dw1", pads=[1, 1, 1, 1], group=64), clip("cd1", "rd1"),
        conv("rd1", "wp1", "bp1", "cp1", "project1"), n("Add", ["cp1", "b0"], ["b1"]),
        conv("b1", "we2", "be2", "ce2", "expand2"), clip("ce2", "re2"),
        conv("re2", "wd2", "bd2", "cd2", "dw2", pads=[1, 1, 1, 1], strides=[2, 2], group=96), clip("cd2", "rd2"),
        conv("rd2", "wp2", "bp2", "out", "project2"),
    ]
    graph = helper.make_graph(nodes, "mbv2_blocks",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 14, 14])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 32, 7, 7])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return inverted_residual_model(str(tmp_path_factory.mktemp("nhwc") / "blocks.onnx"))


def check_nhwc_path(report):
    """The expansions write their float output channel-innermost, the projections after them read
    it so, the depthwise convs between them run NHWC; the block without expansion stays NCHW."""
    bfp = {layer.name: layer.bfp for layer in report.converted}
    assert "fp32-nhwc" in bfp["expand1"] and "fp32-nhwc" in bfp["expand2"]
    assert "in-nhwc" in bfp["project1"] and "in-nhwc" in bfp["project2"]
    assert "in-nhwc" not in bfp["project0"]
    assert "residual" in {layer.name: layer.fused for layer in report.converted}["project1"]
    kept = {layer.name: layer.reason for layer in report.kept}
    assert "NHWC" in kept["dw1"] and "NHWC" in kept["dw2"] and "NHWC" not in kept["dw0"]


@pytest.mark.parametrize("target", ["x86", "x86-avx2"])
def test_inverted_residual_blocks_nhwc_match_reference(model_path, tmp_path, target):
    """Stride 1 (with the residual add) and stride 2: the .so vs the numpy DSConv reference model
    (README's whole-model tolerance), and vs the same model compiled with the NCHW path."""
    from dsconv_tvm.execute.runner import predict

    cfg = DSConvConfig(block=32)
    result, _ = compiled_vs_reference(model_path, str(tmp_path / "nhwc.so"), cfg, target=target)
    check_nhwc_path(result.report)
    plain = compile_model(model_path, target, str(tmp_path / "nchw.so"), cfg.replace(nhwc_depthwise=False),
                          check=False)
    assert not any("in-nhwc" in layer.bfp for layer in plain.report.converted)
    x = np.random.default_rng(3).standard_normal((1, 3, 14, 14)).astype(np.float32)
    a, b = predict(str(tmp_path / "nhwc.so"), x), predict(str(tmp_path / "nchw.so"), x)
    scale = float(np.abs(b).max())
    assert np.abs(a - b).max() <= 1e-3 * scale
    assert np.mean(np.abs(a - b) <= 1e-5 * scale + 1e-6) >= 0.9


def test_inverted_residual_blocks_nhwc_build_for_aarch64(model_path, tmp_path):
    """The same path compiled for the Raspberry Pi 5 (AArch64, sdot kernels, 4-lane depthwise)."""
    out = str(tmp_path / "rpi5.so")
    result = compile_model(model_path, "rpi5", out, DSConvConfig(block=32), check=False)
    assert elf_machine(out) == "AArch64"
    check_nhwc_path(result.report)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
