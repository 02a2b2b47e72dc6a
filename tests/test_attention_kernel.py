"""kernels/attention.py: the Numba kernel against its NumPy twin, and its scalar helpers.

`attend_cached` and its twin `reference.attend_cached` take the same storage (float32,
float16, int8 with per-position scales) and widen it the same exact way, so they
differ only in summation order and in the kernel's polynomial exp (within a few
ulp): ATOL_KERNEL bounds the difference on unit-scale values. Sizes are awkward on
purpose: head dims that are not multiples of the vector width, GQA groups, caches
longer than what is filled, windows of 1, prompts spanning several query tiles.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from minislm.kernels import reference as ref
from minislm.kernels.attention import (
    EXP_CUTOFF, QUERY_TILE, attend_cached, attend_cached_kernel, attend_cached_serial, exp_nonpositive,
    kernel_arrays, store_cached,
)
from minislm.model import attention_mask

ATOL_KERNEL = 2e-5


def storage(rng, kv_heads, capacity, head_dim, dtype, spread):
    """Random keys or values in the cache's format: (array, scales or None)."""
    x = rng.standard_normal((kv_heads, capacity, head_dim), dtype=np.float32) * spread
    if dtype == "int8":
        return ref.quantize_cache_int8(x)
    return x.astype(dtype), None


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float16", "int8"]),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    head_dim=st.sampled_from([1, 3, 8, 17, 96]),
    cached=st.integers(0, 70),
    new=st.one_of(st.integers(1, 3), st.integers(QUERY_TILE - 1, 2 * QUERY_TILE + 3)),
    slack=st.integers(0, 9),
    window=st.one_of(st.none(), st.integers(1, 40)),
    spread=st.sampled_from([1.0, 6.0]),  # 6: peaked softmax rows, many weights below TINY
    holes=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_twin(dtype, kv_heads, group, head_dim, cached, new, slack, window, spread, holes, seed):
    """Causal and sliding-window masks, and (holes) masks with gaps inside a row's span."""
    rng = np.random.default_rng(seed)
    capacity = cached + new + slack
    keys, key_scales = storage(rng, kv_heads, capacity, head_dim, dtype, spread)
    values, value_scales = storage(rng, kv_heads, capacity, head_dim, dtype, 1.0)
    q = rng.standard_normal((kv_heads * group, new, head_dim), dtype=np.float32)
    allowed = attention_mask(np.arange(cached, cached + new), cached + new, window)
    if holes:
        allowed &= rng.random(allowed.shape) < 0.7
        allowed[np.arange(new), cached + np.arange(new)] = True  # every query still sees itself
    args = (q, keys, values, key_scales, value_scales, allowed, head_dim**-0.5)
    fast, twin = attend_cached(*args), ref.attend_cached(*args)
    assert fast.shape == twin.shape == q.shape and fast.dtype == np.float32
    assert np.abs(fast - twin).max() <= ATOL_KERNEL


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("window", [None, 2047])
def test_long_cache_decode_equals_twin(dtype, window):
    """One query per head after 5000 cached positions (Phi-3-mini's head size and window)."""
    rng = np.random.default_rng(1)
    keys, key_scales = storage(rng, 2, 5003, 96, dtype, 1.0)
    values, value_scales = storage(rng, 2, 5003, 96, dtype, 1.0)
    q = rng.standard_normal((4, 1, 96), dtype=np.float32) * 3
    args = (q, keys, values, key_scales, value_scales, attention_mask(np.array([5000]), 5001, window), 96**-0.5)
    assert np.abs(attend_cached(*args) - ref.attend_cached(*args)).max() <= ATOL_KERNEL


def test_keys_outside_the_window_and_the_future_are_never_read():
    """NaN in every position a query must not see would poison any sum that read it."""
    rng = np.random.default_rng(2)
    keys = np.full((1, 30, 8), np.nan, np.float32)
    values = np.full((1, 30, 8), np.nan, np.float32)
    keys[:, 10:20] = rng.standard_normal((1, 10, 8))
    values[:, 10:20] = rng.standard_normal((1, 10, 8))
    q = rng.standard_normal((2, 3, 8), dtype=np.float32)
    allowed = attention_mask(np.arange(17, 20), 20, 8)  # queries at 17, 18, 19 see keys 10..19 at most
    out = attend_cached(q, keys, values, None, None, allowed, 0.5)
    assert np.isfinite(out).all()
    keys, values = np.nan_to_num(keys), np.nan_to_num(values)  # the twin multiplies by masked keys too
    assert np.abs(out - ref.attend_cached(q, keys, values, None, None, allowed, 0.5)).max() <= ATOL_KERNEL


