"""int4 kernels against their plain-NumPy twins in minislm.kernels.reference."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minislm.kernels import Int4Weight, int4
from minislm.kernels import reference as ref

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0 ** -24  # float32 unit roundoff

# Largest RTN error allowed, in quantization steps. Exactly 1/2 in real
# arithmetic; w/d is rounded to float32 before it is rounded to an integer,
# which can move a value sitting within an ulp of a rounding boundary.
RTN_MAX_STEPS = 0.5 + 16 * U

# Values at the edges of fp16 and bf16 (max, smallest normal, smallest
# subnormal), of float32, and the largest quantizable magnitude (< 2**127).
EDGE_VALUES = np.array([65504.0, 6.1035156e-05, 5.9604645e-08, 1.7e38, 1.1754944e-38,
                        9.1835e-41, 1e-45, 0.0, -0.0, 1.0, 7.0, 15.0], np.float32)
AWKWARD = st.sampled_from([1, 3, 4, 17, 31, 33, 64, 127, 129, 200])


@st.composite
def weights(draw, max_rows=40, max_cols=260, huge=True):
    """float32 (out, in) weights of awkward shapes, magnitudes and patterns.
    huge=False keeps |w| <= 65504 so that products with activations stay finite."""
    n = min(draw(AWKWARD | st.integers(1, max_rows)), max_rows)
    k = min(draw(AWKWARD | st.integers(1, max_cols)), max_cols)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-38, 1e-6, 0.02, 1.0, 1e4] + ([1e30] if huge else [])))
    w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    pattern = draw(st.sampled_from(["normal", "constant_rows", "sparse", "edges", "outliers"]))
    if pattern == "constant_rows":      # every group constant; some rows zero
        w = np.repeat(rng.choice([0.0, scale, -scale], n)[:, None], k, axis=1).astype(np.float32)
    elif pattern == "sparse":           # mostly zero groups
        w[rng.random((n, k)) < 0.9] = 0
    elif pattern == "edges":
        mask = rng.random((n, k)) < 0.3
        edges = EDGE_VALUES if huge else EDGE_VALUES[np.abs(EDGE_VALUES) <= 65504]
        w[mask] = rng.choice(edges, mask.sum()) * rng.choice([-1, 1], mask.sum())
    elif pattern == "outliers":
        mask = rng.random((n, k)) < 0.02
        w[mask] *= 1000
    return w


group_sizes = st.sampled_from([32, 64, 128])


def step_per_element(scales, zeros, shape, group_size):
    """The quantization step d of every element's group, (out, in)."""
    _, d_bits, _ = ref.unpack_tiles(np.zeros((scales.shape[0], 1, 32), np.uint8), scales, zeros)
    return np.repeat(ref.bf16_to_f32(d_bits), group_size, axis=1)[: shape[0], : shape[1]]


@PROPERTY
@given(weights(), group_sizes, st.booleans())
def test_quantize_is_bit_identical_to_reference(w, group_size, symmetric):
    q = Int4Weight(w, group_size=group_size, symmetric=symmetric)
    qweight, scales, zeros = ref.quantize_int4(w, group_size, symmetric)
    assert np.array_equal(q.qweight, qweight)
    assert np.array_equal(q.scales, scales)
    assert (q.zeros is None) == symmetric
    assert symmetric or np.array_equal(q.zeros, zeros)


@PROPERTY
@given(weights(), group_sizes, st.booleans())
def test_round_to_nearest_error_is_at_most_half_a_step(w, group_size, symmetric):
    q = Int4Weight(w, group_size=group_size, symmetric=symmetric)
    w_hat = q.dequantize()
    step = step_per_element(q.scales, q.zeros, w.shape, group_size).astype(np.float64)
    err = np.abs(w.astype(np.float64) - w_hat)
    assert (err <= RTN_MAX_STEPS * step).all(), f"max error {np.max(err / np.maximum(step, 1e-300))} steps"


