"""``dsconv-tvm adapt``: no label is read, the layer-wise objective goes down (checked against the numpy
DSConv directly), and the compiled adapted model equals its numpy reference."""

import json
import os

import numpy as np
import onnx
import pytest

from dsconv_tvm.accuracy import datasets

from dsconv_tvm.cli import main as cli
from dsconv_tvm.accuracy.adapt import adapt_model, fit_layer
from dsconv_tvm.config import DSConvConfig
from dsconv_tvm.scheme.geometry import ConvGeometry
from dsconv_tvm.scheme.reference import dsconv2d
from dsconv_tvm.scheme.weights import quantize_weight

from conftest import compiled_vs_reference, residual_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _float_conv(x, w, bias, geom):
    """Plain float64 conv (NCHW/OIHW), independent of the DSConv code."""
    pt, pl, pb, pr = geom.padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    n, _, h, wd = x.shape
    co, _, kh, kw = w.shape
    oh, ow = geom.out_size(h, wd, kh, kw)
    y = np.zeros((n, co, oh, ow))
    for i in range(kh):
        for j in range(kw):
            win = xp[:, :, i:i + oh, j:j + ow]
            y += np.einsum("nchw,oc->nohw", win, w[:, :, i, j].astype(np.float64))
    return (y + bias[None, :, None, None]).astype(np.float32)


@pytest.mark.parametrize("bits,block,unsigned", [(4, 8, True), (3, 16, False), (2, 5, True)])
def test_fit_layer_lowers_the_error_it_reports(bits, block, unsigned):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((12, 20, 3, 3)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(12) * 0.1).astype(np.float32)
    x = rng.standard_normal((6, 20, 9, 9)).astype(np.float32)
    if unsigned:
        x = np.maximum(x, 0)
    geom = ConvGeometry((1, 1), (1, 1, 1, 1), (1, 1))
    # the teacher: the float conv on a slightly different input (as upstream error would make it)
    y = _float_conv(x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), w, bias, geom)
    qw = quantize_weight(w, bits, block, "l2")
    xi, b, e0, e1, changed = fit_layer(x, y, qw.q, qw.xi, bias, block, 8, geom, unsigned)
    assert xi.shape == qw.xi.shape and xi.dtype == np.float32 and b.shape == (12,)
    assert changed > 0 and e1 < e0

    def rel_err(xi_, b_):
        out = dsconv2d(x, qw.q, xi_, block, 8, geom, b_, unsigned)
        return float(np.sum((out.astype(np.float64) - y) ** 2) / np.sum(y.astype(np.float64) ** 2))

    # the errors fit_layer reports (from its normal equations) are the numpy DSConv's errors
    assert rel_err(qw.xi, bias) == pytest.approx(e0, rel=1e-3)
    assert rel_err(xi, b) == pytest.approx(e1, rel=1e-3)
    assert rel_err(xi, b) < rel_err(qw.xi, bias)
    # the output adapt propagates to the next layer is the numpy DSConv's (to float32 summation order)
    *_, y_new = fit_layer(x, y, qw.q, qw.xi, bias, block, 8, geom, unsigned, want_output=True)
    ref = dsconv2d(x, qw.q, xi, block, 8, geom, b, unsigned)
    np.testing.assert_allclose(y_new, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.fixture(scope="module")
def residual(tmp_path_factory):
    return residual_model(str(tmp_path_factory.mktemp("m") / "resblock.onnx"))


@pytest.mark.parametrize("cfg", [DSConvConfig(block=8), DSConvConfig(bits=3, block=4, mantissa=6, first_layer="dsconv")],
                         ids=["W4B8", "W3B4m6-first"])
def test_adapted_model_compiles_to_its_numpy_reference(residual, tmp_path, cfg):
    x = np.random.default_rng(0).random((48, 3, 20, 20)).astype(np.float32)
    out = str(tmp_path / "adapted.onnx")
    res = adapt_model(residual, x, cfg, out)
    assert len(res.layers) >= 3
    assert all(f.err_after <= f.err_before for f in res.layers)
    assert sum(f.err_after for f in res.layers) < sum(f.err_before for f in res.layers)
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["dsconv_tvm.adapted"])["bits"] == cfg.bits
    # compile re-derives exactly the adapted integers, and the .so equals the numpy reference model
    result, _ = compiled_vs_reference(out, str(tmp_path / "a.so"), cfg)
    for layer in result.report.converted:
        ref = quantize_weight(onnx_weight(out, layer.name), cfg.bits, cfg.block, "l2")
        assert np.array_equal(layer.quantized.q, ref.q)


