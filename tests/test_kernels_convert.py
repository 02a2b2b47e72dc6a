"""kernels/convert.py: the loading-time conversions against their NumPy twins, exhaustively.

A half has only 65536 bit patterns, so every one of them is checked: widening is
exact and rounding to bf16 is the twin's own (`reference.f32_to_bf16`, which the
loader uses too), so both must be bit for bit equal; NaN and inf are counted,
never hidden.
"""

import numpy as np

from minislm.kernels import reference as ref
from minislm.kernels.convert import count_nonfinite_bf16, f16_to_bf16, widen_bf16, widen_f16

ALL_HALVES = np.arange(2**16, dtype=np.uint16)
NON_FINITE = int(np.count_nonzero(~np.isfinite(ALL_HALVES.view(np.float16))))  # 2 infs + 2046 NaNs


def test_every_half_widens_exactly():
    out = np.empty(ALL_HALVES.size, np.float32)
    bad = widen_f16(ALL_HALVES, out)
    expected = ref.widen_f16(ALL_HALVES)
    nan = np.isnan(expected)
    assert bad == NON_FINITE
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def test_every_bf16_widens_exactly():
    out = np.empty(ALL_HALVES.size, np.float32)
    bad = widen_bf16(ALL_HALVES, out)
    assert bad == int(np.count_nonzero(~np.isfinite(ref.bf16_to_f32(ALL_HALVES))))
    assert np.array_equal(out.view(np.uint32), ref.bf16_to_f32(ALL_HALVES).view(np.uint32))


def test_every_finite_half_rounds_to_the_same_bf16():
    out = np.empty(ALL_HALVES.size, np.uint16)
    bad = f16_to_bf16(ALL_HALVES, out)
    finite = np.isfinite(ALL_HALVES.view(np.float16))
    assert bad == NON_FINITE
    assert np.array_equal(out[finite], ref.f16_to_bf16(ALL_HALVES)[finite])


def test_a_reshaped_view_converts_in_place_of_a_matrix():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 91)).astype(np.float16)
    out = np.empty((37, 91), np.float32)
    assert widen_f16(w.view(np.uint16).reshape(-1), out.reshape(-1)) == 0
    assert np.array_equal(out, w.astype(np.float32))


def test_nonfinite_bf16_words_are_counted():
    words = np.array([[0x7F80, 0xFF80, 0x7FC1], [0x3F80, 0x7F7F, 0x0001]], np.uint16)  # inf, -inf, NaN | finite
    assert count_nonfinite_bf16(words) == 3
    assert count_nonfinite_bf16(ALL_HALVES) == int(np.count_nonzero(~np.isfinite(ref.bf16_to_f32(ALL_HALVES))))