@PROPERTY
@given(st.integers(1, 6), st.integers(1, 12), group_sizes, st.booleans(), st.integers(0, 2**32 - 1))
def test_pack_then_unpack_is_the_identity(blocks, groups, group_size, symmetric, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (16 * blocks, groups * group_size), dtype=np.uint8)
    d_bits = rng.integers(0, 2**16, (16 * blocks, groups), dtype=np.uint16)
    zeros = None if symmetric else rng.integers(0, 16, (16 * blocks, groups), dtype=np.uint8)
    back = ref.unpack_tiles(*ref.pack_tiles(codes, d_bits, zeros))
    assert np.array_equal(back[0], codes) and np.array_equal(back[1], d_bits)
    assert symmetric or np.array_equal(back[2], zeros)


@PROPERTY
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_unpack_then_pack_is_the_identity(blocks, tiles, seed):
    """Every byte pattern is a valid tile: the layout wastes no bits."""
    qweight = np.random.default_rng(seed).integers(0, 256, (blocks, tiles, 32), dtype=np.uint8)
    scales = np.zeros((blocks, 1, 16), np.uint16)
    codes, d_bits, _ = ref.unpack_tiles(qweight, scales, None)
    assert np.array_equal(ref.pack_tiles(codes, d_bits, None)[0], qweight)


@PROPERTY
@given(weights(), group_sizes, st.booleans(), st.data())
def test_rows_are_the_reference_dequantization(w, group_size, symmetric, data):
    q = Int4Weight(w, group_size=group_size, symmetric=symmetric)
    ids = data.draw(st.lists(st.integers(0, w.shape[0] - 1), min_size=1, max_size=8))
    expected = ref.dequantize_int4(q.qweight, q.scales, q.zeros, w.shape)[ids]
    assert np.array_equal(q.rows(ids), expected)  # (q - z) * d is exact in float32


@st.composite
def activations(draw, n_tok, k):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal((n_tok, k)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))).astype(np.float32)
    if draw(st.booleans()):
        x[:, : min(k, 40)] = 0   # a zero group
    return x


def f32_sum_bound(q, x):
    """Worst-case float32 rounding of what the kernel sums (Higham's gamma_n):
    per group it rounds x_scale*isum, z*x_sum and their difference, then adds
    the groups one by one, so n = groups + 8 roundings of terms no larger
    than |d| * sum_k (q_k + z) |x_hat_k|."""
    codes, d_bits, z = ref.unpack_tiles(q.qweight, q.scales, q.zeros)
    groups = d_bits.shape[1]
    z = np.full(d_bits.shape, ref.SYMMETRIC_ZERO) if z is None else z
    xp = np.zeros((x.shape[0], codes.shape[1]), np.float32)
    xp[:, : x.shape[1]] = x
    x_hat = np.stack([np.repeat(s, q.group_size) * xq for xq, s, _ in
                      (ref.quantize_activations(row, q.group_size) for row in xp)])
    weight = (codes + np.repeat(z, q.group_size, axis=1)) * np.repeat(ref.bf16_to_f32(d_bits), q.group_size, axis=1)
    magnitude = (np.abs(x_hat) @ np.abs(weight.astype(np.float64)).T)[:, : q.shape[0]]
    return (groups + 8) * (U * magnitude + 2.0 ** -149)   # + one subnormal ulp per rounding


@PROPERTY
@given(weights(max_cols=400, huge=False), group_sizes, st.booleans(), st.data())
def test_gemv_matches_reference(w, group_size, symmetric, data):
    q = Int4Weight(w, group_size=group_size, symmetric=symmetric)
    x = data.draw(activations(1, w.shape[1]))
    expected = ref.matmul_int4(x, q.qweight, q.scales, q.zeros, w.shape)
    err = np.abs(q.matmul(x).astype(np.float64) - expected)
    assert (err <= f32_sum_bound(q, x)).all()


