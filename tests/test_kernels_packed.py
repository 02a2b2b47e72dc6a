"""int4 and int8 kernels against their plain-NumPy twins in minislm.kernels.reference.

The packed kernels multiply by int8 activations; their integer sums are exact,
so the only differences from the float64 twin are float32 roundings of the
per-group sums, bounded below (Higham's gamma_n). Every CPU path ("portable",
"vnni" where the CPU has it) is held to the same twin, and to each other bit
for bit.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minislm.kernels import Int4Weight, Int8Weight, amx, cpu, packed, quantizer
from minislm.kernels import reference as ref

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0 ** -24  # float32 unit roundoff
# Every CPU path this machine has; the others are skipped (AMX: recent Intel Xeons only).
PATHS = ["portable"] + (["vnni"] if cpu.has_vnni() else []) + (["amx"] if cpu.has_amx_int8() else [])

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
kinds = st.sampled_from(["int4 sym", "int4 asym", "int8"])


def make(w, kind, group_size):
    if kind == "int8":
        return Int8Weight(w, group_size=group_size)
    return Int4Weight(w, group_size=group_size, symmetric=kind == "int4 sym")


def logical(q):
    """(codes, float32 scales, zero, offsets) of a weight, per row (padded)."""
    codes = ref.unpack_tiles(q.codes, q.BITS)
    zero = q.zero if q.zeros is None else ref.by_row(q.zeros)
    offsets = None if q.offsets is None else ref.by_row(q.offsets)
    return codes, ref.scale_values(ref.by_row(q.scales)), zero, offsets


# ---------------------------------------------------------------- quantization


@PROPERTY
@given(weights(), group_sizes, kinds)
def test_quantize_is_bit_identical_to_reference(w, group_size, kind):
    q = make(w, kind, group_size)
    if kind == "int8":
        codes, scales = ref.quantize_int8(w, group_size)
        zeros = None
    else:
        codes, scales, zeros = ref.quantize_int4(w, group_size, kind == "int4 sym")
    assert np.array_equal(q.codes, ref.pack_tiles(codes, q.BITS))
    assert q.scales.dtype == scales.dtype and np.array_equal(q.scales.view(np.uint8), ref.by_block(scales).view(np.uint8))
    assert (q.zeros is None) == (zeros is None)
    assert zeros is None or np.array_equal(q.zeros, ref.by_block(zeros))


@PROPERTY
@given(weights(), st.sampled_from([8, 16, 32, 64, 128, 256]))
def test_one_pass_int4_quantizer_is_bit_identical_to_its_twin(w, group_size):
    """quantizer.quantize_int4_symmetric (the default int4: search and codes in one
    vectorised pass per block) writes the scales of `reference.search_scales` and the
    tiles of `reference.pack_tiles`, bit for bit, on every shape, magnitude and tie."""
    bad, tiles, scales = quantizer.quantize_symmetric(w, group_size)
    d, twin_tiles = ref.quantize_int4_symmetric(w, group_size)
    assert bad == 0 and np.array_equal(tiles, twin_tiles)
    assert np.array_equal(ref.scale_values(ref.by_row(scales)).view(np.uint32), d.view(np.uint32))
    assert scales.dtype == ref.store_scales(d, round_up=False).dtype   # float16 exactly when the twin stores it so


def test_one_pass_int4_quantizer_counts_what_it_cannot_quantize_and_breaks_ties_as_argmax():
    w = np.zeros((16, 64), np.float32)
    w[1, :32] = -0.0                       # a zero group of -0: the first value (-0) is the extreme
    w[2, 5], w[2, 9] = 1.0, -1.0           # +m first: the extreme is +1
    w[3, 7], w[3, 8] = -2.0, 2.0           # -m first: the extreme is -2
    w[4, 40] = 1e-44                       # a subnormal extreme: its scale is no float16, all stay float32
    bad, tiles, scales = quantizer.quantize_symmetric(w, 32)
    d, twin_tiles = ref.quantize_int4_symmetric(w, 32)
    assert bad == 0 and np.array_equal(tiles, twin_tiles)
    assert np.array_equal(ref.scale_values(ref.by_row(scales)).view(np.uint32), d.view(np.uint32))
    assert scales.dtype == ref.store_scales(d, round_up=False).dtype   # float16 exactly when the twin stores it so
    w[5, 1], w[6, 2], w[7, 3] = np.nan, -np.inf, 2.0**127
    assert quantizer.quantize_symmetric(w, 32)[0] == 3


def test_one_pass_scales_are_float16_exactly_when_every_nonzero_one_is_a_normal_float16():
    """`quantizer.store_scales` moves bits where the twin casts: float16 for ordinary
    weights (zero groups and a -0 group included), float32 once one scale is outside
    float16's normal range (below 2**-14 or above 65504)."""
    w = np.random.default_rng(3).standard_normal((32, 96)).astype(np.float32)
    w[0, :32], w[1, 32:64] = 0.0, -0.0
    for factor, dtype in ((1.0, np.float16), (2.0**-22, np.float32), (2.0**20, np.float32)):
        scaled = w * np.float32(factor)
        _, _, scales = quantizer.quantize_symmetric(scaled, 32)
        d, _ = ref.quantize_int4_symmetric(scaled, 32)
        twin = ref.store_scales(d, round_up=False)
        assert scales.dtype == twin.dtype == dtype
        assert np.array_equal(ref.by_row(scales).view(np.uint8), twin.view(np.uint8))


