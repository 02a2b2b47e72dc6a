"""kernels/blocksparse.py: the Numba kernel against its NumPy twin.

Both take the same cache storage (float32, float16, int8 with per-position scales)
and a block layout per head; the twin masks a dense softmax, the kernel reads only
the allowed blocks. They differ in summation order and the kernel's polynomial exp:
ATOL_KERNEL, as for kernels/attention.py, on unit-scale values. Layouts here are
random (every query's own block allowed, as the model's pattern always does), sizes
awkward: blocks of 1 and 5, head dims that are not vector widths, GQA groups, a
cache longer than what is filled, prefills spanning several query tiles.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.kernels import reference as ref
from minislm.kernels.attention import QUERY_TILE
from minislm.kernels.blocksparse import attend_blocksparse, attend_blocksparse_kernel, attend_blocksparse_serial
from test_attention_kernel import storage  # random keys or values in a cache format

ATOL_KERNEL = 2e-5


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float16", "int8"]),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([1, 3, 8, 17]),
    block=st.sampled_from([1, 5, 16]),
    cached=st.integers(0, 60),
    new=st.integers(1, QUERY_TILE + 5),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_its_twin(dtype, kv_heads, group, head_dim, block, cached, new, seed):
    rng = np.random.default_rng(seed)
    H, S = kv_heads * group, cached + new
    keys, key_scales = storage(rng, kv_heads, S + 7, head_dim, dtype, 1.0)
    values, value_scales = storage(rng, kv_heads, S + 7, head_dim, dtype, 1.0)
    q = rng.standard_normal((H, new, head_dim), dtype=np.float32)
    positions = np.arange(cached, S)
    first, last = cached // block, (S - 1) // block
    layout = rng.random((H, last - first + 1, last + 1)) < 0.4
    layout[:, np.arange(last - first + 1), np.arange(first, last + 1)] = True  # each query's own block
    args = (q, keys, values, key_scales, value_scales, positions, layout, first, block, 0.3)
    expected = ref.attend_blocksparse(*args)
    assert np.abs(attend_blocksparse(*args) - expected).max() <= ATOL_KERNEL
    k, v = (keys.view(np.uint16), values.view(np.uint16)) if dtype == "float16" else (keys, values)
    ks = key_scales if key_scales is not None else np.zeros((0, 0), np.float32)
    vs = value_scales if value_scales is not None else np.zeros((0, 0), np.float32)
    for kernel in (attend_blocksparse_kernel, attend_blocksparse_serial):  # both threading paths
        out = np.empty_like(expected)
        kernel(q, k, v, ks, vs, positions, layout, first, block, np.float32(0.3), out)
        assert np.abs(out - expected).max() <= ATOL_KERNEL


def test_excluded_blocks_are_never_read():
    """NaN in every excluded block: the twin, which masks, is poisoned; the kernel is not."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 64, 8), dtype=np.float32)
    values = rng.standard_normal((2, 64, 8), dtype=np.float32)
    q = rng.standard_normal((4, 1, 8), dtype=np.float32)
    layout = np.zeros((4, 1, 8), bool)
    layout[:, 0, [0, 7]] = True  # the first and the own block (positions 0-7 and 56-60)
    clean = attend_blocksparse(q, keys, values, None, None, np.array([60]), layout, 7, 8, 0.3)
    keys[:, 8:56] = values[:, 8:56] = np.nan
    args = (q, keys, values, None, None, np.array([60]), layout, 7, 8, 0.3)
    assert np.array_equal(attend_blocksparse(*args), clean)
    assert np.isnan(ref.attend_blocksparse(*args)).all()


def test_a_layout_that_misses_the_queries_is_refused():
    q = np.zeros((2, 3, 4), np.float32)
    cache = np.zeros((1, 32, 4), np.float32)
    layout = np.ones((2, 1, 2), bool)  # block 1 only
    try:
        attend_blocksparse(q, cache, cache, None, None, np.arange(14, 17), layout, 1, 8, 1.0)  # 16 is in block 2
    except ValueError as e:
        assert "does not cover" in str(e)
    else:
        raise AssertionError("a layout without the queries' blocks must be refused")