@PROPERTY
@given(weights(max_rows=33, max_cols=200, huge=False), group_sizes, st.booleans(), st.integers(2, 9), st.data())
def test_gemm_matches_reference(w, group_size, symmetric, n_tok, data):
    q = Int4Weight(w, group_size=group_size, symmetric=symmetric)
    x = data.draw(activations(n_tok, w.shape[1]))
    y = q.matmul(x)
    assert y.shape == (n_tok, w.shape[0]) and y.dtype == np.float32 and y.flags.c_contiguous
    err = np.abs(y.astype(np.float64) - ref.matmul_int4(x, q.qweight, q.scales, q.zeros, w.shape))
    assert (err <= f32_sum_bound(q, x)).all()


@PROPERTY
@given(st.integers(1, 8), group_sizes, st.integers(0, 2**32 - 1), st.sampled_from(["normal", "zeros", "nan", "inf", "huge"]))
def test_activation_quantization_is_bit_identical_to_reference(groups, group_size, seed, kind):
    x = np.random.default_rng(seed).standard_normal(groups * group_size).astype(np.float32)
    x[:group_size] = {"normal": x[:group_size], "zeros": 0.0, "nan": np.nan, "inf": -np.inf,
                      "huge": 3e38}[kind]
    xq, scale, total = np.empty(x.size, np.int16), np.empty(groups, np.float32), np.empty(groups, np.float32)
    int4.quantize_activations(x, group_size, xq, scale, total)
    want = ref.quantize_activations(x, group_size)
    assert np.array_equal(xq, want[0])
    np.testing.assert_array_equal(scale, want[1])   # NaN == NaN here
    np.testing.assert_array_equal(total, want[2])


@PROPERTY
@given(weights(max_cols=300, huge=False), group_sizes, st.data())
def test_int16_activations_cost_at_most_half_a_level(w, group_size, data):
    """GEMV quantizes x per group to int16: |x - x_hat| <= max|x_group| / 65534,
    so the output moves by at most sum_k |w_hat_k| * max|x_group(k)| / 65534."""
    q = Int4Weight(w, group_size=group_size)
    x = data.draw(activations(1, w.shape[1]))
    w_hat = q.dequantize().astype(np.float64)
    xp = np.zeros(-(-w.shape[1] // group_size) * group_size, np.float32)
    xp[: w.shape[1]] = x[0]
    amax = np.repeat(np.abs(xp.reshape(-1, group_size)).max(axis=1), group_size)[: w.shape[1]]
    bound = np.abs(w_hat) @ amax / (2 * ref.ACT_LEVELS) * (1 + 1e-3) + f32_sum_bound(q, x)[0]
    assert (np.abs(q.matmul(x)[0] - w_hat @ x[0].astype(np.float64)) <= bound).all()


def test_nan_in_activations_makes_every_output_nan():
    q = Int4Weight(np.ones((20, 64), np.float32))
    x = np.ones((1, 64), np.float32)
    x[0, 5] = np.nan
    assert np.isnan(q.matmul(x)).all()
    assert np.isnan(q.matmul(np.repeat(x, 5, axis=0))).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 2.0 ** 127, -3e38])
def test_nan_inf_and_unquantizable_weights_are_rejected_with_their_count(bad):
    w = np.ones((20, 70), np.float32)
    w[3, 4] = w[19, 69] = bad
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: 2 of 1400 values are NaN, inf or beyond"):
        Int4Weight(w, name="layers.0.mlp")


def test_zero_and_constant_groups_are_exact_or_within_bf16_scale_rounding():
    w = np.zeros((16, 64), np.float32)
    w[1, :32] = 0.75       # constant group: +-7 steps, step rounded up to bf16
    w[2, 32:] = -3.0
    for symmetric in (True, False):
        w_hat = Int4Weight(w, group_size=32, symmetric=symmetric).dequantize()
        assert (w_hat[0] == 0).all() and (w_hat[1, 32:] == 0).all()
        np.testing.assert_allclose(w_hat, w, rtol=2 ** -8)  # bf16 scale: 8 significant bits


