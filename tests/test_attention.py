"""The model's attention against its definition, and the mask that definition reads.

`plain_attention` is the definition (repeat each kv head for its query heads, full
score matrix, mask, softmax, values). The model runs `attend_cached` over the
cache's own storage instead; on a float32 cache both compute in float32 and differ
only in summation order, so they agree to float32 rounding: ATOL_SAME_MATH bounds
that on unit-scale inputs. (The kernel's other storage formats are checked against
its NumPy twin in test_attention_kernel.py.)
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.kernels.attention import QUERY_TILE, attend_cached
from minislm.model import attention_mask, attention_probabilities, plain_attention

ATOL_SAME_MATH = 1e-5


@settings(max_examples=25, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([2, 8, 16]),
    cached=st.integers(0, 40),
    new=st.one_of(st.integers(1, 12), st.integers(QUERY_TILE - 2, 3 * QUERY_TILE + 5)),
    window=st.one_of(st.none(), st.integers(1, 60)),
    seed=st.integers(0, 2**16),
)
def test_model_attention_equals_plain_definition(kv_heads, group, head_dim, cached, new, window, seed):
    """Including prompts spanning several query tiles and sliding windows shorter than
    the prompt, over a float32 cache with unused capacity after the filled positions."""
    rng = np.random.default_rng(seed)
    H, S = kv_heads * group, cached + new
    q = rng.standard_normal((H, new, head_dim), dtype=np.float32)
    keys = rng.standard_normal((kv_heads, S + 5, head_dim), dtype=np.float32)
    values = rng.standard_normal((kv_heads, S + 5, head_dim), dtype=np.float32)
    scale = head_dim**-0.5
    allowed = attention_mask(np.arange(cached, S), S, window)
    fast = attend_cached(q, keys, values, None, None, allowed, scale)
    plain = plain_attention(q, keys[:, :S], values[:, :S], allowed, scale)
    assert fast.shape == (H, new, head_dim)
    assert np.abs(fast - plain).max() <= ATOL_SAME_MATH


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 30), cached=st.integers(0, 10), window=st.one_of(st.none(), st.integers(1, 12)), seed=st.integers(0, 999))
def test_probabilities_are_distributions_over_allowed_keys(T, cached, window, seed):
    rng = np.random.default_rng(seed)
    S = cached + T
    q = rng.standard_normal((4, T, 8), dtype=np.float32) * 3
    keys = rng.standard_normal((2, S, 8), dtype=np.float32) * 3
    allowed = attention_mask(np.arange(cached, S), S, window)
    probs = attention_probabilities(q, keys, allowed, 8**-0.5)
    assert probs.shape == (4, T, S)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert (probs[:, ~allowed] == 0).all()  # masked: the future, and keys past the window
    assert (probs >= 0).all()