@PROPERTY
@given(weights(), group_sizes, kinds)
def test_every_weight_gets_the_nearest_level_of_its_group(w, group_size, kind):
    """Round to nearest: no level of the group's grid s*(c - z), c in 0..2**bits-1,
    is closer to w than the one chosen (up to the float32 rounding of w/s)."""
    q = make(w, kind, group_size)
    codes, s, z, _ = logical(q)
    n, k = w.shape
    s = np.repeat(s, group_size, axis=1)[:n, :k].astype(np.float64)
    z = np.float64(z) if np.ndim(z) == 0 else np.repeat(z, group_size, axis=1)[:n, :k].astype(np.float64)
    levels = np.arange(ref.MAX_CODE[q.BITS] + 1, dtype=np.float64)
    if kind == "int8":
        levels = levels[1:]                      # codes 1..255: the symmetric range
    grid = s[..., None] * (levels - z[..., None])   # (n, k, levels)
    nearest = np.abs(w[..., None].astype(np.float64) - grid).min(axis=2)
    err = np.abs(w.astype(np.float64) - q.dequantize())
    assert (err <= nearest + 16 * U * np.abs(s) + U * np.abs(w)).all()


@PROPERTY
@given(weights(huge=False), group_sizes)
def test_symmetric_int4_is_never_worse_than_the_q4_0_rule(w, group_size):
    """The scale search starts from llama.cpp's Q4_0 rule (d = the group's
    largest-magnitude weight / -8, rounded to float16 where that is normal) and
    only keeps a scale whose least-squares refit has a smaller squared error: per
    group, the error is at most the rule's, up to the search's fixed point
    (weights rounded to 2**-40 of the group's power of two) and float32's
    rounding of w / d, which can pick the farther level for a weight within an
    ulp of a midpoint (at most 32 u d^2 more per weight)."""
    q = Int4Weight(w, group_size=group_size)
    g = ref._groups(w, group_size).astype(np.float64)
    extreme = np.take_along_axis(g, np.abs(g).argmax(axis=2)[..., None], axis=2)[..., 0]
    d0 = ref.round_f16(ref._not_underflowed((extreme / -8).astype(np.float32), extreme != 0)).astype(np.float64)
    safe = np.where(d0 != 0, d0, 1)[..., None]
    rule = np.where(d0[..., None] != 0, np.clip(np.floor(g / safe + 0.5), -8, 7), 0) * d0[..., None]
    rule_err = ((g - rule) ** 2).sum(axis=2)
    w_hat = np.zeros(g.shape[:2] + (group_size,)).reshape(g.shape[0], -1)
    w_hat[: w.shape[0], : w.shape[1]] = q.dequantize()
    err = ((g - w_hat.reshape(g.shape)) ** 2).sum(axis=2)
    fixed_point = np.abs(g).max(axis=2) ** 2 * group_size * 2.0 ** -36
    midpoints = group_size * 32 * U * d0 ** 2
    assert (err <= rule_err * (1 + 1e-9) + fixed_point + midpoints + 1e-300).all()


