"""Tests of the DSConv weight quantizer (dsconv_tvm.weights) against independent brute-force code."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsconv_tvm.scheme import weights as W
from dsconv_tvm.errors import ConfigError, NumericsError
from dsconv_tvm.scheme.weights import QuantizedWeight, fit_error, quantize_weight
from dsconv_tvm.frontend.batchnorm import fold_batchnorm
from dsconv_tvm.scheme.metrics import sqnr_db as weight_sqnr_db

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def _weights(seed: int, shape, dist: str = "gauss", dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) if dist == "gauss" else rng.laplace(size=shape)
    return (w * 0.05).astype(dtype)


def _slices(shape, block):
    """Yield (co, g, kh, kw, channel slice) for every slice, by plain loops."""
    co, ci, kh, kw = shape
    for o in range(co):
        for g in range(-(-ci // block)):
            for i in range(kh):
                for j in range(kw):
                    yield o, g, i, j, slice(g * block, min((g + 1) * block, ci))


def _ref_l2(w: np.ndarray, bits: int, block: int):
    """The paper's L2 fit, one slice at a time."""
    L = 2 ** (bits - 1)
    co, ci, kh, kw = w.shape
    q = np.zeros(w.shape, np.int64)
    xi = np.zeros((co, -(-ci // block), kh, kw))
    for o, g, i, j, c in _slices(w.shape, block):
        s = w[o, c, i, j].astype(np.float64)
        a = s[np.argmax(np.abs(s))]
        if a == 0:
            continue
        t = -a / L
        qs = np.clip(np.rint(s / t), -L, L - 1)
        q[o, c, i, j] = qs
        xi[o, g, i, j] = s @ qs / (qs @ qs)
    return q, xi


def _slice_errors(w: np.ndarray, qw: QuantizedWeight) -> np.ndarray:
    d = (w.astype(np.float64) - qw.dequantize().astype(np.float64)) ** 2
    err = np.zeros(qw.xi.shape)
    for o, g, i, j, c in _slices(w.shape, qw.block):
        err[o, g, i, j] = d[o, c, i, j].sum()
    return err


def _slice_norms(w: np.ndarray, block: int) -> np.ndarray:
    co, ci, kh, kw = w.shape
    n = np.zeros((co, -(-ci // block), kh, kw))
    for o, g, i, j, c in _slices(w.shape, block):
        n[o, g, i, j] = (w[o, c, i, j].astype(np.float64) ** 2).sum()
    return n


shapes = st.tuples(st.integers(1, 4), st.integers(1, 80), st.integers(1, 3), st.integers(1, 3))


@SETTINGS
@given(shape=shapes, bits=st.integers(2, 8), block=st.integers(1, 70), seed=st.integers(0, 10**6),
       dist=st.sampled_from(["gauss", "laplace"]))
def test_l2_matches_bruteforce(shape, bits, block, seed, dist):
    w = _weights(seed, shape, dist)
    qw = quantize_weight(w, bits, block, fit="l2")
    q_ref, xi_ref = _ref_l2(w, bits, block)
    assert qw.q.dtype == np.int8 and qw.q.shape == w.shape
    assert qw.xi.dtype == np.float32 and qw.xi.shape == xi_ref.shape
    assert qw.groups == -(-shape[1] // block)
    np.testing.assert_array_equal(qw.q, q_ref)
    np.testing.assert_allclose(qw.xi, xi_ref, rtol=1e-6, atol=0)


@SETTINGS
@given(shape=shapes, bits=st.integers(2, 8), block=st.integers(1, 70), seed=st.integers(0, 10**6),
       dist=st.sampled_from(["gauss", "laplace"]))
def test_mse_never_worse_than_l2_per_slice(shape, bits, block, seed, dist):
    w = _weights(seed, shape, dist)
    e_l2 = _slice_errors(w, quantize_weight(w, bits, block, fit="l2"))
    e_mse = _slice_errors(w, quantize_weight(w, bits, block, fit="mse"))
    tol = 1e-6 * e_l2 + 1e-12 * _slice_norms(w, block)  # float32 rounding of q*xi in dequantize()
    assert np.all(e_mse <= e_l2 + tol)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_at_least_as_good_as_bruteforce_grid(bits):
    """Per slice, mse beats the best float64 brute-force LS fit over its own alpha grid."""
    w = _weights(bits, (3, 20, 2, 2), "laplace", np.float64)
    block, L = 8, 2 ** (bits - 1)
    qw = quantize_weight(w, bits, block, fit="mse")
    err = _slice_errors(w, qw)
    for o, g, i, j, c in _slices(w.shape, block):
        s = w[o, c, i, j]
        t0 = -s[np.argmax(np.abs(s))] / L
        best = min(float(((s - (s @ q) / (q @ q) * q) ** 2).sum())
                   for q in (np.clip(np.rint(s / (al * t0)), -L, L - 1) for al in W.alpha_grid(bits)))
        assert err[o, g, i, j] <= best * (1 + 1e-4) + 1e-15


def test_alpha_grid():
    for bits in range(2, 9):
        g = W.alpha_grid(bits)
        assert g[-1] == 1.0 and np.all(np.diff(g) > 0) and g[0] >= 0.25 and len(g) == W.ALPHA_POINTS
    assert W.alpha_grid(8)[0] == pytest.approx(1 - 4 / 128)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("fit", ["l2", "mse"])
def test_q_clamp_range(bits, fit):
    w = _weights(bits, (4, 37, 3, 3), "laplace")
    qw = quantize_weight(w, bits, 16, fit=fit)
    assert qw.q.dtype == np.int8
    assert qw.q.min() >= -(2 ** (bits - 1)) and qw.q.max() <= 2 ** (bits - 1) - 1
    if fit == "l2":  # the largest-magnitude element of each slice maps to exactly -2**(b-1)
        for o, g, i, j, c in _slices(w.shape, 16):
            k = np.argmax(np.abs(w[o, c, i, j]))
            assert qw.q[o, c, i, j][k] == -(2 ** (bits - 1))


@pytest.mark.parametrize("fit", ["l2", "mse"])
def test_xi_is_least_squares(fit):
    w = _weights(7, (3, 50, 3, 1), "gauss")
    qw = quantize_weight(w, 3, 16, fit=fit)
    for o, g, i, j, c in _slices(w.shape, 16):
        qs = qw.q[o, c, i, j].astype(np.float64)[:, None]
        ls = np.linalg.lstsq(qs, w[o, c, i, j].astype(np.float64), rcond=None)[0][0]
        assert qw.xi[o, g, i, j] == pytest.approx(ls, rel=1e-6, abs=1e-30)


def test_dequantize_partial_block_loops():
    rng = np.random.default_rng(3)
    q = rng.integers(-8, 8, size=(2, 11, 2, 3)).astype(np.int8)
    xi = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)  # block 4: 4 + 4 + 3 channels
    qw = QuantizedWeight(q=q, xi=xi, bits=4, block=4)
    assert qw.groups == 3
    expected = np.zeros(q.shape, np.float32)
    for o in range(2):
        for c in range(11):
            for i in range(2):
                for j in range(3):
                    expected[o, c, i, j] = np.float32(q[o, c, i, j]) * xi[o, c // 4, i, j]
    out = qw.dequantize()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


@SETTINGS
@given(shape=shapes, bits=st.integers(2, 8), block=st.integers(1, 70), seed=st.integers(0, 10**6),
       fit=st.sampled_from(["l2", "mse"]))
def test_representable_weight_is_exact(shape, bits, block, seed, fit):
    """w = xi * q with the slice's largest magnitude at q = -2**(b-1) is reproduced exactly."""
    rng = np.random.default_rng(seed)
    L = 2 ** (bits - 1)
    co, ci, kh, kw = shape
    g = -(-ci // block)
    q = rng.integers(-L + 1, L, size=shape)
    xi = rng.integers(1, 4096, size=(co, g, kh, kw)) * rng.choice([-1.0, 1.0], size=(co, g, kh, kw))
    xi = xi * 2.0 ** rng.integers(-20, 0, size=xi.shape)
    for o, gg, i, j, c in _slices(shape, block):
        q[o, c.start + rng.integers(0, c.stop - c.start), i, j] = -L
    w = q * np.repeat(xi, block, axis=1)[:, :ci]
    qw = quantize_weight(w, bits, block, fit=fit)
    np.testing.assert_array_equal(qw.q, q)
    np.testing.assert_array_equal(qw.xi, xi.astype(np.float32))
    np.testing.assert_array_equal(qw.dequantize(), w.astype(np.float32))
    assert fit_error(w, qw) == 0.0 and weight_sqnr_db(w, qw.dequantize()) == math.inf


@pytest.mark.parametrize("fit", ["l2", "mse"])
@pytest.mark.parametrize("bits", [2, 5, 8])
def test_block_one_is_exact(fit, bits):
    w = _weights(11, (5, 7, 3, 3), "laplace")
    qw = quantize_weight(w, bits, 1, fit=fit)
    assert qw.xi.shape == (5, 7, 3, 3)
    np.testing.assert_array_equal(qw.dequantize(), w)


def test_zero_slices_and_block_larger_than_ci():
    w = _weights(5, (3, 10, 1, 2), "gauss")
    w[1] = 0.0
    w[2, 4:] = 0.0
    for fit in ("l2", "mse"):
        qw = quantize_weight(w, 4, 4, fit=fit)
        assert np.all(qw.q[1] == 0) and np.all(qw.xi[1] == 0)
        assert np.all(qw.xi[2, 1:] == 0) and np.all(qw.q[2, 4:] == 0)
        big = quantize_weight(w, 4, 64, fit=fit)  # one block holding all 10 channels
        assert big.groups == 1 and big.xi.shape == (3, 1, 1, 2)
        q_ref, xi_ref = _ref_l2(w, 4, 64)
        if fit == "l2":
            np.testing.assert_array_equal(big.q, q_ref)
    z = quantize_weight(np.zeros((2, 3, 1, 1)), 4, 2)
    assert np.all(z.q == 0) and np.all(z.xi == 0) and fit_error(np.zeros((2, 3, 1, 1)), z) == 0.0


def test_input_dtypes_and_chunking(monkeypatch):
    w = _weights(2, (9, 40, 3, 3), "gauss", np.float64)
    ref = quantize_weight(w, 4, 32, "mse")
    for dt in (np.float32, np.float16):
        qw = quantize_weight(w.astype(dt), 4, 32)
        assert fit_error(w.astype(dt), qw) < 0.02
    assert quantize_weight(np.rint(w * 100).astype(np.int32), 4, 32).xi.dtype == np.float32
    monkeypatch.setattr(W, "_CHUNK_ELEMS", 500)  # several output channels per chunk -> many chunks
    small = quantize_weight(w, 4, 32, "mse")
    np.testing.assert_array_equal(small.q, ref.q)
    np.testing.assert_array_equal(small.xi, ref.xi)


def test_mse_improves_on_l2_in_aggregate():
    w = _weights(9, (32, 64, 3, 3), "gauss")
    for bits in (2, 4, 8):
        e_l2 = fit_error(w, quantize_weight(w, bits, 32, fit="l2"))
        e_mse = fit_error(w, quantize_weight(w, bits, 32, fit="mse"))
        assert e_mse < 0.97 * e_l2


def _conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Direct valid conv, stride 1: y[n,o,p,q] = sum_{c,i,j} x[n,c,p+i,q+j] w[o,c,i,j]."""
    n, ci, h, wd = x.shape
    co, _, kh, kw = w.shape
    y = np.zeros((n, co, h - kh + 1, wd - kw + 1))
    for p in range(h - kh + 1):
        for q in range(wd - kw + 1):
            y[:, :, p, q] = np.einsum("ncij,ocij->no", x[:, :, p:p + kh, q:q + kw], w)
    return y


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_batchnorm_matches_direct(with_bias):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32) if with_bias else None
    gamma, beta, mean = rng.standard_normal((3, 4))
    var, eps = rng.uniform(0.1, 2.0, 4), 1e-5
    b = np.zeros(4) if bias is None else bias.astype(np.float64)
    y = _conv(x, w.astype(np.float64)) + b[:, None, None]
    bn = (y - mean[:, None, None]) / np.sqrt(var + eps)[:, None, None] * gamma[:, None, None] \
        + beta[:, None, None]
    wf, bf = fold_batchnorm(w, bias, gamma, beta, mean, var, eps)
    assert wf.dtype == np.float32 and bf.dtype == np.float32 and wf.shape == w.shape and bf.shape == (4,)
    np.testing.assert_allclose(_conv(x, wf.astype(np.float64)) + bf[:, None, None], bn,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError):
        fold_batchnorm(w, bias, gamma[:3], beta, mean, var, eps)


def test_float16_scales():
    w = _weights(6, (4, 40, 3, 3), "laplace")
    q32 = quantize_weight(w, 4, 16, fit="l2")
    q16 = quantize_weight(w, 4, 16, fit="l2", scale_dtype="float16")
    assert q16.xi.dtype == np.float32
    np.testing.assert_array_equal(q16.xi, q16.xi.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(q16.q, q32.q)  # q first, then xi rounded
    np.testing.assert_allclose(q16.xi, q32.xi, rtol=2.0 ** -11, atol=0)
    m16 = quantize_weight(w, 4, 16, fit="mse", scale_dtype="float16")
    np.testing.assert_array_equal(m16.xi, m16.xi.astype(np.float16).astype(np.float32))
    assert fit_error(w, m16) <= fit_error(w, q16) * (1 + 1e-6)
    with pytest.raises(NumericsError, match="float16"):
        quantize_weight(np.full((1, 4, 1, 1), 1e6, np.float32), 2, 4, scale_dtype="float16")


def test_deployed_bytes():
    qw = quantize_weight(_weights(1, (8, 70, 3, 3)), 4, 32)
    assert qw.groups == 3
    n = 8 * 70 * 9
    assert qw.deployed_bytes() == math.ceil(n * 4 / 8) + 8 * 3 * 9 * 4
    assert qw.deployed_bytes("float16") == math.ceil(n * 4 / 8) + 8 * 3 * 9 * 2
    q3 = quantize_weight(_weights(1, (1, 3, 1, 1)), 3, 32)
    assert q3.deployed_bytes() == math.ceil(9 / 8) + 4
    with pytest.raises(ConfigError):
        qw.deployed_bytes("bfloat16")


def test_error_metrics():
    w = np.array([3.0, 4.0]).reshape(1, 2, 1, 1)
    assert weight_sqnr_db(w, w) == math.inf
    assert weight_sqnr_db(w, w * 0.9) == pytest.approx(10 * math.log10(25 / 0.25))
    qw = QuantizedWeight(q=np.array([3, 4], np.int8).reshape(1, 2, 1, 1),
                         xi=np.full((1, 1, 1, 1), 0.5, np.float32), bits=4, block=2)
    assert fit_error(w, qw) == pytest.approx(0.25)


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(bits=1), ConfigError, "bits=1"),
    (dict(bits=9), ConfigError, "bits=9"),
    (dict(block=0), ConfigError, "block=0"),
    (dict(fit="kl"), ConfigError, "'kl'"),
    (dict(scale_dtype="int8"), ConfigError, "'int8'"),
])
def test_config_errors(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        quantize_weight(_weights(0, (2, 4, 1, 1)), **kwargs)


def test_shape_and_nan_errors():
    with pytest.raises(ConfigError, match="4-D"):
        quantize_weight(np.ones((2, 3, 3)))
    w = _weights(0, (2, 4, 3, 3))
    w[1, 2, 0, 1] = np.nan
    with pytest.raises(NumericsError, match=r"NaN/Inf at index \(1, 2, 0, 1\)"):
        quantize_weight(w)
    w[1, 2, 0, 1] = np.inf
    with pytest.raises(NumericsError):
        quantize_weight(w, fit="l2")


def test_speed_512x512x3x3():
    w = _weights(8, (512, 512, 3, 3), "gauss")
    t = time.perf_counter()
    qw = quantize_weight(w, 4, 32, fit="mse")
    assert time.perf_counter() - t < 10.0
    assert fit_error(w, qw) < 0.01


def test_refinement_helps_and_never_hurts(monkeypatch):
    w = _weights(10, (16, 64, 3, 3), "gauss")
    refined = quantize_weight(w, 8, 32, "mse")
    monkeypatch.setattr(W, "REFINE_STEPS", 0)
    plain = quantize_weight(w, 8, 32, "mse")
    e_r, e_p = _slice_errors(w, refined), _slice_errors(w, plain)
    assert np.all(e_r <= e_p * (1 + 1e-6) + 1e-12 * _slice_norms(w, 32))
    assert e_r.sum() < 0.998 * e_p.sum()
