"""kernels/conv.py: the Conformer's 3x3 stride-2 convolution against its NumPy twin.

The kernel adds the bias and then the nine taps in the same (dy, dx) order as the
twin, fusing each multiply-add; the twin rounds each product first. At most nine
products of unit-scale values per output: ATOL_CONV bounds those roundings. Sizes are
awkward on purpose: odd and even maps (the last row and column of an odd map see
padding on one side only), maps of one row or column, channel counts that are not
multiples of the vector width, and both the depthwise and the one-input-channel form.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.kernels import reference as ref
from minislm.kernels.conv import conv3x3_stride2, conv_relu_then_depthwise
from minislm.kernels.threads import row_bands

ATOL_CONV = 1e-5
# two convolutions: the first's rounding (<= ATOL_CONV) passes through nine taps of ~N(0, 1) weights
ATOL_CONV_TWICE = 1e-4


def run_kernel(x, taps, bias, relu):
    H, W, _ = x.shape
    out = np.empty(((H + 1) // 2, (W + 1) // 2, taps.shape[1]), np.float32)
    conv3x3_stride2(x, taps, bias, relu, out, 0, len(out))
    return out


@settings(max_examples=50, deadline=None)
@given(H=st.integers(1, 19), W=st.integers(1, 19), C=st.sampled_from([1, 2, 17, 64]),
       one_input_channel=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_equals_twin(H, W, C, one_input_channel, relu, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((H, W, 1 if one_input_channel else C), dtype=np.float32)
    taps, bias = rng.standard_normal((9, C), dtype=np.float32), rng.standard_normal(C, dtype=np.float32)
    fast, twin = run_kernel(x, taps, bias, relu), ref.conv3x3_stride2(x, taps, bias, relu)
    assert fast.shape == twin.shape == ((H + 1) // 2, (W + 1) // 2, C)
    assert np.abs(fast - twin).max() <= ATOL_CONV


def test_padding_is_zero_and_stride_is_two():
    """Output (i, j) reads rows 2i-1..2i+1 and columns 2j-1..2j+1 of the input, so a
    single 1 at (1, 1) of a 5x5 map reaches output (0, 0) through tap (dy, dx) = (2, 2)
    (its window starts in the padding), (0, 1) through (2, 0), (1, 0) through (0, 2),
    (1, 1) through (0, 0), and no other output."""
    x = np.zeros((5, 5, 1), np.float32)
    x[1, 1] = 1.0
    taps = np.arange(1, 10, dtype=np.float32)[:, None]  # tap 3 dy + dx has weight 3 dy + dx + 1
    out = run_kernel(x, taps, np.zeros(1, np.float32), False)[:, :, 0]
    expected = np.zeros((3, 3), np.float32)
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 9, 7, 3, 1
    np.testing.assert_array_equal(out, expected)


def test_relu_keeps_nan():
    """A NaN from a damaged weight reaches the output instead of being clipped to 0."""
    x = np.full((3, 3, 2), np.nan, np.float32)
    out = run_kernel(x, np.ones((9, 2), np.float32), np.zeros(2, np.float32), True)
    assert np.isnan(out).all()


def test_wrong_shapes_are_refused():
    x = np.zeros((4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="conv3x3_stride2"):
        conv3x3_stride2(x, np.zeros((9, 2), np.float32), np.zeros(2, np.float32), False, np.empty((2, 2, 2), np.float32), 0, 2)
    with pytest.raises(ValueError, match="conv3x3_stride2"):  # rows past the end of out
        conv3x3_stride2(x, np.zeros((9, 3), np.float32), np.zeros(3, np.float32), False, np.empty((2, 2, 3), np.float32), 0, 3)


@settings(max_examples=40, deadline=None)
@given(H=st.integers(1, 23), W=st.integers(1, 13), C=st.sampled_from([1, 17, 64]), bands=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_fused_pair_equals_two_twins(H, W, C, bands, seed):
    """conv.0 + ReLU then a depthwise conv in one kernel, whatever the split of the
    output rows into calls (each re-makes the first-map row it shares with the one above)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((H, W, 1), dtype=np.float32)
    taps0, taps1 = rng.standard_normal((9, C), dtype=np.float32), rng.standard_normal((9, C), dtype=np.float32)
    bias0, bias1 = rng.standard_normal(C, dtype=np.float32), rng.standard_normal(C, dtype=np.float32)
    twin = ref.conv3x3_stride2(ref.conv3x3_stride2(x, taps0, bias0, True), taps1, bias1, False)
    out = np.empty(twin.shape, np.float32)
    for lo, hi in row_bands(len(out), min(bands, len(out))):
        conv_relu_then_depthwise(x, taps0, bias0, taps1, bias1, out, lo, hi)
    assert np.abs(out - twin).max() <= ATOL_CONV_TWICE
