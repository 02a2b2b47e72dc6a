"""The fast grouped-query attention against its plain twin, and the mask it reads.

`plain_attention` is the definition (repeat each kv head for its query heads, full
score matrix, mask, softmax, values); `grouped_query_attention` stacks query heads
instead of copying keys, and the spine runs it in blocks of QUERY_BLOCK queries.
Both are float32 NumPy matmuls that differ only in how BLAS sums, so they agree to
float32 rounding: ATOL_SAME_MATH bounds that on unit-scale inputs.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.model import (
    QUERY_BLOCK,
    attention_mask,
    attention_probabilities,
    grouped_query_attention,
    plain_attention,
)

ATOL_SAME_MATH = 1e-5


def blocked(q, keys, values, allowed, scale):
    """What model.attention does with a long prompt: QUERY_BLOCK queries at a time."""
    out = np.empty_like(q)
    for start in range(0, q.shape[1], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        out[:, block] = grouped_query_attention(q[:, block], keys, values, allowed[block], scale)
    return out


@settings(max_examples=25, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([2, 8, 16]),
    cached=st.integers(0, 40),
    new=st.one_of(st.integers(1, 12), st.integers(QUERY_BLOCK - 2, QUERY_BLOCK + 40)),
    window=st.one_of(st.none(), st.integers(1, 300)),
    seed=st.integers(0, 2**16),
)
def test_grouped_attention_equals_plain_twin(kv_heads, group, head_dim, cached, new, window, seed):
    """Including prompts longer than one query block (T > 256: the second block reads the
    mask rows and keys of later queries) and sliding windows shorter than the prompt."""
    rng = np.random.default_rng(seed)
    H, S = kv_heads * group, cached + new
    q = rng.standard_normal((H, new, head_dim), dtype=np.float32)
    keys = rng.standard_normal((kv_heads, S, head_dim), dtype=np.float32)
    values = rng.standard_normal((kv_heads, S, head_dim), dtype=np.float32)
    allowed = attention_mask(np.arange(cached, S), S, window)
    scale = head_dim**-0.5
    fast = blocked(q, keys, values, allowed, scale)
    plain = plain_attention(q, keys, values, allowed, scale)
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