@PROPERTY
@given(weights(), group_sizes, st.sampled_from(["int4 asym", "int8"]))
def test_scales_rounded_up_clip_nothing(w, group_size, kind):
    """Asymmetric int4 and int8 round their scale up: every weight within half a step."""
    q = make(w, kind, group_size)
    _, s, _, _ = logical(q)
    step = np.repeat(s, group_size, axis=1)[: w.shape[0], : w.shape[1]].astype(np.float64)
    assert (np.abs(w - q.dequantize()) <= (0.5 + 16 * U) * step).all()


def test_scales_are_float16_unless_one_falls_outside_its_normal_range():
    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    assert Int4Weight(w).scales.dtype == np.float16
    assert Int8Weight(w).scales.dtype == np.float16
    w[3, 5] = 1e6           # scale 1.25e5 > 65504
    assert Int4Weight(w).scales.dtype == np.float32
    w[3, 5] = 0
    w[7, 32:] = 1e-6        # scale 1.25e-7 < 2**-14: would be a subnormal float16
    assert Int4Weight(w).scales.dtype == np.float32
    w[7, 32:] = 0           # zero groups have scale 0, which float16 holds
    assert Int4Weight(w).scales.dtype == np.float16


@PROPERTY
@given(st.integers(1, 6), st.integers(1, 12), st.sampled_from([4, 8]), st.integers(0, 2**32 - 1))
def test_pack_then_unpack_is_the_identity(blocks, tiles, bits, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, (16 * blocks, tiles * ref.TILE_INPUTS[bits]),
                                                 dtype=np.uint8)
    assert np.array_equal(ref.unpack_tiles(ref.pack_tiles(codes, bits), bits), codes)


@PROPERTY
@given(st.integers(1, 6), st.integers(1, 40), st.sampled_from([4, 8]), st.integers(0, 2**32 - 1))
def test_unpack_then_pack_is_the_identity(blocks, tiles, bits, seed):
    """Every byte pattern is a valid tile: the layouts waste no bits."""
    t = np.random.default_rng(seed).integers(0, 256, (blocks, tiles, 64), dtype=np.uint8)
    assert np.array_equal(ref.pack_tiles(ref.unpack_tiles(t, bits), bits), t)


def test_tile_layout_puts_four_inputs_of_one_row_in_each_32_bit_lane():
    codes = np.arange(16 * 8, dtype=np.uint8).reshape(16, 8) % 16
    tile = ref.pack_tiles(codes, 4)[0, 0]
    for r in range(16):
        for e in range(4):
            assert tile[4 * r + e] == codes[r, e] | codes[r, 4 + e] << 4
    codes8 = np.arange(64, dtype=np.uint8).reshape(16, 4)
    assert np.array_equal(ref.pack_tiles(codes8, 8)[0, 0], np.arange(64, dtype=np.uint8))


# ---------------------------------------------------------------- from_codes: other formats, exactly


# How each format a reader hands over maps onto from_codes (bits, group sizes,
# code range, scale kind, zero, offsets): the combinations that exist.
RECIPES = {
    "Q4_0": (4, [32], 15, "fp16", 8, False),
    "Q4_K": (4, [32], 15, "fp32", 0, True),            # s = d*sc, b = -dmin*m
    "AWQ/GPTQ": (4, [32, 64, 128], 15, "fp16", "per_group", False),
    "MLX": (4, [64], 15, "fp16", 0, True),             # float bias
    "Q8_0": (8, [32], 255, "fp16", 128, False),
    "Q5_0": (8, [32], 31, "fp16", 16, False),
    "Q5_1": (8, [32], 31, "fp16", 0, True),
    "Q6_K": (8, [16], 63, "fp32", 32, False),          # s = d * int8 sub-scale
    "int8 per-group zero": (8, [16, 32, 64], 255, "tiny", "per_group", True),
}


