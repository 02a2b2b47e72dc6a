"""bf16 kernels against their plain-NumPy twins in minislm.kernels.reference."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minislm.kernels import Bf16Weight, amx, bf16, bf16dot, bf16pairs, cpu
from minislm.kernels import reference as ref

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0 ** -24  # float32 unit roundoff
ALL_BF16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
FINITE_BF16 = ALL_BF16[(ALL_BF16 & 0x7F80) != 0x7F80]
AWKWARD = st.sampled_from([1, 3, 17, 33, 129, 200]) | st.integers(1, 300)
needs_avx512 = pytest.mark.skipif(not cpu.has_avx512(), reason="no AVX-512 on this CPU")
needs_avx512_bf16 = pytest.mark.skipif(not cpu.has_avx512_bf16(), reason="no AVX512-BF16 on this CPU")


def test_widening_in_the_kernel_is_exact_for_every_bf16_value():
    out = np.empty((1, ALL_BF16.size), np.float32)
    bf16.widen_bf16_rows(ALL_BF16[None, :], np.array([0]), out)
    assert np.array_equal(out[0].view(np.uint32), ref.bf16_to_f32(ALL_BF16).view(np.uint32))


def test_every_finite_bf16_value_survives_a_round_trip_through_float32():
    assert np.array_equal(ref.f32_to_bf16(ref.bf16_to_f32(FINITE_BF16)), FINITE_BF16)


def nearest_even_bf16(x):
    """Independent oracle: pick the nearer of the two bf16 neighbours of x
    (compared in float64), the one with an even mantissa on a tie."""
    bits = np.float32(x).view(np.uint32)
    down = np.uint16(bits >> 16)            # truncation: toward zero
    up = np.uint16(down + 1)                # next away from zero
    vx, vd, vu = (float(np.float32(x)), float(ref.bf16_to_f32(down)), float(ref.bf16_to_f32(up)))
    if up & 0x7FFF == 0x7F80:       # past the largest bf16: IEEE rounds as if to 2**128
        vu = float(np.copysign(2.0 ** 128, vx))
    if abs(vx - vd) != abs(vu - vx):
        return down if abs(vx - vd) < abs(vu - vx) else up
    return down if down % 2 == 0 else up


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
edge_f32 = st.sampled_from([65504.0, 6.1035156e-05, 5.9604645e-08, 3.3895314e38, 3.4028235e38,
                            1.1754944e-38, 9.1835e-41, 1e-45, 0.0, -0.0,
                            1.00390625, 1.01171875])  # the last two are exact ties


@settings(max_examples=300, deadline=None)
@given(finite_f32 | edge_f32)
def test_rounding_to_bf16_is_nearest_even(x):
    assert ref.f32_to_bf16(np.array([x], np.float32))[0] == nearest_even_bf16(x)


@st.composite
def bf16_weights(draw, max_rows=40, max_cols=300):
    n, k = min(draw(AWKWARD), max_rows), min(draw(AWKWARD), max_cols)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):   # any finite bf16 bit pattern: subnormals, +-0, huge
        return rng.choice(FINITE_BF16[np.abs(ref.bf16_to_f32(FINITE_BF16)) < 1e4], (n, k))
    return ref.f32_to_bf16(rng.standard_normal((n, k)).astype(np.float32))


def f32_dot_bound(w_bits, x):
    """Worst-case rounding of an n-term float32 dot product, Higham's gamma_n
    (n = inputs + 2), in any summation order: the kernel's vector sums differ
    from the float64 reference only by this."""
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(ref.bf16_to_f32(w_bits).astype(np.float64)).T
    return (w_bits.shape[1] + 2) * (U * magnitude + 2.0 ** -149)


def lanes_dot_bound(w_bits, x):
    """Higham's gamma_n over sum |w| |x| for the lanes' order (`bf16dot.py`): each
    product meets 2 ceil(in / 32) FMAs in its lane and 4 additions of the tree."""
    n = 2 * -(-w_bits.shape[1] // 32) + 4
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(ref.bf16_to_f32(w_bits).astype(np.float64)).T
    return n * (U * magnitude + 2.0 ** -149)


# what each path computes (reference.py), and how far its float32 sums may stray from it
PATH_REFERENCE = {"portable": (ref.matmul_bf16, f32_dot_bound), "avx512": (ref.matmul_bf16, lanes_dot_bound)}


@pytest.mark.parametrize("path", ["portable", pytest.param("avx512", marks=needs_avx512)])
@PROPERTY
@given(w_bits=bf16_weights(max_rows=40, max_cols=300), n_tok=st.integers(1, 13), seed=st.integers(0, 2**32 - 1))
def test_every_path_matches_its_reference(path, w_bits, n_tok, seed):
    """portable: the float32 GEMV, or tiles BLAS multiplies; avx512: the weights
    widened in registers, FMAs in lanes (the GEMV's 8 rows, the GEMM's 4x4 blocks)."""
    x = np.random.default_rng(seed).standard_normal((n_tok, w_bits.shape[1])).astype(np.float32)
    y = Bf16Weight(w_bits).matmul(x, path=path)
    assert y.shape == (n_tok, w_bits.shape[0]) and y.dtype == np.float32
    reference, bound = PATH_REFERENCE[path]
    assert (np.abs(y - reference(x, w_bits)) <= bound(w_bits, x)).all()


def test_tiled_gemm_crosses_tile_boundaries():
    rng = np.random.default_rng(0)
    from minislm.kernels import fp32
    w_bits = ref.f32_to_bf16(rng.standard_normal((100, 64)).astype(np.float32))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    b = Bf16Weight(w_bits)
    y = fp32.matmul_by_tiles(x, 100, lambda s, e, buf: bf16.widen_bf16_block(w_bits, s, buf),
                             tile_bytes=16 * 64 * 4)   # 16-row tiles: 7 tiles, the last one short
    np.testing.assert_array_equal(y, b.matmul(x, path="portable"))
    block, rows = np.empty((4, 64), np.float32), np.empty((4, 64), np.float32)
    bf16.widen_bf16_block(w_bits, 96, block)  # the last 4 rows, serial
    bf16.widen_bf16_rows(w_bits, np.arange(96, 100), rows)  # the same rows, gathered in parallel
    np.testing.assert_array_equal(block, rows)
    assert (np.abs(y - ref.matmul_bf16(x, w_bits)) <= f32_dot_bound(w_bits, x)).all()


@PROPERTY
@given(bf16_weights(), st.data())
def test_rows_are_exact(w_bits, data):
    ids = data.draw(st.lists(st.integers(0, w_bits.shape[0] - 1), min_size=1, max_size=8))
    assert np.array_equal(Bf16Weight(w_bits).rows(ids), ref.bf16_to_f32(w_bits[ids]))


def test_float_input_is_rounded_and_uint16_input_is_kept_without_a_copy():
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    assert np.array_equal(Bf16Weight(w).bits, ref.f32_to_bf16(w))
    assert np.array_equal(Bf16Weight(w.astype(np.float16)).bits, ref.f32_to_bf16(w.astype(np.float16).astype(np.float32)))
    bits = ref.f32_to_bf16(w)
    b = Bf16Weight(bits)
    assert np.shares_memory(b.bits, bits) and b.nbytes == w.nbytes // 2 and b.shape == (8, 16)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected_with_their_count(bad):
    w = np.ones((4, 8), np.float32)
    w[1, 1] = bad
    with pytest.raises(ValueError, match=r"lm_head: 1 of 32 values are NaN or inf"):
        Bf16Weight(w, name="lm_head")
    with pytest.raises(ValueError, match=r"lm_head: 1 of 32 bf16 values are NaN or inf"):
        Bf16Weight(ref.f32_to_bf16(w), name="lm_head")


def test_values_beyond_bf16_range_are_rejected():
    w = np.full((2, 2), 3.4e38, np.float32)
    with pytest.raises(ValueError, match="exceed bfloat16's range"):
        Bf16Weight(w)


def test_tensors_round_trip_in_place(tmp_path):
    w = Bf16Weight(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    (name, bits), = w.tensors("model.embed_tokens").items()
    assert name == "model.embed_tokens.weight" and bits.dtype == np.uint16
    np.save(tmp_path / "w.npy", bits)
    mapped = np.load(tmp_path / "w.npy", mmap_mode="r")
    back = Bf16Weight.from_tensors({name: mapped}, "model.embed_tokens")
    assert np.shares_memory(back.bits, mapped)
    x = np.ones((1, 16), np.float32)
    assert np.array_equal(back.matmul(x), w.matmul(x))


# ---------------------------------------------------------------- AMX (bf16 tiles), where the CPU has it

needs_amx = pytest.mark.skipif(not cpu.has_amx_bf16(), reason="no AMX-BF16 on this CPU (or not granted by the OS)")


@settings(max_examples=200, deadline=None)
@given(finite_f32 | edge_f32)
def test_activations_split_into_two_bf16_keep_16_significant_bits(x):
    if abs(x) > 3.3e38:   # hi would round to inf: activations never come near
        return
    hi, lo = ref.split_bf16(np.array([x], np.float32))
    rest = abs(float(x) - float(ref.bf16_to_f32(hi)[0]) - float(ref.bf16_to_f32(lo)[0]))
    assert rest <= 2.0 ** -16 * abs(x) + 2.0 ** -134   # + half of bf16's subnormal spacing


@PROPERTY
@given(st.integers(1, 40), st.integers(1, 8).map(lambda m: 32 * m), st.integers(0, 2**32 - 1))
def test_the_kernel_splits_activations_as_the_reference(n_tok, k, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((32 * -(-n_tok // 32), k)) * rng.choice([1e-30, 1.0, 1e30])).astype(np.float32)
    x_hi = np.empty((x.shape[0] // 16, k // 2, 32), np.uint16)
    x_lo = np.empty_like(x_hi)
    amx.split_bf16_activations(x, x_hi, x_lo)
    hi, lo = ref.split_bf16(x)
    as_b = lambda a: a.reshape(-1, 16, k // 2, 2).transpose(0, 2, 1, 3).reshape(x_hi.shape)  # noqa: E731
    assert np.array_equal(x_hi, as_b(hi)) and np.array_equal(x_lo, as_b(lo))


def amx_bound(w_bits, x):
    """float32 sums (Higham's gamma_n, n = inputs + 2) plus what AMX flushes:
    operands and partial sums below 2**-126 count as zero."""
    w = np.abs(ref.bf16_to_f32(w_bits).astype(np.float64))
    ax = np.abs(x.astype(np.float64))
    flushed = 2.0 ** -126 * (ax.sum(axis=1, keepdims=True) + w.sum(axis=1)[None, :] + 2 * w_bits.shape[1])
    return f32_dot_bound(w_bits, x) + flushed


@needs_amx
@PROPERTY
@given(bf16_weights(max_rows=80, max_cols=200), st.integers(16, 50), st.integers(0, 2**32 - 1))
def test_amx_prefill_matches_the_split_reference(w_bits, n_tok, seed):
    """Rows beyond the last multiple of 32, and inputs not a multiple of 32, go
    through BLAS with the same split activations; everything within the bound."""
    x = np.random.default_rng(seed).standard_normal((n_tok, w_bits.shape[1])).astype(np.float32)
    y = Bf16Weight(w_bits).matmul(x, path="amx")
    assert y.shape == (n_tok, w_bits.shape[0]) and y.dtype == np.float32
    want = ref.matmul_bf16_split(x, w_bits) if w_bits.shape[1] % 32 == 0 else ref.matmul_bf16(x, w_bits)
    assert (np.abs(y - want) <= amx_bound(w_bits, x)).all()


@needs_amx
def test_amx_prefill_is_within_the_split_error_of_float32():
    """hi + lo keeps 16 of the activations' 24 bits: the product moves by at most
    2**-16 sum |w| |x| (plus the float32 sums) from the exact one."""
    rng = np.random.default_rng(1)
    w_bits = ref.f32_to_bf16(rng.standard_normal((96, 256)).astype(np.float32))
    x = rng.standard_normal((40, 256)).astype(np.float32)
    y = Bf16Weight(w_bits).matmul(x, path="amx")
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(ref.bf16_to_f32(w_bits).astype(np.float64)).T
    assert (np.abs(y - ref.matmul_bf16(x, w_bits)) <= 2.0 ** -16 * magnitude + amx_bound(w_bits, x)).all()


# ---------------------------------------------------------------- weights widened in registers (AVX-512)


@needs_avx512
@PROPERTY
@given(bf16_weights(max_rows=40, max_cols=300), st.integers(2, 13), st.integers(0, 2**32 - 1))
def test_avx512_gives_a_token_the_same_bits_alone_or_among_many(w_bits, n_tok, seed):
    """Decode (GEMV, 8 rows a step) and prefill (GEMM, 4 rows x 4 tokens) sum each
    output in the same order: what a token gets does not depend on how many
    tokens share the call."""
    x = np.random.default_rng(seed).standard_normal((n_tok, w_bits.shape[1])).astype(np.float32)
    w = Bf16Weight(w_bits)
    many = w.matmul(x, path="avx512")
    alone = np.concatenate([w.matmul(x[t: t + 1], path="avx512") for t in range(n_tok)])
    assert np.array_equal(many.view(np.uint32), alone.view(np.uint32))


@needs_avx512
@PROPERTY
@given(st.integers(1, 9), st.integers(1, 100), st.integers(0, 2**32 - 1))
def test_activations_are_paired_as_the_reference_and_padded_with_zeros(n_tok, k, seed):
    x = np.random.default_rng(seed).standard_normal((n_tok, k)).astype(np.float32)
    k_p = 32 * -(-k // 32)
    x_pairs = np.full((n_tok + 3, k_p), 7, np.float32)
    bf16dot.pair_activations(x, x_pairs)
    assert np.array_equal(x_pairs[:n_tok], ref.pair_activations(x))
    assert not x_pairs[n_tok:].any()


@needs_avx512
@pytest.mark.parametrize("n_tok", [1, 6])
def test_avx512_reads_nothing_past_a_row(n_tok):
    """Inputs not a multiple of 32: the last weights of a row are copied, not
    loaded 64 bytes at a time, so the words after the last row (here NaN, in
    general memory the array does not own) never meet a zero activation."""
    rng = np.random.default_rng(2)
    n, k = 6, 45
    memory = np.full(n * k + 64, 0x7FC0, np.uint16)   # NaN everywhere
    w_bits = memory[: n * k].reshape(n, k)
    w_bits[:] = ref.f32_to_bf16(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    y = Bf16Weight(w_bits).matmul(x, path="avx512")
    assert (np.abs(y - ref.matmul_bf16(x, w_bits)) <= lanes_dot_bound(w_bits, x)).all()


@pytest.mark.parametrize("activations, path", [pytest.param("float32", "avx512", marks=needs_avx512),
                                               pytest.param("bf16", "avx512bf16", marks=needs_avx512_bf16),
                                               ("bf16", "portable")])
def test_a_nan_activation_makes_its_token_nan_and_leaves_the_others(activations, path):
    """Also when rounded to bf16: a NaN stays a NaN (reference.bf16_activations)."""
    rng = np.random.default_rng(3)
    w_bits = ref.f32_to_bf16(rng.standard_normal((12, 64)).astype(np.float32))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    x[2, 17] = np.nan
    y = Bf16Weight(w_bits, activations=activations).matmul(x, path=path)
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()


# ---------------------------------------------------------------- activations rounded to bf16 (vdpbf16ps where the CPU has it)


def flush_bound(w_bits, xr):
    """What vdpbf16ps may drop beyond float32 rounding: every operand below 2**-126
    is read as zero (losing |d| |other| < 2**-126 |other|), and each of a lane's
    2 ceil(in / 32) results below 2**-126 is flushed (in_p of them per output)."""
    w = np.abs(ref.bf16_to_f32(w_bits).astype(np.float64))
    ax = np.abs(xr.astype(np.float64))
    n_p = 32 * -(-w_bits.shape[1] // 32)
    return 2.0 ** -126 * (ax.sum(axis=1, keepdims=True) + w.sum(axis=1)[None, :] + n_p)


# path -> how far its float32 sums of the exact bf16 x bf16 products may stray
ROUNDED_BOUND = {"portable": f32_dot_bound, "avx512": lanes_dot_bound,
                 "avx512bf16": lambda w, xr: lanes_dot_bound(w, xr) + flush_bound(w, xr)}
SCALES = st.sampled_from([1.0, 1e-3, 1e-20, 1e-36, 1e-39, 1e20])   # 1e-36 and below: products under 2**-126


@pytest.mark.parametrize("path", ["portable", pytest.param("avx512", marks=needs_avx512),
                                  pytest.param("avx512bf16", marks=needs_avx512_bf16)])
@PROPERTY
@given(w_bits=bf16_weights(max_rows=40, max_cols=300), n_tok=st.integers(1, 13), scale=SCALES,
       seed=st.integers(0, 2**32 - 1))
def test_bf16_activations_on_every_path_are_exact_products_of_the_rounded_numbers(path, w_bits, n_tok, scale, seed):
    """Every path multiplies the same bf16 numbers: the activations rounded to bf16
    (reference.bf16_activations), times the weights, the products exact; the paths
    differ only in the order of their float32 sums and in what vdpbf16ps flushes."""
    x = (np.random.default_rng(seed).standard_normal((n_tok, w_bits.shape[1])) * scale).astype(np.float32)
    y = Bf16Weight(w_bits, activations="bf16").matmul(x, path=path)
    assert y.shape == (n_tok, w_bits.shape[0]) and y.dtype == np.float32
    xr = ref.bf16_to_f32(ref.bf16_activations(x))
    assert (np.abs(y - ref.matmul_bf16(xr, w_bits)) <= ROUNDED_BOUND[path](w_bits, xr)).all()


@needs_avx512_bf16
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w_bits=bf16_weights(max_rows=24, max_cols=200), n_tok=st.integers(1, 9), scale=SCALES,
       seed=st.integers(0, 2**32 - 1))
def test_vdpbf16ps_kernel_equals_its_twin_bit_for_bit(w_bits, n_tok, scale, seed):
    """reference.dpbf16ps follows Intel's pseudo-code (per lane the odd product is
    added first, each addition rounded, denormals flushed): the kernel, run on this
    CPU, gives exactly its bits. A twin adding the even product first, or both at
    once, differed in most random vectors on Zen 4."""
    x = (np.random.default_rng(seed).standard_normal((n_tok, w_bits.shape[1])) * scale).astype(np.float32)
    y = bf16pairs.matmul(w_bits, x)
    assert np.array_equal(y.view(np.uint32), ref.matmul_bf16_pairs(x, w_bits).view(np.uint32))


@needs_avx512_bf16
def test_vdpbf16ps_flushes_denormal_operands_and_results():
    """A product below 2**-126 becomes zero, and so does a denormal weight or
    activation; the exact-products paths keep them. A sum of such products comes out
    0 on vdpbf16ps and tiny but non-zero elsewhere, both within the tested bound."""
    tiny = ref.f32_to_bf16(np.array([2.0 ** -70], np.float32))        # tiny * tiny = 2**-140
    denormal = np.array([0x0001], np.uint16)                          # the smallest bf16 denormal
    w_bits = np.concatenate([np.repeat(tiny, 32), np.repeat(denormal, 32)])[None, :]
    x = np.concatenate([np.full(32, 2.0 ** -70), np.ones(32)]).astype(np.float32)[None, :]
    y = Bf16Weight(w_bits, activations="bf16").matmul(x, path="avx512bf16")
    assert y[0, 0] == 0 and ref.matmul_bf16_pairs(x, w_bits)[0, 0] == 0
    assert Bf16Weight(w_bits, activations="bf16").matmul(x, path="portable")[0, 0] > 0


@settings(max_examples=300, deadline=None)
@given(finite_f32 | edge_f32 | st.sampled_from([np.inf, -np.inf, np.nan]))
def test_activations_round_to_nearest_even_and_nan_stays_nan(v):
    x = np.array([[v, -v]], np.float32)
    words = np.empty((4, 32), np.uint16)   # padded: tokens to 4, inputs to 32, zeros there
    bf16pairs.bf16_activations(x, words)
    want = ref.bf16_activations(x)
    assert np.array_equal(words[:1, :2], want) and not words[1:].any() and not words[0, 2:].any()
    if np.isnan(v):
        assert (want == ref.BF16_QUIET_NAN).all()
    elif abs(v) <= 3.3e38:   # below the rounding to inf: the nearest-even oracle above
        assert want[0, 0] == nearest_even_bf16(v)


def test_activations_round_as_torch_rounds_them():
    """The rounding torch applies in `x.to(torch.bfloat16)`, which transformers' bf16
    modules see, is the one the activations get here, NaN and inf included."""
    from conftest import import_reference

    torch, _ = import_reference()
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(20000) * 10.0 ** rng.integers(-40, 38, 20000)).astype(np.float32)
    x[:4] = [np.nan, np.inf, -np.inf, 3.4e38]
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = ref.bf16_activations(x)
    assert np.array_equal(np.isnan(ref.bf16_to_f32(ours)), np.isnan(x))
    same = ~np.isnan(x)
    assert np.array_equal(ours[same], theirs[same])


@needs_avx512_bf16
@PROPERTY
@given(bf16_weights(max_rows=40, max_cols=300), st.integers(2, 13), st.integers(0, 2**32 - 1))
def test_vdpbf16ps_gives_a_token_the_same_bits_alone_or_among_many(w_bits, n_tok, seed):
    x = np.random.default_rng(seed).standard_normal((n_tok, w_bits.shape[1])).astype(np.float32)
    many = bf16pairs.matmul(w_bits, x)
    alone = np.concatenate([bf16pairs.matmul(w_bits, x[t: t + 1]) for t in range(n_tok)])
    assert np.array_equal(many.view(np.uint32), alone.view(np.uint32))


@needs_avx512_bf16
@pytest.mark.parametrize("n_rows", [3, 6, 41])
def test_vdpbf16ps_reads_nothing_past_a_row(n_rows):
    """Inputs not a multiple of 32: the last words of a row are copied, so the NaN
    words after the last row never meet a zero activation. 3 and 41 rows: rows
    left over from the blocks of 4, multiplied one at a time."""
    rng = np.random.default_rng(2)
    k = 45
    memory = np.full(n_rows * k + 64, 0x7FC0, np.uint16)   # NaN everywhere
    w_bits = memory[: n_rows * k].reshape(n_rows, k)
    w_bits[:] = ref.f32_to_bf16(rng.standard_normal((n_rows, k)).astype(np.float32))
    x = rng.standard_normal((6, k)).astype(np.float32)
    assert np.array_equal(bf16pairs.matmul(w_bits, x), ref.matmul_bf16_pairs(x, w_bits))


def test_activations_are_a_view_of_the_same_words_and_checked():
    w = Bf16Weight(np.ones((4, 8), np.float32))
    rounded = w.with_activations("bf16")
    assert rounded.bits is w.bits and rounded.activations == "bf16" and w.activations == "float32"
    assert "bf16 activations" in repr(rounded)
    with pytest.raises(ValueError, match="activations must be one of float32, bf16"):
        w.with_activations("int8")
    with pytest.raises(ValueError, match="lm_head: activations must be"):
        Bf16Weight(np.ones((4, 8), np.float32), name="lm_head", activations="fp8")
    with pytest.raises(ValueError, match="multiplies bf16 activations"):
        w.matmul(np.ones((2, 8), np.float32), path="avx512bf16")


def test_vdpbf16ps_is_refused_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(cpu, "has_avx512_bf16", lambda: False)
    w = Bf16Weight(np.ones((4, 8), np.float32), activations="bf16")
    with pytest.raises(ValueError, match="no AVX512-BF16"):
        w.matmul(np.ones((2, 8), np.float32), path="avx512bf16")


def test_the_default_paths_are_the_ones_the_cpu_offers():
    paths = cpu.kernel_paths()
    expect = "avx512" if cpu.has_avx512() and cpu.allowed("vnni") else "portable"
    assert paths["bf16 decode"] == expect
    assert paths["bf16 prefill"] == ("amx" if cpu.has_amx_bf16() and cpu.allowed("amx") else expect)
    rounded = "avx512bf16" if cpu.has_avx512_bf16() and cpu.allowed("vnni") else expect
    assert paths["bf16 x bf16 prefill"] == ("amx" if paths["bf16 prefill"] == "amx" else rounded)
