"""K-quant kernels (kernels/kquant.py) against their plain-NumPy twins in kernels.reference.

A `KQuantWeight` keeps llama.cpp's Q4_K / Q5_K / Q6_K super-blocks at their own
size: codes of 4-6 bits, an fp16 d (and dmin) per 256 inputs, integer scales (and
mins) per sub-block. Checked here, on random fields of awkward shapes and values:

* the records hold exactly `reference.dequantize_kquant` of the fields (bit for bit),
  at the bits per weight the layout promises;
* the GEMV and GEMM stay within float32's rounding of the float64 twin
  (`reference.matmul_kquant`: exact weights times int8 activations per 256 inputs);
  their integer sums are exact, so every path ("portable", "vnni" where the CPU has
  it) gives the same bits, and a token's output does not depend on how many tokens
  share the call.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minislm.kernels import KQuantWeight, cpu, kquant
from minislm.kernels import reference as ref
from test_kernels_packed import AWKWARD, activations, check_paths

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0 ** -24  # float32 unit roundoff
PATHS = ["portable"] + (["vnni"] if cpu.has_vnni() else [])
# float16 values at the edges: the largest, the smallest normal and subnormal, zero
FP16_EDGES = np.array([65504.0, 6.1035156e-05, 5.9604645e-08, 0.0, -0.0], np.float32)


def random_fields(rng, bits, n, supers, magnitude=0.02, pattern="random"):
    """(bits, codes, d, sub_scales, dmin, sub_mins) as a GGUF reader hands them over."""
    sub_block, _, has_mins = ref.KQUANT_KINDS[bits]
    k = ref.QK_K * supers

    def scale_of_scales():
        d = (rng.standard_normal((n, supers)) * magnitude).astype(np.float16).astype(np.float32)
        if pattern == "fp16 edges":
            mask = rng.random(d.shape) < 0.5
            d[mask] = rng.choice(FP16_EDGES, mask.sum()) * rng.choice([-1, 1], mask.sum())
        return (d * 0 if pattern == "zeros" else d).astype(np.float32)

    codes = rng.integers(0, 2**bits, (n, k), dtype=np.uint8)
    if has_mins:
        sc = rng.integers(0, 64, (n, k // sub_block), dtype=np.uint8)
        m = rng.integers(0, 64, (n, k // sub_block), dtype=np.uint8)
    else:
        sc, m = rng.integers(-128, 128, (n, k // sub_block)).astype(np.int8), None
    if pattern == "extremes":   # the largest codes and scales: the integer sums at their widest
        codes[:] = rng.choice([0, 2**bits - 1], codes.shape).astype(np.uint8)
        sc[:] = rng.choice([0, 63] if has_mins else [-128, 127], sc.shape).astype(sc.dtype)
        if has_mins:
            m[:] = 63
    return bits, codes, scale_of_scales(), sc, scale_of_scales() if has_mins else None, m


@st.composite
def kquant_fields(draw, max_rows=40, max_supers=3):
    """Random fields of every kind, awkward row counts, 1..max_supers super-blocks a row."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return random_fields(rng, draw(st.sampled_from([4, 5, 6])), min(draw(AWKWARD | st.integers(1, max_rows)), max_rows),
                         draw(st.integers(1, max_supers)), draw(st.sampled_from([1e-7, 1e-4, 0.02, 1.0, 30.0])),
                         draw(st.sampled_from(["random", "extremes", "fp16 edges", "zeros"])))


def make(fields):
    bits, codes, d, sc, dmin, m = fields
    return KQuantWeight.from_superblocks(codes, d, sc, dmin, m, bits)


# ---------------------------------------------------------------- the layout


@PROPERTY
@given(kquant_fields())
def test_records_are_the_twins_and_hold_exactly_the_fields_weights(fields):
    bits, codes, d, sc, dmin, m = fields
    q = make(fields)
    assert np.array_equal(q.records, ref.pack_superblocks(codes, d, sc, dmin, m, bits))   # the Numba packer's twin
    want = ref.dequantize_kquant(codes, d, sc, dmin, m, bits)
    assert np.array_equal(q.dequantize().view(np.uint32), want.view(np.uint32))   # -0.0 too
    back = ref.unpack_superblocks(q.records, bits)
    n = codes.shape[0]
    assert np.array_equal(back[0][:n], codes) and np.array_equal(back[1][:n], d) and np.array_equal(back[2][:n], sc)
    assert (back[0][n:] == 0).all() and (back[1][n:] == 0).all()   # padded rows: weight 0
    ids = np.arange(n)[::-3]
    assert np.array_equal(q.rows(ids), want[ids])


