"""The decoder's building blocks, each against its definition."""

import numpy as np

from minislm.config import RopeConfig
from minislm.model import apply_rope, attention_mask, layer_norm, rms_norm, rope_inv_freq, rope_tables, silu, softmax

PLAIN = RopeConfig("default", 10000.0, rotary_dim=8, original_max_position_embeddings=4096)


def test_rms_norm_gives_unit_root_mean_square():
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32) * 7
    y = rms_norm(x, np.ones(64, dtype=np.float32), 1e-6)
    assert np.allclose(np.sqrt(np.mean(y * y, axis=-1)), 1.0, atol=1e-5)


def test_layer_norm_gives_zero_mean_unit_variance_then_scales_and_shifts():
    x = np.random.default_rng(0).normal(3.0, 7.0, size=(3, 64)).astype(np.float32)
    y = layer_norm(x, np.ones(64, dtype=np.float32), np.zeros(64, dtype=np.float32), 1e-6)
    assert np.allclose(y.mean(-1), 0.0, atol=1e-5) and np.allclose(y.var(-1), 1.0, atol=1e-4)
    weight, bias = np.full(64, 2.0, dtype=np.float32), np.full(64, 0.5, dtype=np.float32)
    assert np.allclose(layer_norm(x, weight, bias, 1e-6), 2.0 * y + 0.5, atol=1e-5)


def test_silu_is_x_times_sigmoid_and_never_overflows():
    x = np.array([-1000.0, -3.0, 0.0, 2.0, 1000.0], dtype=np.float32)
    with np.errstate(all="raise"):
        y = silu(x)
    assert np.allclose(y[1:4], x[1:4] / (1 + np.exp(-x[1:4])))
    assert y[0] == 0.0 and y[-1] == 1000.0


def test_softmax_flushes_subnormal_probabilities():
    p = softmax(np.array([[0.0, -100.0, -np.inf]], dtype=np.float32))
    assert p.tolist() == [[1.0, 0.0, 0.0]]  # exp(-100) ~ 4e-44 would be a subnormal


def test_rope_rotates_pairs_i_and_i_plus_half():
    """Rotate-half: only dims i and i + d/2 mix; adjacent dims (2i, 2i+1) do not."""
    cos, sin = rope_tables(PLAIN, np.array([3]), long=False)
    for i in range(8):
        x = np.zeros((1, 1, 8), dtype=np.float32)
        x[..., i] = 1.0
        y = apply_rope(x, cos, sin)[0, 0]
        partner = (i + 4) % 8
        assert set(np.flatnonzero(np.abs(y) > 1e-7)) <= {i, partner}


def test_rope_preserves_norms_and_relative_positions():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, 1, 8)).astype(np.float32)
    def rotated(x, pos):
        cos, sin = rope_tables(PLAIN, np.array([pos]), long=False)
        return apply_rope(x, cos, sin)
    assert np.isclose(np.linalg.norm(rotated(q, 17)), np.linalg.norm(q), rtol=1e-5)
    # the attention score depends only on the distance between positions
    assert np.isclose(np.sum(rotated(q, 10) * rotated(k, 7)), np.sum(rotated(q, 103) * rotated(k, 100)), rtol=1e-4)


def test_partial_rotary_leaves_the_tail_untouched():
    rope = RopeConfig("default", 10000.0, rotary_dim=4, original_max_position_embeddings=4096)
    x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float32)
    cos, sin = rope_tables(rope, np.arange(3), long=False)
    assert np.array_equal(apply_rope(x, cos, sin)[..., 4:], x[..., 4:])


def test_longrope_factors_divide_frequencies_and_scale_cos_sin():
    rope = RopeConfig("longrope", 10000.0, 4, 16, short_factor=(1.0, 2.0), long_factor=(4.0, 8.0), short_scale=1.5, long_scale=1.5)
    plain = RopeConfig("default", 10000.0, 4, 16)
    assert np.allclose(rope_inv_freq(rope, long=True) * [4.0, 8.0], rope_inv_freq(plain, long=False))
    assert np.allclose(rope_inv_freq(rope, long=False) * [1.0, 2.0], rope_inv_freq(plain, long=False))
    cos, sin = rope_tables(rope, np.array([0]), long=False)
    assert np.allclose(cos, 1.5) and np.allclose(sin, 0.0)


def test_sliding_window_sees_exactly_w_keys():
    allowed = attention_mask(np.arange(10), 10, sliding_window=3)
    assert allowed.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    assert allowed[9].tolist() == [False] * 7 + [True] * 3  # q - w < k <= q


def test_causal_mask_for_a_decode_step():
    allowed = attention_mask(np.array([5]), 6, None)
    assert allowed.tolist() == [[True] * 6]