@st.composite
def coded(draw, recipes=tuple(RECIPES)):
    """(bits, codes, scales, group size, zero, offsets) as a GGUF/AWQ/GPTQ/MLX
    reader would hand them over, with awkward shapes and values."""
    bits, sizes, top, scale_kind, zero, with_offsets = RECIPES[draw(st.sampled_from(recipes))]
    group_size = draw(st.sampled_from(sizes))
    n = draw(AWKWARD | st.integers(1, 40))
    k = draw(AWKWARD | st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    groups = -(-k // group_size)
    codes = rng.integers(0, top + 1, (n, k), dtype=np.uint8)
    scales = (rng.standard_normal((n, groups)) * draw(st.sampled_from([1e-3, 0.02, 1.0, 300.0]))).astype(np.float32)
    if scale_kind == "fp16":       # exactly float16 values: stored as float16
        scales = scales.astype(np.float16).astype(np.float32)
    elif scale_kind == "tiny":     # float16 subnormals and zeros: still exact as float16
        scales = (rng.integers(-3, 4, (n, groups)) * 2.0 ** -24).astype(np.float32)
    if zero == "per_group":
        zero = rng.integers(0, top + 1, (n, groups), dtype=np.uint8)
    offsets = None
    if with_offsets:               # K-quants' -dmin*m, MLX's bias
        offsets = (rng.standard_normal((n, groups)) * draw(st.sampled_from([1e-3, 1.0]))).astype(np.float32)
    return bits, codes, scales, group_size, zero, offsets


@PROPERTY
@given(coded())
def test_from_codes_represents_exactly_s_times_c_minus_z_plus_b(args):
    bits, codes, scales, group_size, zero, offsets = args
    cls = Int4Weight if bits == 4 else Int8Weight
    q = cls.from_codes(codes, scales, group_size, zero=zero, offsets=offsets)
    # the same formula, written out here in float32 from the inputs
    per = lambda a: np.repeat(a, group_size, axis=1)[:, : codes.shape[1]]  # noqa: E731
    z = ref.SYMMETRIC_ZERO[bits] if zero is None else zero
    z = np.float32(z) if np.ndim(z) == 0 else per(z).astype(np.float32)
    want = (codes.astype(np.float32) - z) * per(scales)
    if offsets is not None:
        want = want + per(offsets)
    assert np.array_equal(q.dequantize().view(np.uint32), want.view(np.uint32))   # -0.0 too
    exact16 = np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
    assert q.scales.dtype == (np.float16 if exact16 else np.float32)


@PROPERTY
@given(coded(), st.integers(1, 20), st.data())
def test_from_codes_weights_multiply_within_the_kernel_bound(args, n_tok, data):
    """On the path this CPU picks (the cross-path test below holds the others equal)."""
    bits, codes, scales, group_size, zero, offsets = args
    q = (Int4Weight if bits == 4 else Int8Weight).from_codes(codes, scales, group_size, zero=zero, offsets=offsets)
    x = data.draw(activations(n_tok, codes.shape[1]))
    check_matmul(q, x, paths=[None])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coded(("Q4_K", "AWQ/GPTQ", "Q6_K")), st.sampled_from([1, 7, 20]), st.data())
def test_zero_points_offsets_and_float32_scales_give_the_same_bits_on_every_path(args, n_tok, data):
    bits, codes, scales, group_size, zero, offsets = args
    q = (Int4Weight if bits == 4 else Int8Weight).from_codes(codes, scales, group_size, zero=zero, offsets=offsets)
    check_matmul(q, data.draw(activations(n_tok, codes.shape[1])))


def test_from_codes_refuses_what_it_cannot_represent():
    codes = np.zeros((4, 64), np.uint8)
    scales = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="beyond 4 bits"):
        Int4Weight.from_codes(codes + 16, scales, 32)
    with pytest.raises(ValueError, match="scales must be"):
        Int4Weight.from_codes(codes, scales[:, :1], 32)
    with pytest.raises(ValueError, match="scales must be"):
        Int4Weight.from_codes(codes, scales * np.inf, 32)
    with pytest.raises(ValueError, match="zero code 16"):
        Int4Weight.from_codes(codes, scales, 32, zero=16)
    with pytest.raises(ValueError, match="zero points"):
        Int4Weight.from_codes(codes, scales, 32, zero=np.zeros((4, 2), np.int32))
    with pytest.raises(ValueError, match="offsets"):
        Int8Weight.from_codes(codes, scales, 32, offsets=np.ones((4, 2), np.float64))
    with pytest.raises(ValueError, match="--group-size 12"):
        Int4Weight.from_codes(codes, scales, 12)