@pytest.mark.parametrize("bits,file_bytes", [(4, 144), (5, 176), (6, 210)])
def test_a_weight_costs_the_files_bits_plus_an_eighth_for_6_bit_scales_kept_as_bytes(bits, file_bytes):
    """Q4_K 4.5 bits a weight in the file, 4.625 here (16 sub-block scales and mins of 6
    bits stored as 16 bytes); Q5_K 5.5 and 5.625; Q6_K 6.5625 in both."""
    q = make(random_fields(np.random.default_rng(bits), bits, 32, 2))
    per_weight = q.nbytes * 8 / (16 * q.records.shape[0] * q.shape[1])
    assert per_weight == 8 * file_bytes / ref.QK_K + (0 if bits == 6 else 1 / 8)


def test_high_bits_sit_in_the_lane_of_their_nibbles():
    """Input i's top bits share the 32-bit lane (row) and byte position (i mod 4) of its
    nibble; bit field t of byte e of high tile m holds input (32/hb) m + 4 t + e."""
    for hb in (1, 2):
        per_tile = 32 // hb
        high = np.random.default_rng(hb).integers(0, 2**hb, (16, 2 * per_tile), dtype=np.uint8)
        tiles = ref.pack_high_bits(high, hb)
        assert tiles.shape == (1, 2, 64)
        for m in range(2):
            for r in range(16):
                for e in range(4):
                    for t in range(8 // hb):
                        field = (tiles[0, m, 4 * r + e] >> (hb * t)) & (2**hb - 1)
                        assert field == high[r, per_tile * m + 4 * t + e]
        assert np.array_equal(ref.unpack_high_bits(tiles, hb), high)


def test_record_layout_is_the_documented_one():
    """Offsets of docs/formats.md's drawing; a chunk is 4 nibble tiles then its high bits."""
    assert ref.kquant_layout(4) == {"d": 0, "dmin": 32, "scales": 64, "mins": 192, "chunks": 320,
                                    "chunk": 256, "record": 2368}
    assert ref.kquant_layout(5)["chunk"] == 320 and ref.kquant_layout(5)["record"] == 2880
    assert ref.kquant_layout(6) == {"d": 0, "dmin": None, "scales": 32, "mins": None, "chunks": 288,
                                    "chunk": 384, "record": 3360}


def test_from_superblocks_refuses_what_it_cannot_represent():
    codes = np.zeros((4, 256), np.uint8)
    d, sc = np.ones((4, 1), np.float32), np.ones((4, 8), np.uint8)
    with pytest.raises(ValueError, match="beyond 4 bits"):
        KQuantWeight.from_superblocks(codes + 16, d, sc, d, sc, bits=4)
    with pytest.raises(ValueError, match="multiple of 256"):
        KQuantWeight.from_superblocks(codes[:, :128], d, sc, d, sc, bits=4)
    with pytest.raises(ValueError, match="d must be finite float16 values"):
        KQuantWeight.from_superblocks(codes, d * 0.1, sc, d, sc, bits=4)   # 0.1 is no float16
    with pytest.raises(ValueError, match="d must be finite"):
        KQuantWeight.from_superblocks(codes, d * np.inf, sc, d, sc, bits=4)
    with pytest.raises(ValueError, match="sub_mins must be uint8 of shape"):
        KQuantWeight.from_superblocks(codes, d, sc, d, sc + 64, bits=5)
    with pytest.raises(ValueError, match="Q6_K has no dmin"):
        KQuantWeight.from_superblocks(codes, d, np.ones((4, 16), np.int8), d, sc, bits=6)
    with pytest.raises(ValueError, match="sub_scales must be int8"):
        KQuantWeight.from_superblocks(codes, d, np.ones((4, 16), np.uint8), bits=6)
    with pytest.raises(ValueError, match="4, 5 or 6"):
        KQuantWeight.from_superblocks(codes, d, sc, bits=3)


# ---------------------------------------------------------------- matmul


def f32_sum_bound(q, x):
    """Worst-case float32 rounding of the kernel's sums against the float64 twin: per
    super-block two terms (d x_scale acc, dmin x_scale msum), each rounded three times
    (int32 -> float32, times x_scale, the fused add), added one after another:
    depth 2 n_super + 3, over the sum of the magnitudes of every term (Higham's
    gamma_n), plus one subnormal ulp per rounding."""
    codes, d, sc, dmin, m = ref.unpack_superblocks(q.records, q.bits)
    sub_block, zero, has_mins = ref.KQUANT_KINDS[q.bits]
    rep = lambda a, size: np.repeat(np.abs(np.asarray(a, np.float64)), size, axis=1)  # noqa: E731
    weight = rep(d, ref.QK_K) * rep(sc, sub_block) * np.abs(codes.astype(np.float64) - zero)
    if has_mins:
        weight = weight + rep(dmin, ref.QK_K) * rep(m, sub_block)
    abs_xhat = []
    for row in x:
        xq, x_scale, _ = ref.kquant_activations(row, sub_block)
        abs_xhat.append(np.repeat(np.abs(x_scale.astype(np.float64)), ref.QK_K) * np.abs(xq))
    magnitude = (np.stack(abs_xhat) @ weight.T)[:, : q.shape[0]]
    depth = 2 * q.records.shape[1] + 3
    return depth * (U * magnitude + 2.0 ** -149)


def check_matmul(q, x, paths=PATHS):
    """q @ x within the float32 bound of the twin on each path, and the same bits on all."""
    check_paths(q, x, ref.matmul_kquant(x, q.records, q.bits, q.shape), f32_sum_bound(q, x), paths)


@PROPERTY
@given(kquant_fields(), st.data())
def test_gemv_matches_reference_on_every_path(fields, data):
    q = make(fields)
    check_matmul(q, data.draw(activations(1, q.shape[1])))


@PROPERTY
@given(kquant_fields(max_rows=33, max_supers=2), st.integers(2, 21), st.data())
def test_gemm_matches_reference_on_every_path(fields, n_tok, data):
    q = make(fields)
    check_matmul(q, data.draw(activations(n_tok, q.shape[1])))


@PROPERTY
@given(kquant_fields(max_rows=33, max_supers=2), st.integers(3, 9), st.data())
def test_prefill_and_decode_agree_bit_for_bit(fields, n_tok, data):
    """The GEMM runs the GEMV's arithmetic in the same order: a cached decode step
    reproduces the full forward exactly, and batched decoding is row-independent."""
    q = make(fields)
    x = data.draw(activations(n_tok, q.shape[1]))
    together = q.matmul(x)
    assert all(np.array_equal(together[t], q.matmul(x[t: t + 1])[0]) for t in range(n_tok))


@PROPERTY
@given(st.integers(1, 4), st.sampled_from([16, 32]), st.integers(0, 2**32 - 1),
       st.sampled_from(["normal", "zeros", "nan", "huge"]))
def test_activations_are_bit_identical_to_reference(supers, sub_block, seed, kind):
    x = np.random.default_rng(seed).standard_normal(supers * ref.QK_K).astype(np.float32)
    x[:ref.QK_K] = {"normal": x[:ref.QK_K], "zeros": 0.0, "nan": np.nan, "huge": 3e38}[kind]
    xq, scale = np.empty(x.size, np.int8), np.empty(supers, np.float32)
    bsums = np.empty(x.size // sub_block, np.int32)
    kquant.prepare_kquant_token(x, sub_block, xq, scale, bsums)
    want = ref.kquant_activations(x, sub_block)
    assert np.array_equal(xq, want[0]) and np.array_equal(bsums, want[2])
    np.testing.assert_array_equal(scale, want[1])   # NaN == NaN here


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_nan_in_activations_makes_every_output_nan(bits):
    q = make(random_fields(np.random.default_rng(bits), bits, 20, 2))
    x = np.ones((5, q.shape[1]), np.float32)
    x[:, 7] = np.nan
    assert np.isnan(q.matmul(x[:1])).all() and np.isnan(q.matmul(x)).all()


@pytest.mark.parametrize("path", PATHS)
def test_low_level_kernels_refuse_arrays_of_the_wrong_size(path):
    q = make(random_fields(np.random.default_rng(0), 4, 16, 1))
    with pytest.raises(ValueError, match="kquant kernel"):
        kquant.GEMV[path](q.records, 4, np.ones((1, 128), np.float32), np.empty((1, 16), np.float32))
    with pytest.raises(ValueError, match="kquant kernel"):
        kquant.GEMM[path](q.records, 5, np.ones((4, 256), np.float32), np.empty((4, 16), np.float32))
