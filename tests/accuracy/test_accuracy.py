"""Accuracy as a correctness check: each example model compiled through the CLI at W4 B=32 m=8 keeps
its top-1 on the 10 000 Fashion-MNIST test images within 1.0 pt of fp32 (ONNX Runtime)."""

import json
import os

import numpy as np
import pytest

from dsconv_tvm.cli import main as cli
from dsconv_tvm.accuracy.datasets import load_fashion_mnist
from dsconv_tvm.accuracy.probes import onnx_predict
from dsconv_tvm.execute.compare import top1

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = ["resnet20", "vgg_small", "mobilenet_small"]


@pytest.fixture(scope="module")
def test_set(tmp_path_factory):
    x, y = load_fashion_mnist("test")
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, x)
    return x, y, str(path)


@pytest.mark.parametrize("name", MODELS)
def test_w4_accuracy_within_one_point(name, test_set, tmp_path):
    x, y, xpath = test_set
    model = os.path.join(REPO, "models", f"{name}.onnx")
    so, out = str(tmp_path / "m.so"), str(tmp_path / "y.npy")
    assert cli.main(["compile", model, "--target", "x86", "-o", so, "--bits", "4", "--block", "32",
                     "--mantissa", "8", "--input-shapes", "input:[200,1,28,28]", "--no-check"]) == 0
    assert cli.main(["run", so, "--input", xpath, "--output", out]) == 0
    dsconv = top1(np.load(out), y)
    fp32 = top1(onnx_predict(model, x), y)
    recorded = json.load(open(os.path.join(REPO, "models", "fashion_mnist_models.json")))
    print(f"{name}: fp32 {fp32:.4f} DSConv W4 {dsconv:.4f}")
    assert abs(fp32 - _recorded_acc(recorded, name)) < 1e-3     # the committed model is the measured one
    assert fp32 - dsconv <= 0.010, (fp32, dsconv)


def _recorded_acc(recorded, name):
    return float(recorded["models"][name]["fp32_top1_ort"])