# ---------------------------------------------------------------- matmul


@st.composite
def activations(draw, n_tok, k):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal((n_tok, k)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))).astype(np.float32)
    if draw(st.booleans()):
        x[:, : min(k, 40)] = 0   # a zero group
    if draw(st.booleans()):
        x[:, k // 2] *= 100      # an outlier
    return x


def f32_sum_bound(q, x):
    """Worst-case float32 rounding of the kernel's sums (Higham's gamma_n) over
    the sum of the magnitudes of every term it adds: per activation group
    x_scale*isum (isum exact), per weight group s*(acc - z*x_gsum) + b*x_gsum,
    then the groups one after another: n = groups + activation groups per
    group + 8 roundings deep, plus one subnormal ulp per rounding."""
    codes, s, z, b = logical(q)
    g = q.group_size
    a = ref.act_group_size(g)
    xp = np.zeros((x.shape[0], codes.shape[1]), np.float32)
    xp[:, : x.shape[1]] = x
    abs_xhat = []
    for row in xp:
        xq, xs, _ = ref.quantize_activations(row, a)
        abs_xhat.append(np.repeat(np.abs(xs.astype(np.float64)), a) * np.abs(xq))
    abs_xhat = np.stack(abs_xhat)                                           # (T, in_p)
    z = np.full(s.shape, z, np.float64) if np.ndim(z) == 0 else z.astype(np.float64)
    per = lambda m: np.repeat(np.abs(m.astype(np.float64)), g, axis=1)    # noqa: E731
    weight = per(s) * (codes + per(z))
    if b is not None:
        weight = weight + per(b)
    magnitude = (abs_xhat @ weight.T)[:, : q.shape[0]]
    depth = s.shape[1] + g // a + 8
    return depth * (U * magnitude + 2.0 ** -149)


def check_matmul(q, x, paths=PATHS):
    """q @ x within the float32 bound of the twin, on each path (None: the
    CPU's choice), and the same bits on all of them."""
    zero = q.zero if q.zeros is None else q.zeros
    expected = ref.matmul_packed(x, q.codes, q.scales, zero, q.offsets, q.shape, q.BITS)
    check_paths(q, x, expected, f32_sum_bound(q, x), paths)


def check_paths(q, x, expected, bound, paths):
    """q.matmul(x, path) within `bound` of the float64 `expected` on each path, and the
    same bits on all of them (shared with test_kernels_kquant.py)."""
    results = []
    for path in paths:
        y = q.matmul(x, path=path)
        assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == np.float32 and y.flags.c_contiguous
        assert (np.abs(y.astype(np.float64) - expected) <= bound).all(), path
        results.append(y)
    for y in results[1:]:   # every path gives the same bits (exact integer sums, same float order)
        assert np.array_equal(y.view(np.uint32), results[0].view(np.uint32))


@PROPERTY
@given(weights(max_cols=400, huge=False), group_sizes, kinds, st.data())
def test_gemv_matches_reference(w, group_size, kind, data):
    check_matmul(make(w, kind, group_size), data.draw(activations(1, w.shape[1])))


@PROPERTY
@given(weights(max_rows=33, max_cols=200, huge=False), group_sizes, kinds, st.integers(2, 9), st.data())
def test_gemm_matches_reference(w, group_size, kind, n_tok, data):
    check_matmul(make(w, kind, group_size), data.draw(activations(n_tok, w.shape[1])))


@PROPERTY
@given(weights(max_rows=40, max_cols=300, huge=False), st.sampled_from([8, 16, 24, 32, 64, 128]), kinds,
       st.integers(10, 40), st.data())
def test_long_prefills_match_reference_on_every_path(w, group_size, kind, n_tok, data):
    """Enough tokens for AMX's 16-token tiles (and a ragged last one); odd group
    sizes give activation groups of 8-24 inputs (AMX's A tile narrower than 64)."""
    if kind == "int8" or group_size % 8 == 0:
        q = Int8Weight(w, group_size=group_size) if kind == "int8" else make(w, kind, group_size)
        check_matmul(q, data.draw(activations(n_tok, w.shape[1])))


@PROPERTY
@given(weights(max_rows=33, max_cols=200, huge=False), group_sizes, kinds, st.integers(3, 9), st.data())
def test_prefill_and_decode_agree_bit_for_bit(w, group_size, kind, n_tok, data):
    """The GEMM runs the GEMV's arithmetic in the same order: a token's output
    does not depend on how many tokens share the call (a cached decode step
    reproduces the full forward exactly)."""
    q = make(w, kind, group_size)
    x = data.draw(activations(n_tok, w.shape[1]))
    together = q.matmul(x)
    assert all(np.array_equal(together[t], q.matmul(x[t: t + 1])[0]) for t in range(n_tok))


@PROPERTY
@given(st.integers(1, 8), st.sampled_from([16, 32, 64, 128, 24]), st.integers(0, 2**32 - 1),
       st.sampled_from(["normal", "zeros", "nan", "inf", "huge"]))
def test_activation_quantization_is_bit_identical_to_reference(groups, group_size, seed, kind):
    x = np.random.default_rng(seed).standard_normal(groups * group_size).astype(np.float32)
    x[:group_size] = {"normal": x[:group_size], "zeros": 0.0, "nan": np.nan, "inf": -np.inf,
                      "huge": 3e38}[kind]
    a = ref.act_group_size(group_size)
    xq, scale, total = np.empty(x.size, np.int8), np.empty(x.size // a, np.float32), np.empty(x.size // a, np.float32)
    packed.quantize_activations(x, a, xq, scale, total)
    want = ref.quantize_activations(x, a)
    assert np.array_equal(xq, want[0])
    np.testing.assert_array_equal(scale, want[1])   # NaN == NaN here
    np.testing.assert_array_equal(total, want[2])


@PROPERTY
@given(weights(max_cols=300, huge=False), group_sizes, kinds, st.data())
def test_int8_activations_cost_at_most_half_a_level(w, group_size, kind, data):
    """x is quantized per group of 32 inputs to int8: |x - x_hat| <= max|x_group| / 254,
    so the output moves by at most sum_k |w_k| * max|x_group(k)| / 254."""
    q = make(w, kind, group_size)
    x = data.draw(activations(1, w.shape[1]))
    w_hat = q.dequantize().astype(np.float64)
    a = ref.act_group_size(group_size)
    xp = np.zeros(-(-w.shape[1] // group_size) * group_size, np.float32)
    xp[: w.shape[1]] = x[0]
    amax = np.repeat(np.abs(xp.reshape(-1, a)).max(axis=1), a)[: w.shape[1]]
    bound = np.abs(w_hat) @ amax / (2 * ref.ACT_LEVELS) * (1 + 1e-3) + f32_sum_bound(q, x)[0]
    assert (np.abs(q.matmul(x)[0] - w_hat @ x[0].astype(np.float64)) <= bound).all()


def test_nan_in_activations_makes_every_output_nan():
    for q in (Int4Weight(np.ones((20, 64), np.float32)), Int8Weight(np.ones((20, 64), np.float32))):
        x = np.ones((1, 64), np.float32)
        x[0, 5] = np.nan
        assert np.isnan(q.matmul(x)).all()
        assert np.isnan(q.matmul(np.repeat(x, 5, axis=0))).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 2.0 ** 127, -3e38])
@pytest.mark.parametrize("cls", [Int4Weight, Int8Weight])
def test_nan_inf_and_unquantizable_weights_are_rejected_with_their_count(bad, cls):
    w = np.ones((20, 70), np.float32)
    w[3, 4] = w[19, 69] = bad
    with pytest.raises(ValueError, match=r"layers\.0\.mlp: 2 of 1400 values are NaN, inf or beyond"):
        cls(w, name="layers.0.mlp")


def test_zero_and_constant_groups_are_exact_or_within_scale_rounding():
    w = np.zeros((16, 64), np.float32)
    w[1, :32] = 0.75
    w[2, 32:] = -3.0
    for q in (Int4Weight(w), Int4Weight(w, symmetric=False), Int8Weight(w)):
        w_hat = q.dequantize()
        assert (w_hat[0] == 0).all() and (w_hat[1, 32:] == 0).all()
        np.testing.assert_allclose(w_hat, w, rtol=2 ** -10)  # float16 scales: 11 significant bits


# ---------------------------------------------------------------- storage


@pytest.mark.parametrize("kind", ["int4 sym", "int4 asym", "int8", "from_codes"])
def test_tensors_round_trip_bit_identically_and_use_memory_mapped_arrays_in_place(tmp_path, kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 100)).astype(np.float32)
    x = rng.standard_normal((3, 100)).astype(np.float32)
    if kind == "from_codes":   # Q5_1-like: 5-bit codes, float32 scales, offsets, zero 0
        q = Int8Weight.from_codes(rng.integers(0, 32, (40, 100), dtype=np.uint8),
                                  rng.standard_normal((40, 2)).astype(np.float32), 64, zero=0,
                                  offsets=rng.standard_normal((40, 2)).astype(np.float32))
    else:
        q = make(w, kind, 64)
    prefix = "model.layers.0.mlp.down_proj"
    stored = {}
    for name, a in q.tensors(prefix).items():
        np.save(tmp_path / f"{name}.npy", a)
        stored[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")   # read-only map
    back = type(q).from_tensors(stored, prefix, shape=(40, 100))
    for name, a in back.tensors(prefix).items():
        assert np.shares_memory(a, stored[name]) or name.endswith(".zero")   # `.zero`: one byte
    assert back.group_size == 64 and back.nbytes == q.nbytes and back.symmetric == q.symmetric
    assert np.array_equal(back.matmul(x), q.matmul(x)) and np.array_equal(back.matmul(x[:1]), q.matmul(x[:1]))
    assert np.array_equal(back.dequantize(), q.dequantize())


def test_from_tensors_rejects_a_shape_that_does_not_fit():
    q = Int4Weight(np.ones((32, 64), np.float32))
    with pytest.raises(ValueError, match="do not match the minislm int4 layout"):
        Int4Weight.from_tensors(q.tensors("w"), "w", shape=(64, 64))
    with pytest.raises(ValueError, match="do not match the minislm int8 layout"):
        Int8Weight.from_tensors(q.tensors("w"), "w", shape=(32, 64))


def old_layout_tensors(codes, bf16_scales, zeros):
    """The version-1 int4 layout ("tiles-16x4"), written from its definition:
    qweight (out/16, in/4, 32), byte 2r+e = q[16b+r, 4j+e] | q[16b+r, 4j+2+e] << 4;
    scales and zeros (out/16, groups, 16), bf16 bits."""
    n, k = codes.shape
    qweight = np.zeros((n // 16, k // 4, 32), np.uint8)
    for b in range(n // 16):
        for j in range(k // 4):
            for r in range(16):
                for e in range(2):
                    qweight[b, j, 2 * r + e] = codes[16 * b + r, 4 * j + e] | codes[16 * b + r, 4 * j + 2 + e] << 4
    out = {"p.qweight": qweight, "p.scales": ref.by_block(bf16_scales)}
    if zeros is not None:
        out["p.zeros"] = ref.by_block(zeros)
    return out


@pytest.mark.parametrize("symmetric", [True, False])
def test_version_1_int4_tensors_are_converted_exactly(symmetric):
    rng = np.random.default_rng(3)
    codes = rng.integers(1 if symmetric else 0, 16, (32, 128), dtype=np.uint8)
    d_bits = ref.f32_to_bf16(np.abs(rng.standard_normal((32, 4))).astype(np.float32) * 0.01)
    zeros = None if symmetric else rng.integers(0, 16, (32, 4), dtype=np.uint8)
    q = packed.from_old_int4_tensors(old_layout_tensors(codes, d_bits, zeros), "p", (32, 128))
    z = np.float32(8) if symmetric else np.repeat(zeros, 32, axis=1).astype(np.float32)
    want = (codes.astype(np.float32) - z) * np.repeat(ref.bf16_to_f32(d_bits), 32, axis=1)
    assert np.array_equal(q.dequantize(), want)


@pytest.mark.parametrize("group_size", [0, 30, 2048, 32.0, 4])
def test_bad_group_sizes_are_rejected(group_size):
    with pytest.raises(ValueError, match="--group-size"):
        Int4Weight(np.ones((4, 64), np.float32), group_size=group_size)


def test_bf16_bits_and_float16_are_accepted_as_input():
    w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    bits = ref.f32_to_bf16(w)
    a, b = Int4Weight(bits), Int4Weight(ref.bf16_to_f32(bits))
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
    c, d = Int8Weight(w.astype(np.float16)), Int8Weight(w.astype(np.float16).astype(np.float32))
    assert np.array_equal(c.codes, d.codes)


@pytest.mark.parametrize("path", PATHS)
def test_low_level_kernels_refuse_arrays_of_the_wrong_size(path):
    q = Int4Weight(np.ones((32, 64), np.float32))
    args = (q.codes, q.scales.view(np.uint16), None, None, q.zero)
    if path == "amx":
        with pytest.raises(ValueError, match="packed kernel"):
            amx.GEMM[4](amx.packed_config(32), *args, np.ones((16, 64), np.float32), np.empty((16, 16), np.float32))
        return
    with pytest.raises(ValueError, match="packed kernel"):
        packed.GEMV[4, path](*args, np.ones((1, 32), np.float32), np.empty((1, 32), np.float32))
    with pytest.raises(ValueError, match="packed kernel"):
        packed.GEMM[4, path](*args, np.ones((4, 64), np.float32), np.empty((4, 16), np.float32))


def test_hand_written_ir_refuses_arrays_it_would_misread_when_typed():
    """The IR of simd.py and amx.py indexes raw pointers: an array of another dtype must
    stop Numba at typing (compiled only, never run, so the AMX check runs on any CPU)."""
    from numba import types
    from numba.core.errors import TypingError

    q = Int4Weight(np.ones((32, 64), np.float32))
    with pytest.raises(TypingError, match="packed_block: expected a C-contiguous 3-D uint16 or float32 array"):
        packed.GEMV[4, "portable"](q.codes, q.scales.astype(np.float64), None, None, q.zero,
                                   np.ones((1, 64), np.float32), np.empty((1, 32), np.float32))
    array = lambda dtype, ndim: types.Array(dtype, ndim, "C")  # noqa: E731
    with pytest.raises(TypingError, match="amx_block: expected a C-contiguous 3-D uint8 array"):
        amx.GEMM[4].compile((array(types.uint8, 1), array(types.uint8, 3), array(types.uint16, 3),
                             array(types.int8, 3), types.none, types.float32,
                             array(types.float32, 2), array(types.float32, 2)))
