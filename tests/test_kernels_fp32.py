"""fp32 kernels against their plain-NumPy twins in minislm.kernels.reference."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minislm.kernels import Bf16Weight, DecodeRows, Fp32Weight, fp32
from minislm.kernels import reference as ref

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U = 2.0 ** -24
AWKWARD = st.sampled_from([1, 3, 5, 17, 33, 129]) | st.integers(1, 200)


def f32_dot_bound(w, x):
    """Worst-case float32 rounding of an n-term dot product in any order
    (Higham's gamma_n, n = inputs + 2): the Numba kernels reorder sums freely
    (fastmath), the float64 reference is exact to this precision."""
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    return (w.shape[1] + 2) * (U * magnitude + 2.0 ** -149)


@st.composite
def problem(draw, max_tok=1):
    n, k, t = draw(AWKWARD), draw(AWKWARD), draw(st.integers(1, max_tok))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-20, 1.0, 1e15]))
    w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    return w, rng.standard_normal((t, k)).astype(np.float32)


@PROPERTY
@given(problem())
def test_gemv_matches_reference(case):
    w, x = case
    out = np.empty(w.shape[0], np.float32)
    fp32.gemv(w, x, out[None])
    assert (np.abs(out - ref.matmul_f32(x, w)[0]) <= f32_dot_bound(w, x)[0]).all()


@PROPERTY
@given(problem(max_tok=11))
def test_blocked_gemm_matches_reference_on_ragged_edges(case):
    w, x = case
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    fp32.gemm_f32(x, w, out)
    assert (np.abs(out - ref.matmul_f32(x, w)) <= f32_dot_bound(w, x)).all()


@PROPERTY
@given(problem(max_tok=6))
def test_weight_matmul_matches_reference(case):
    w, x = case
    y = Fp32Weight(w).matmul(x)
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == np.float32
    assert (np.abs(y - ref.matmul_f32(x, w)) <= f32_dot_bound(w, x)).all()


def test_rows_tensors_and_errors():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = Fp32Weight(w)
    assert np.array_equal(f.rows([2, 0]), w[[2, 0]]) and f.nbytes == 48 and f.shape == (3, 4)
    assert np.shares_memory(Fp32Weight.from_tensors(f.tensors("p"), "p").w, w)
    with pytest.raises(IndexError):
        f.rows([3])
    with pytest.raises(ValueError, match="do not fit a weight with 4 inputs"):
        f.matmul(np.ones((1, 5), np.float32))
    assert np.array_equal(Fp32Weight(ref.f32_to_bf16(w)).w, ref.bf16_to_f32(ref.f32_to_bf16(w)))
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="q_proj: 1 of 12 values are NaN or inf"):
        Fp32Weight(w, name="q_proj")


# ---------------------------------------------------------------- decode rows (batched decoding)


@PROPERTY
@given(problem(max_tok=9), st.booleans())
def test_decode_rows_give_each_row_the_bits_it_gets_alone(case, bf16_weights):
    """Batched decoding's rule (docs/serve.md): a sequence's next token must not depend on
    which other sequences share the step. `DecodeRows` multiplies B rows at once with the
    GEMV kernel, each row exactly as a one-row call does; and matches the reference."""
    w, x = case
    weight = Bf16Weight(ref.f32_to_bf16(np.clip(w, -1e38, 1e38))) if bf16_weights else w
    rows = DecodeRows(weight)
    together = rows.matmul(x)  # (B, out)
    alone = np.concatenate([rows.matmul(x[t : t + 1]) for t in range(len(x))])
    assert together.shape == (len(x), w.shape[0]) and together.dtype == np.float32
    assert np.array_equal(together.view(np.uint32), alone.view(np.uint32))
    exact = ref.bf16_to_f32(weight.bits) if bf16_weights else w
    assert (np.abs(together - ref.matmul_f32(x, exact)) <= f32_dot_bound(exact, x)).all()


def test_decode_rows_use_the_weight_in_place_and_its_own_rows():
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows = DecodeRows(w)
    assert np.shares_memory(rows.weight.w, w) and rows.shape == (3, 4) and rows.nbytes == 48
    assert np.array_equal(rows.rows([2, 0]), w[[2, 0]])
    with pytest.raises(ValueError, match="do not fit a weight with 4 inputs"):
        rows.matmul(np.ones((2, 5), np.float32))