def test_a_query_that_sees_no_key_gets_zeros_like_the_twin():
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((1, 4, 8), dtype=np.float32)
    q = rng.standard_normal((2, 2, 8), dtype=np.float32)
    allowed = np.array([[False, False, False, False], [True, True, False, False]])
    out = attend_cached(q, keys, keys, None, None, allowed, 1.0)
    with np.errstate(invalid="ignore"):
        twin = ref.attend_cached(q, keys, keys, None, None, allowed, 1.0)
    assert (out[:, 0] == 0).all() and np.abs(out - twin).max() <= ATOL_KERNEL


@njit(cache=True)
def exp_all(x, out):
    for i in range(x.size):
        out[i] = exp_nonpositive(x[i])


def test_exp_polynomial_within_a_few_ulp():
    x = np.concatenate([-np.geomspace(1e-8, 87.3, 20000), [0.0, -1e-30]]).astype(np.float32)
    got = np.empty_like(x)
    exp_all(x, got)
    expected = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - expected) <= 3 * np.spacing(expected.astype(np.float32)))


def test_exp_is_zero_below_the_subnormal_cutoff():
    x = np.array([EXP_CUTOFF - 1e-3, -100.0, -1e30, -np.inf], np.float32)
    got = np.ones_like(x)
    exp_all(x, got)
    assert (got == 0).all()


def test_parallel_and_serial_kernels_agree():
    """attend_cached picks the serial kernel below PARALLEL_WORK; both run the same work
    items, compiled separately (LLVM may vectorise a sum differently in each)."""
    rng = np.random.default_rng(3)
    keys, _ = storage(rng, 3, 70, 17, "float16", 1.0)
    values, _ = storage(rng, 3, 70, 17, "float16", 1.0)
    q = rng.standard_normal((6, 40, 17), dtype=np.float32)
    allowed = attention_mask(np.arange(25, 65), 65, 30)
    outs = []
    for kernel in (attend_cached_kernel, attend_cached_serial):
        out = np.empty_like(q)
        kernel(q, *kernel_arrays(keys, values, None, None), allowed, np.float32(0.25), out)
        outs.append(out)
    assert np.abs(outs[0] - outs[1]).max() <= ATOL_KERNEL


def test_nan_in_a_query_comes_out_as_nan_like_the_twin():
    """A damaged weight must reach the logits (minislm/finite.py then names it), not vanish."""
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((2, 9, 8), dtype=np.float32)
    q = rng.standard_normal((4, 3, 8), dtype=np.float32)
    q[1, 2, 5] = np.nan
    q[3, 0, 0] = np.inf
    allowed = attention_mask(np.arange(6, 9), 9, None)
    fast = attend_cached(q, keys, keys, None, None, allowed, 0.3)
    with np.errstate(invalid="ignore"):  # the twin meets NaN - NaN on the way, as it should
        twin = ref.attend_cached(q, keys, keys, None, None, allowed, 0.3)
    assert np.array_equal(np.isnan(fast), np.isnan(twin)) and np.isnan(fast[1, 2]).all()
    finite = ~np.isnan(twin)
    assert np.abs(fast[finite] - twin[finite]).max() <= ATOL_KERNEL


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float16", "int8"]),
    kv_heads=st.integers(1, 3),
    new=st.integers(1, 20),
    head_dim=st.sampled_from([1, 5, 96]),
    start=st.integers(0, 10),
    spread=st.sampled_from([1e-3, 1.0, 3e4]),  # 3e4: float16's largest values, and overflow to inf
    seed=st.integers(0, 2**16),
)
def test_store_kernel_equals_twin_bit_for_bit(dtype, kv_heads, new, head_dim, start, spread, seed):
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((kv_heads, new, head_dim), dtype=np.float32) * np.float32(spread)
    src[0, 0, 0] = 0.0 if head_dim > 1 else src[0, 0, 0]
    capacity = start + new + 3
    outs = []
    for store in (store_cached, ref.store_cached):
        stored = np.zeros((kv_heads, capacity, head_dim), dtype)
        scales = np.zeros((kv_heads, capacity), np.float32) if dtype == "int8" else None
        with np.errstate(over="ignore"):
            store(src, stored, scales, start)
        outs.append((stored, scales))
    (a, sa), (b, sb) = outs
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert sa is None or np.array_equal(sa, sb)


def test_store_keeps_nan_visible_in_every_format():
    src = np.ones((1, 2, 4), np.float32)
    src[0, 1, 2] = np.nan
    for dtype in ("float32", "float16", "int8"):
        stored = np.zeros((1, 3, 4), dtype)
        scales = np.zeros((1, 3), np.float32) if dtype == "int8" else None
        store_cached(src, stored, scales, 1)
        widened = stored.astype(np.float32) * (1 if scales is None else scales[..., None])
        assert np.isnan(widened[0, 2]).any() and np.isfinite(widened[0, 1]).all(), dtype
