"""Block floating point activations (numpy reference), checked against their definition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dsconv_tvm.scheme.bfp import E_MIN, bfp_dequantize, bfp_quantize, bfp_roundtrip, block_exponents, fraction_bits, mantissa_range
from dsconv_tvm.errors import NumericsError

shapes = st.tuples(st.integers(1, 2), st.integers(1, 13), st.integers(1, 4), st.integers(1, 4))
floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), block=st.integers(1, 9), mantissa=st.integers(2, 8), unsigned=st.booleans())
def test_bfp_matches_definition(data, block, mantissa, unsigned):
    shape = data.draw(shapes)
    x = data.draw(hnp.arrays(np.float32, shape, elements=floats))
    if unsigned:
        x = np.abs(x)
    m, e = bfp_quantize(x, block, mantissa, unsigned)
    n, c, h, w = shape
    g = -(-c // block)
    assert m.shape == (n, g * block, h, w) and e.shape == (n, g, h, w)
    lo, hi = mantissa_range(mantissa, unsigned)
    assert m.min() >= lo and m.max() <= hi
    assert np.all(m[:, c:] == 0)
    f = fraction_bits(mantissa, unsigned)
    for gi in range(g):
        blk = np.abs(x[:, gi * block:(gi + 1) * block].astype(np.float64)).max(axis=1)
        eg = e[:, gi].astype(np.float64)
        nz = blk > 0
        # the shared exponent is the smallest with every |x| < 2^e
        assert np.all(blk[nz] < 2.0 ** eg[nz])
        big = nz & (eg > E_MIN)                     # below 2^E_MIN the exponent is clamped
        assert np.all(blk[big] >= 2.0 ** (eg[big] - 1))
        assert np.all(eg[~nz] == E_MIN)
    # mantissas are the rounded values (ties to even), clamped
    scale = np.repeat(2.0 ** (e.astype(np.float64) - f), block, axis=1)[:, :c]
    expect = np.clip(np.rint(x.astype(np.float64) / scale), lo, hi)
    assert np.array_equal(m[:, :c], expect)
    # and the round trip error is at most half a step, except where the top value saturated
    back = bfp_dequantize(m, e, block, mantissa, unsigned, c)
    err = np.abs(back.astype(np.float64) - x)
    r = np.rint(x / scale)
    sat = (r < lo) | (r > hi)
    assert np.all(err[~sat] <= 0.5 * scale[~sat] + 1e-30)
    assert np.all(err[sat] <= scale[sat] + 1e-30)


def test_known_values():
    x = np.array([0.75, -0.3, 0.0, 0.01], np.float32).reshape(1, 4, 1, 1)
    m, e = bfp_quantize(x, block=4, mantissa=4)              # max 0.75 -> e = 0, f = 3
    assert e.item() == 0
    assert m.ravel().tolist() == [6, -2, 0, 0]               # 0.75*8 = 6, -0.3*8 = -2.4 -> -2
    m, e = bfp_quantize(np.abs(x), block=4, mantissa=4, unsigned=True)   # f = 4
    assert m.ravel().tolist() == [12, 5, 0, 0]               # 0.3*16 = 4.8 -> 5


def test_signed_top_value_saturates():
    x = np.array([-0.999, 0.999], np.float32).reshape(1, 2, 1, 1)
    m, e = bfp_quantize(x, block=2, mantissa=8)
    assert e.item() == 0 and m.ravel().tolist() == [-128, 127]


def test_blocks_are_independent_per_pixel():
    x = np.zeros((1, 4, 1, 2), np.float32)
    x[0, :2, 0, 0] = [100.0, 0.001]     # block 0, pixel 0: large exponent, small value lost
    x[0, :2, 0, 1] = [0.001, 0.002]     # block 0, pixel 1: small exponent keeps it
    x[0, 2:, 0, 0] = [0.001, 0.0]
    e = block_exponents(x, 2)
    assert e[0, 0, 0, 0] == 7 and e[0, 0, 0, 1] == -8 and e[0, 1, 0, 0] == -9
    back = bfp_roundtrip(x, 2, 8)
    assert back[0, 1, 0, 0] == 0.0 and abs(back[0, 0, 0, 1] - 0.001) < 1e-5


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_rejected(bad):
    x = np.ones((1, 3, 2, 2), np.float32)
    x[0, 1, 1, 0] = bad
    with pytest.raises(NumericsError, match=r"index \(0, 1, 1, 0\)"):
        bfp_quantize(x, 2, 8)


def test_tiny_and_denormal_values_quantize_to_zero():
    x = np.array([1e-40, 1e-38], np.float32).reshape(1, 2, 1, 1)
    m, e = bfp_quantize(x, 2, 8)
    assert e.item() == E_MIN and np.all(m == 0)