def onnx_weight(path, node_name):
    m = onnx.load(path)
    node = next(n for n in m.graph.node if n.name == node_name)
    init = {i.name: i for i in m.graph.initializer}
    return onnx.numpy_helper.to_array(init[node.input[1]])


def test_adapt_cli_never_reads_labels(monkeypatch, tmp_path, capsys):
    real = datasets._read_idx

    def images_only(path, magic):
        if "labels" in os.path.basename(path) or magic == datasets._LABELS_MAGIC:
            raise AssertionError(f"adapt read a label file: {path}")
        return real(path, magic)

    def no_labels(*a, **k):
        raise AssertionError("adapt called load_fashion_mnist (images + labels)")

    monkeypatch.setattr(datasets, "_read_idx", images_only)
    monkeypatch.setattr(datasets, "load_fashion_mnist", no_labels)
    out = str(tmp_path / "ms.onnx")
    rc = cli.main(["adapt", os.path.join(REPO, "models", "mobilenet_small.onnx"), "--data",
                   "fashion-mnist-unlabelled", "--limit", "64", "-o", out])
    assert rc == 0 and os.path.isfile(out)
    text = capsys.readouterr().out
    assert "objective" in text and "64 unlabelled images" in text


def test_adapt_bad_options(tmp_path, capsys):
    model = os.path.join(REPO, "models", "mobilenet_small.onnx")
    assert cli.main(["adapt", model, "--data", "fashion-mnist-unlabelled", "--fit", "mse",
                     "-o", str(tmp_path / "a.onnx")]) == 2
    assert "--fit l2" in capsys.readouterr().err
    assert cli.main(["adapt", model, "--images", str(tmp_path / "nope"), "-o", str(tmp_path / "a.onnx")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a.onnx")


def test_gptq_rounding_lowers_the_output_error_and_keeps_anchors():
    from dsconv_tvm.accuracy.adapt import gptq_round, input_hessian

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((10, 24, 3, 3)) * 0.1).astype(np.float32)
    # correlated inputs (as real activations are): mixing of a few latent channels
    x = np.einsum("nlhw,lc->nchw", rng.standard_normal((8, 6, 10, 10)), rng.standard_normal((6, 24)))
    x = x.astype(np.float32)
    geom = ConvGeometry((1, 1), (1, 1, 1, 1), (1, 1))
    qw = quantize_weight(w, 3, 8, "l2")
    q = gptq_round(w, qw.xi, 3, 8, input_hessian(x, 3, 3, geom))
    assert q.dtype == np.int8 and q.min() >= -4 and q.max() <= 3
    # compile's l2 fit re-derives exactly these integers from xi * q
    w_new = q.astype(np.float32) * np.repeat(qw.xi, 8, axis=1)[:, :24]
    assert np.array_equal(quantize_weight(w_new, 3, 8, "l2").q, q)

    def out_err(qq):
        wd = qq.astype(np.float64) * np.repeat(qw.xi, 8, axis=1)[:, :24]
        zero = np.zeros(10, np.float32)
        return float(np.sum((_float_conv(x, w, zero, geom).astype(np.float64)
                             - _float_conv(x, wd, zero, geom)) ** 2))

    assert out_err(q) < 0.8 * out_err(qw.q)