def test_tensors_round_trip_bit_identically_and_use_memory_mapped_arrays_in_place(tmp_path):
    w = np.random.default_rng(0).standard_normal((40, 100)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 100)).astype(np.float32)
    for symmetric in (True, False):
        q = Int4Weight(w, group_size=64, symmetric=symmetric)
        prefix = "model.layers.0.mlp.down_proj"
        stored = {}
        for name, a in q.tensors(prefix).items():
            assert a.dtype in (np.uint8, np.uint16)
            np.save(tmp_path / f"{name}.npy", a)
            stored[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")   # read-only map
        back = Int4Weight.from_tensors(stored, prefix, shape=(40, 100))
        for name, a in back.tensors(prefix).items():
            assert np.shares_memory(a, stored[name])
        assert back.group_size == 64 and back.symmetric == symmetric and back.nbytes == q.nbytes
        assert np.array_equal(back.matmul(x), q.matmul(x)) and np.array_equal(back.matmul(x[:1]), q.matmul(x[:1]))


def test_from_tensors_rejects_a_shape_that_does_not_fit():
    q = Int4Weight(np.ones((32, 64), np.float32))
    with pytest.raises(ValueError, match="do not match the minislm int4 layout"):
        Int4Weight.from_tensors(q.tensors("w"), "w", shape=(64, 64))


@pytest.mark.parametrize("group_size", [0, 30, 2048, 32.0])
def test_bad_group_sizes_are_rejected(group_size):
    with pytest.raises(ValueError, match="--group-size"):
        Int4Weight(np.ones((4, 64), np.float32), group_size=group_size)


def test_bf16_bits_and_float16_are_accepted_as_input():
    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    bits = ref.f32_to_bf16(w)
    a = Int4Weight(bits)
    b = Int4Weight(ref.bf16_to_f32(bits))
    assert np.array_equal(a.qweight, b.qweight) and np.array_equal(a.scales, b.scales)
    c = Int4Weight(w.astype(np.float16))
    d = Int4Weight(w.astype(np.float16).astype(np.float32))
    assert np.array_equal(c.qweight, d.qweight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scales_round_up_so_that_no_weight_is_clipped(symmetric):
    """Groups whose extremes sit half a step outside the 16 codes when the
    bf16 scale is rounded down by a fraction of a percent: 4096 rows of
    [lo, hi, 0, ...] with -lo/d just above 7.5, the worst case for asym."""
    rng = np.random.default_rng(7)
    t = rng.uniform(0.5, 2.0, 4096).astype(np.float32)
    s = rng.uniform(1.0, 1.008, 4096).astype(np.float32)
    w = np.zeros((4096, 32), np.float32)
    w[:, 0] = -7.5 * t * (1 + 1e-6)
    w[:, 1] = (15 * s - 7.5) * t if not symmetric else 7.0 * s * t
    q = Int4Weight(w, group_size=32, symmetric=symmetric)
    step = step_per_element(q.scales, q.zeros, w.shape, 32).astype(np.float64)
    err = np.abs(w.astype(np.float64) - q.dequantize())
    assert (err <= RTN_MAX_STEPS * step).all(), f"max error {np.max(err / step)} steps"


def test_low_level_kernels_refuse_arrays_of_the_wrong_size():
    q = Int4Weight(np.ones((32, 64), np.float32))
    with pytest.raises(ValueError, match="gemv_int4"):
        int4.gemv_int4(q.qweight, q.scales, q.zeros, np.ones(64, np.float32), np.empty(16, np.float32))
    with pytest.raises(ValueError, match="gemm_int4"):
        int4.gemm_int4(q.qweight, q.scales, q.zeros, np.ones((3, 64), np.float32), np.empty((3, 32), np.float32))


@PROPERTY
@given(weights(max_rows=33, max_cols=200, huge=False), group_sizes, st.booleans(), st.integers(3, 9), st.data())
def test_prefill_and_decode_agree_bit_for_bit(w, group_size, symmetric, n_tok, data):
    """The GEMM runs the GEMV's arithmetic in the same order: a token's output
    does not depend on how many tokens share the call (a cached decode step
    reproduces the full forward exactly)."""
    q = Int4Weight(w, group_size=group_size, symmetric=symmetric)
    x = data.draw(activations(n_tok, w.shape[1]))
    together = q.matmul(x)
    assert all(np.array_equal(together[t], q.matmul(x[t: t + 1])[0]) for t in range(n_tok))
