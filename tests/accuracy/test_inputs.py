"""The user's own data: ``--inputs``/``--labels`` arrays, the preprocessing options of ``--data`` and
``--images``, and one clear error per mismatch."""

import json

import numpy as np
import pytest
from conftest import REPO

from dsconv_tvm.accuracy.datasets import load_fashion_mnist
from dsconv_tvm.accuracy.inputs import Preprocess, load_inputs, load_labels
from dsconv_tvm.cli import main as cli
from dsconv_tvm.errors import DataError

pytestmark = pytest.mark.timeout(120)
MEAN, STD = 0.286, 0.353


def normalised_input_model(path):
    """A small CNN that expects the *normalised* Fashion-MNIST image (x - 0.286) / 0.353 (no
    normalisation inside): conv-relu, conv-relu (stride 2), global pool, gemm (random weights: for the
    error paths)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)

    def t(name, *shape, s=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [t("w0", 16, 1, 3, 3), t("b0", 16, s=0.1), t("w1", 32, 16, 3, 3, s=0.1), t("b1", 32, s=0.1),
             t("wf", 10, 32), t("bf", 10)]
    n = helper.make_node
    nodes = [n("Conv", ["input", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
             n("Relu", ["c0"], ["r0"]),
             n("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
             n("Relu", ["c1"], ["r1"]),
             n("GlobalAveragePool", ["r1"], ["g"]), n("Flatten", ["g"], ["f"]),
             n("Gemm", ["f", "wf", "bf"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "normalised", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _ort(path, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_preprocess_matches_numpy():
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    p = Preprocess.from_options(mean="0.5,0.4,0.3", std="0.2,0.25,0.3", scale=255, layout="nhwc")
    ref = (x * 255 - np.array([0.5, 0.4, 0.3], np.float32)[:, None, None]) / np.array([0.2, 0.25, 0.3], np.float32)[:, None, None]
    np.testing.assert_allclose(p.apply(x), ref.transpose(0, 2, 3, 1), rtol=1e-6)
    assert Preprocess.from_options(size="4,6").apply(x).shape == (2, 3, 4, 6)
    assert Preprocess.from_options().is_default
    for kw in ({"std": "0"}, {"mean": "a"}, {"size": "0"}, {"layout": "NCWH"}, {"scale": 0}):
        with pytest.raises(DataError):
            Preprocess.from_options(**kw)
    with pytest.raises(DataError, match="3 channels"):
        Preprocess.from_options(mean="0.1,0.2").apply(x)


def test_normalised_model_evaluates_correctly_with_mean_std(tmp_path, capsys):
    """models/dense_small.onnx takes the normalised image (trained that way, no Normalize inside)."""
    model = str(REPO / "models" / "dense_small.onnx")
    n = 200
    x, y = load_fashion_mnist("test")
    x, y = x[:n], y[:n]
    xn = ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)
    want = float(np.mean(_ort(model, xn).argmax(1) == y))             # the independent reference
    wrong = float(np.mean(_ort(model, x).argmax(1) == y))
    assert want > 0.8 and want - wrong > 0.2                            # the preprocessing matters here
    out = tmp_path / "r.json"
    assert cli.main(["eval", model, "--data", "fashion-mnist", "--limit", str(n), "--mean", str(MEAN),
                     "--std", str(STD), "--sqnr-images", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["fp32_top1"] == pytest.approx(want, abs=1e-9) and r["n"] == n
    assert r["agreement"] > 0.9
    capsys.readouterr()


def test_inputs_and_labels_arrays_give_the_numbers_of_the_same_samples(tmp_path, capsys):
    model = normalised_input_model(str(tmp_path / "norm.onnx"))
    x, y = load_fashion_mnist("test")
    xn = ((x[:100] - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)
    np.save(tmp_path / "x.npy", xn.astype(np.float64))                 # float64 is cast to the model's float32
    np.save(tmp_path / "y.npy", y[:100])
    out = tmp_path / "r.json"
    assert cli.main(["eval", model, "--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                     "--sqnr-images", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    ref = _ort(model, xn)
    assert r["n"] == 100 and r["fp32_top1"] == pytest.approx(float(np.mean(ref.argmax(1) == y[:100])), abs=1e-9)
    capsys.readouterr()


def test_adapt_takes_inputs(tmp_path, capsys):
    model = normalised_input_model(str(tmp_path / "norm.onnx"))
    x = load_fashion_mnist("test")[0][:32]
    np.save(tmp_path / "x.npy", ((x - MEAN) / STD).astype(np.float32))
    out = tmp_path / "a.onnx"
    assert cli.main(["adapt", model, "--inputs", str(tmp_path / "x.npy"), "-o", str(out), "--rounding", "nearest"]) == 0
    assert out.exists()
    capsys.readouterr()


@pytest.mark.parametrize("array, msg", [
    (np.zeros((4, 28, 28), np.float32), "rank 3"),
    (np.zeros((4, 1, 28, 27), np.float32), "does not fit"),
    (np.zeros((4, 1, 28, 28), np.int64), "dtype int64"),
    (np.zeros((0, 1, 28, 28), np.float32), "no samples"),
    (np.full((2, 1, 28, 28), np.nan, np.float32), "nan"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, capsys, array, msg):
    model = normalised_input_model(str(tmp_path / "norm.onnx"))
    np.save(tmp_path / "x.npy", array)
    assert cli.main(["eval", model, "--inputs", str(tmp_path / "x.npy"), "--sqnr-images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsconv-tvm eval: error: --inputs") and msg in err[0], err
    with pytest.raises(DataError):
        load_inputs(str(tmp_path / "x.npy"), [1, 1, 28, 28])


def test_bad_labels_and_option_mixes(tmp_path, capsys):
    model = normalised_input_model(str(tmp_path / "norm.onnx"))
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 28, 28), np.float32))
    np.save(tmp_path / "y2.npy", np.zeros(2, np.int64))
    np.save(tmp_path / "yf.npy", np.array([0.5, 1, 2]))
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    for argv, msg in ((["--inputs", "x.npy", "--labels", "y2.npy"], "2 labels for 3"),
                      (["--inputs", "x.npy", "--labels", "yf.npy"], "non-integer"),
                      (["--inputs", "bad.npy"], "not a numpy"),
                      (["--inputs", "missing.npy"], "no such file"),
                      (["--inputs", "x.npy", "--mean", "0.5"], "taken as they are"),
                      (["--data", "fashion-mnist", "--labels", "y2.npy"], "goes with --inputs"),
                      (["--data", "fashion-mnist", "--size", "32"], "use --size/--layout")):
        argv = [a if not a.endswith(".npy") else str(tmp_path / a) for a in argv]
        assert cli.main(["eval", model, *argv, "--sqnr-images", "0"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (argv, err)
    with pytest.raises(DataError, match="negative"):
        np.save(tmp_path / "yn.npy", np.array([-1, 0, 1]))
        load_labels(str(tmp_path / "yn.npy"), 3)
