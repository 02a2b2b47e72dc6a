"""kernels/rowwise.py: LayerNorm, quick_gelu and the softmax against their NumPy twins.

The kernels sum in another order than NumPy (vector lanes instead of pairwise) and
take exp from `attention.exp_nonpositive` (within 2 ulp of libm), so they differ
from the twins by a few float32 ulp of the result: the tolerances below bound that
on the scales each operation meets in a vision tower. Sizes are awkward on purpose
(widths that are not multiples of the 16-lane vector, one row, one column).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.kernels import reference as ref
from minislm.kernels.rowwise import (
    add_residual, add_residual_in_place, layer_norm, layer_norm_rows, quick_gelu, quick_gelu_in_place, softmax_rows_in_place,
)

# LayerNorm's outputs are ~N(0, 1) * weight + bias with |weight|, |bias| <= 2: a few
# ulp of values up to ~20, plus the rounding of a mean over up to 4096 values.
ATOL_LAYER_NORM = 2e-5
# quick_gelu: the polynomial exp against tanh, relative to |z| (z * sigmoid(z) is
# never larger than |z|).
RTOL_QUICK_GELU, ATOL_QUICK_GELU = 4e-6, 1e-6
# softmax weights are <= 1; a few ulp of 1 plus the sum's rounding over <= 2000 keys.
ATOL_SOFTMAX = 2e-6

widths = st.sampled_from([1, 3, 16, 17, 64, 100, 1024, 1152])


def random(rng, shape, spread):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(spread)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), width=widths, spread=st.sampled_from([0.01, 1.0, 30.0]),
       offset=st.sampled_from([0.0, 30.0]), seed=st.integers(0, 2**16))
def test_layer_norm_equals_twin(rows, width, spread, offset, seed):
    """offset 30: a mean 30 times the spread, where E[x^2] - mean^2 would lose ~3 digits
    to cancellation; the kernel centres first like the twin. Each value then holds its
    deviation from the mean only to an ulp of the mean, so two summation orders may
    disagree by a few of those ulps, divided by the spread, times the weight."""
    rng = np.random.default_rng(seed)
    x = random(rng, (rows, width), spread) + np.float32(offset * spread)
    weight, bias = random(rng, width, 2.0), random(rng, width, 2.0)
    out = np.empty_like(x)
    layer_norm_rows(x, weight, bias, np.float32(1e-5), out)
    twin = ref.layer_norm_rows(x, weight, bias, 1e-5)
    ulps_of_the_mean = 4 * np.spacing(np.float32(offset * spread)) / spread * np.abs(weight).max()
    assert np.abs(out - twin).max() <= ATOL_LAYER_NORM + ulps_of_the_mean


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), width=widths, spread=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
       seed=st.integers(0, 2**16))
def test_quick_gelu_equals_twin(rows, width, spread, seed):
    """spread 100: |1.702 z| far past exp's range on both sides, where a sigmoid written
    as 1 / (1 + exp(-z)) would overflow."""
    rng = np.random.default_rng(seed)
    h, bias = random(rng, (rows, width), spread), random(rng, width, 1.0)
    twin = ref.quick_gelu(h, bias)
    quick_gelu_in_place(h, bias)
    assert np.allclose(h, twin, rtol=RTOL_QUICK_GELU, atol=ATOL_QUICK_GELU)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), keys=st.sampled_from([1, 2, 17, 64, 577, 1025]),
       spread=st.sampled_from([1.0, 30.0]), scale=st.sampled_from([0.125, 1.0]), seed=st.integers(0, 2**16))
def test_softmax_equals_twin(rows, keys, spread, scale, seed):
    """spread 30: peaked rows, where most weights fall below float32's smallest normal
    number and both set them to 0."""
    rng = np.random.default_rng(seed)
    scores = random(rng, (rows, keys), spread)
    twin = ref.softmax_rows(scores, scale)
    softmax_rows_in_place(scores, np.float32(scale))
    assert np.abs(scores - twin).max() <= ATOL_SOFTMAX
    assert not ((scores > 0) & (scores < ref.TINY)).any()  # no subnormal weights left


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 40), width=widths, seed=st.integers(0, 2**16))
def test_add_residual_equals_twin(rows, width, seed):
    """The same three additions in the same order: equal bit for bit."""
    rng = np.random.default_rng(seed)
    x, y, bias = random(rng, (rows, width), 10.0), random(rng, (rows, width), 1.0), random(rng, width, 1.0)
    twin = ref.add_residual(x, y, bias)
    add_residual_in_place(x, y, bias)
    np.testing.assert_array_equal(x, twin)


def test_softmax_finds_the_max_of_negative_rows():
    """The row max is an integer max over bit patterns turned sortable: negative
    numbers, -0 against +0 and -inf must order as floats do, or exp(x - max) overflows
    (a max too small) or every weight underflows to 0 (too large)."""
    scores = np.array([[-3.0, -1.0, -2.0, -50.0], [-0.0, 0.0, -1e-30, -np.inf], [-np.inf, -200.0, -100.0, -150.0]],
                      np.float32)
    twin = ref.softmax_rows(scores, 1.0)
    softmax_rows_in_place(scores, np.float32(1.0))
    assert np.abs(scores - twin).max() <= ATOL_SOFTMAX and np.allclose(scores.sum(axis=1), 1.0)


def test_peaked_softmax_row_is_one_hot():
    scores = np.array([[0.0, 1000.0, -1000.0, 999.0]], np.float32)
    softmax_rows_in_place(scores, np.float32(1.0))
    assert np.allclose(scores, [[0.0, 1 / (1 + np.exp(-1.0)), 0.0, np.exp(-1.0) / (1 + np.exp(-1.0))]], atol=1e-7)
    assert scores[0, 0] == 0.0 and scores[0, 2] == 0.0


def test_nan_reaches_the_output_and_stays_in_its_row():
    """A damaged weight must show downstream, not vanish into a max or a cutoff, and must
    not leak into other rows."""
    x = np.ones((3, 17), np.float32)
    x[1, 5] = np.nan
    out = np.empty_like(x)
    layer_norm_rows(x, np.ones(17, np.float32), np.zeros(17, np.float32), np.float32(1e-5), out)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    scores = x.copy()
    softmax_rows_in_place(scores, np.float32(1.0))
    assert np.isnan(scores[1]).all() and np.isfinite(scores[[0, 2]]).all()
    h = x.copy()
    quick_gelu_in_place(h, np.zeros(17, np.float32))
    assert np.isnan(h[1, 5]) and np.isfinite(np.delete(h.ravel(), 17 + 5)).all()


def test_infinities_in_quick_gelu_match_the_twin():
    h = np.array([[np.inf, -np.inf, 1e30, -1e30, 0.0]], np.float32)
    with np.errstate(invalid="ignore"):  # -inf * 0: NaN, in both
        twin = ref.quick_gelu(h, np.zeros(5, np.float32))
    quick_gelu_in_place(h, np.zeros(5, np.float32))
    np.testing.assert_array_equal(h, twin)


@pytest.mark.parametrize("shape", [(2, 5, 33), (7, 33)])
def test_wrappers_keep_the_shape_and_take_any_layout(shape):
    """The array-level wrappers take (..., D) of any dtype and memory layout."""
    rng = np.random.default_rng(0)
    x = np.asfortranarray(random(rng, shape, 1.0)).astype(np.float64)
    weight, bias = random(rng, shape[-1], 1.0), random(rng, shape[-1], 1.0)
    out = layer_norm(x, weight, bias, 1e-5)
    assert out.shape == shape and out.dtype == np.float32
    twin_ln = ref.layer_norm_rows(x.reshape(-1, shape[-1]).astype(np.float32), weight, bias, 1e-5).reshape(shape)
    assert np.abs(out - twin_ln).max() <= ATOL_LAYER_NORM
    h = random(rng, shape, 3.0)
    twin = ref.quick_gelu(h, bias)
    result = quick_gelu(h, bias)
    assert result.shape == shape and np.shares_memory(result, h)  # in place: no second (T, F) array
    assert np.allclose(result, twin, rtol=RTOL_QUICK_GELU, atol=ATOL_QUICK_GELU)
    out = np.full(shape, np.nan, np.float32)
    assert layer_norm(x, weight, bias, 1e-5, out=out) is out and np.abs(out - twin_ln).max() <= ATOL_LAYER_NORM
    stream, y = random(rng, shape, 1.0), np.asfortranarray(random(rng, shape, 1.0))
    twin = ref.add_residual(stream, y, bias)
    result = add_residual(stream, y, bias)
    assert result is stream  # the residual stream, updated in place
    np.testing.assert_array_equal(result, twin)
