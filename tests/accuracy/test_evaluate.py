"""``dsconv-tvm eval``: its numbers against independent computations (ONNX Runtime, the compiled .so run
through ``evaluate.predict``, plain numpy), image folders, seeded crops, errors."""

import json
import os

import numpy as np
import pytest

from dsconv_tvm.cli import main as cli
from dsconv_tvm.accuracy.probes import probe_model
from dsconv_tvm.scheme.metrics import sqnr_db
from dsconv_tvm.execute.compare import topk_hits
from dsconv_tvm.accuracy.datasets import load_fashion_mnist
from dsconv_tvm.accuracy.probes import onnx_predict
from dsconv_tvm.execute.runner import predict
from dsconv_tvm.accuracy.images import label_from_name, load_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "models", "mobilenet_small.onnx")
N = 300


def test_topk_and_sqnr_definitions():
    logits = np.array([[0.1, 0.5, 0.2, 0.9], [3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    labels = np.array([1, 3, 1])
    assert topk_hits(logits, labels, 1).tolist() == [False, False, False]   # tie -> the lower class
    assert topk_hits(logits, labels, 2).tolist() == [True, False, True]
    assert topk_hits(logits, labels, 4).tolist() == [True, True, True]
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == float("inf")


def test_eval_fashion_mnist_matches_independent_computation(tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert cli.main(["eval", MODEL, "--data", "fashion-mnist", "--limit", str(N), "--batch", "100",
                     "--sqnr-images", "8", "--json", out]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "agreement" in text and "per-layer output SQNR" in text
    res = json.load(open(out))
    x, y = load_fashion_mnist("test")
    x, y = x[:N], y[:N]
    ref = onnx_predict(MODEL, x)
    so = str(tmp_path / "m.so")
    assert cli.main(["compile", MODEL, "-o", so, "--input-shapes", "input:[100,1,28,28]", "--no-check"]) == 0
    ds = predict(so, x)
    assert res["n"] == N
    assert res["fp32_top1"] == pytest.approx(np.mean(ref.argmax(1) == y))
    assert res["dsconv_top1"] == pytest.approx(np.mean(ds.argmax(1) == y))
    top5 = np.argsort(-ds, axis=1)[:, :5]
    assert res["dsconv_top5"] == pytest.approx(np.mean([l in t for l, t in zip(y, top5)]))
    assert res["agreement"] == pytest.approx(np.mean(ref.argmax(1) == ds.argmax(1)))
    assert res["fp32_in_top5"] == pytest.approx(np.mean([a in t for a, t in zip(ref.argmax(1), top5)]))
    assert res["dsconv_top1"] >= res["fp32_top1"] - 0.03
    layers = res["layers"]
    assert [l["converted"] for l in layers].count(False) >= 1       # first layer + depthwise kept
    assert layers[0]["sqnr_db"] > 60                                 # fp32 first conv: ORT vs TVM fp32
    conv = [l["sqnr_db"] for l in layers if l["converted"]]
    assert conv and all(10 < s < 45 for s in conv)


def test_probe_model_outputs_every_conv():
    from dsconv_tvm.frontend.onnx import load_onnx

    loaded = load_onnx(MODEL)
    probe = probe_model(loaded.model, loaded.conv_names)
    assert len(probe.graph.output) == 1 + len(loaded.conv_names)
    x = load_fashion_mnist("test")[0][:4]
    import onnxruntime as ort

    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": x})
    np.testing.assert_allclose(outs[0], onnx_predict(MODEL, x), rtol=1e-5, atol=1e-5)
    assert all(o.ndim == 4 for o in outs[1:])


@pytest.fixture()
def image_dir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, label in enumerate([3, 7, 1]):
        a = (rng.random((40 + 8 * i, 36, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"img_{i}_{label}.png")
    (d / "notes.txt").write_text("not an image")
    return str(d)


def test_images_are_deterministic_and_grey_for_one_channel(image_dir):
    x1, names, src = load_images(image_dir, (1, 28, 28), crops=2, seed=5)
    x2, _, _ = load_images(image_dir, (1, 28, 28), crops=2, seed=5)
    x3, _, _ = load_images(image_dir, (1, 28, 28), crops=2, seed=6)
    assert x1.shape == (9, 1, 28, 28) and x1.dtype == np.float32
    assert np.array_equal(x1, x2) and not np.array_equal(x1, x3)
    assert 0 <= x1.min() and x1.max() <= 1
    assert src.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert names[0].endswith(":centre") and names[1].endswith(":crop0")
    assert label_from_name("a/imagenet_03_990.jpg") == 990 and label_from_name("astronaut.png") is None
    rgb, _, _ = load_images(image_dir, (3, 16, 20))
    assert rgb.shape == (3, 3, 16, 20)


def test_eval_images_without_and_with_labels(image_dir, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert cli.main(["eval", MODEL, "--images", image_dir, "--crops", "3", "--batch", "4",
                     "--sqnr-images", "0", "--json", out]) == 0
    res = json.load(open(out))
    assert res["n"] == 12 and res["fp32_top1"] is None and 0 <= res["agreement"] <= 1
    assert res["layers"] == []
    assert cli.main(["eval", MODEL, "--images", image_dir, "--labels-from-names", "--batch", "3",
                     "--sqnr-images", "0", "--json", out]) == 0
    res = json.load(open(out))
    assert res["n"] == 3 and res["fp32_top1"] is not None


def test_eval_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["eval", MODEL, "--images", str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    assert cli.main(["eval", MODEL, "--images", str(bad)]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err
    assert cli.main(["eval", MODEL, "--data", "fashion-mnist", "--batch", "0"]) == 2
    assert cli.main(["eval", MODEL, "--data", "fashion-mnist", "--limit", "0"]) == 2
