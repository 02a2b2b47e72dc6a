"""bf16 weights multiplied as stored: decode and prefill, the same bits.

A bf16 weight is the top half of a float32, so 64 bytes of a checkpoint row
(32 weights), loaded as 16 32-bit lanes, widen to float32 in two instructions:
`lane << 16` is the even weight of each pair, `lane & 0xFFFF0000` the odd
one. The activations come paired the same way (`pair_activations`: per 32
inputs, the 16 even ones then the 16 odd ones), and two float32 FMAs per 32
weights do the rest. No copy of the weights, no repacked layout; the products
are exact (a bf16 weight times a float32 activation), only the float32 sums
round, as in the float32 GEMV.

The arithmetic of one output (row r, token t), whatever the call:

    acc = 16 float32 zeros
    for each 32 inputs k (the last ones zero-padded):
        acc = fma(even weights of w[r, k:k+32], even inputs of x[t, k:k+32], acc)
        acc = fma(odd weights, odd inputs, acc)
    out[t, r] = the 16 lanes summed as a tree: halves, then quarters, ...
                (`simd.reduce_lanes_together`, `reference.tree_sum_lanes`)

so the GEMV (decode: 8 rows x 1 token per step) and the GEMM (prefill: 4 rows
x 4 tokens per step, 16 accumulators in registers) give a token the same bits,
alone or among many (tested). `reference.matmul_bf16` is the definition.

Why not `vdpbf16ps` (AVX512-BF16), which multiplies bf16 pairs in one
instruction: it takes bf16 activations. Keeping the activations' precision
needs each one split in two bf16 numbers (hi + lo, as `amx.py` does), so two
`vdpbf16ps` per 32 weights, the FMAs' count; on Zen 4 a 512-bit `vdpbf16ps`
issues at the rate of a 512-bit FMA (one probe: 1.07 against 1.10 per ns), so
it was no faster (measured: docs/kernels.md), and hi + lo keeps 16 bits where
FMAs keep 24: it moved the Phi-3-small bf16 fixture's logits 1.4e-4 from the
reference, past the tests' 1e-4.

Cache blocking of the GEMM: each thread takes panels of 32 weight rows (16
past 4096 inputs), ~200 KB that stay in L2 while every block of 4 tokens
passes through; 4 rows x 4 tokens per step load 12 vectors for 32 FMAs. The
GEMV reads each weight once, 8 rows (8 streams) per step, with no software
prefetch: on Zen 4 (one thread, interleaved runs) 8 rows streamed faster than
4, and a prefetch 2 KB ahead of each row made both slower. The vectors are
512 bits: the path needs AVX-512 (`cpu.bf16_dot_path`).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types

from .simd import F32, I32, _fma, _load_vec, _vec, lane_block_kernel


INPUTS_PER_STEP = 32      # bf16 weights per 64-byte load
ROWS, TOKENS = 4, 4       # a GEMM step: 4 weight rows x 4 tokens, 16 accumulators
GEMV_ROWS = 8             # a GEMV step: 8 weight rows, 8 accumulators


def _widen_pairs(builder, words):
    """<16 x i32>, each two bf16 weights (2i in the low half, 2i+1 in the high) ->
    the even and the odd ones as <16 x float>: a shift and a mask, exact."""
    v16f, v16i = _vec(F32, 16), _vec(I32, 16)
    even = builder.shl(words, ir.Constant(v16i, [16] * 16))
    odd = builder.and_(words, ir.Constant(v16i, [0xFFFF0000 - 2**32] * 16))
    return builder.bitcast(even, v16f), builder.bitcast(odd, v16f)


def _load_paired(builder, x_data, at, const):
    """A token's 32 paired activations (`pair_activations`): the even ones, the odd ones."""
    v16f = _vec(F32, 16)
    return _load_vec(builder, x_data, at, v16f), _load_vec(builder, x_data, builder.add(at, const(16)), v16f)


def _two_fmas(builder, acc, words, x):
    """acc + the even weights times the even inputs, then + the odd times the odd."""
    even, odd = _widen_pairs(builder, words)
    return _fma(builder, odd, x[1], _fma(builder, even, x[0], acc))


def dot_block_kernel(n_rows, n_tok):
    """out[t0+t, r0+r] = widen(w[r0+r]) . x[t0+t] for r < n_rows, t < n_tok, over all
    inputs, x paired (`pair_activations`): `simd.lane_block_kernel` with two FMAs per
    32 weights."""
    return lane_block_kernel("dot_block", types.float32, n_rows, n_tok, _load_paired, _two_fmas)


_gemv_rows = dot_block_kernel(GEMV_ROWS, 1)
_gemv_row = dot_block_kernel(1, 1)
_gemm_rows = dot_block_kernel(ROWS, TOKENS)
_gemm_row = dot_block_kernel(1, TOKENS)


@njit(parallel=True, cache=True)
def pair_activations(x, x_pairs):
    """x (T, in) -> x_pairs (T_p, in_p): each 32 inputs as their 16 even ones, then
    the 16 odd ones, the order of a bf16 row's words once widened in pairs
    (`reference.pair_activations`); zeros beyond x."""
    n_tok, n_in = x.shape
    for t in prange(x_pairs.shape[0]):
        for k in range(x_pairs.shape[1]):
            c, i = k // INPUTS_PER_STEP, k % INPUTS_PER_STEP
            src = INPUTS_PER_STEP * c + (2 * i if i < 16 else 2 * (i - 16) + 1)
            x_pairs[t, k] = x[t, src] if (t < n_tok and src < n_in) else np.float32(0.0)


@njit(cache=True)
def paired_buffer(n_tok, n_in):
    return np.empty((n_tok, -(-n_in // INPUTS_PER_STEP) * INPUTS_PER_STEP), np.float32)


@njit(cache=True)
def check_shapes(w, x, out, tokens):
    """The IR does no bounds checks: refuse arrays that do not fit."""
    if (x.shape[1] != w.shape[1] or out.shape[1] != w.shape[0] or out.shape[0] < x.shape[0]
            or out.shape[0] % tokens):
        raise ValueError("bf16 dot kernel: x must be (T, in) and out (T rounded up, out)")


@njit(parallel=True, cache=True)
def gemv_bf16_dot(w, x, out):
    """out (1, out) = widen(w (out, in)) @ x (1, in): each thread streams a
    contiguous run of rows, eight at a time."""
    check_shapes(w, x, out, 1)
    x_pairs = paired_buffer(1, x.shape[1])
    pair_activations(x, x_pairs)
    n_out = w.shape[0]
    for b in prange(n_out // GEMV_ROWS):
        _gemv_rows(w, x_pairs, GEMV_ROWS * b, 0, out)
    for r in range(n_out // GEMV_ROWS * GEMV_ROWS, n_out):
        _gemv_row(w, x_pairs, r, 0, out)


@njit(parallel=True, cache=True)
def gemm_bf16_dot(w, x, out, panel):
    """out (T_p, out) = x (T, in) @ widen(w (out, in)).T, T_p = T rounded up to 4
    (zero tokens): each thread takes panels of `panel` rows (a multiple of 4)
    through every block of 4 tokens."""
    check_shapes(w, x, out, TOKENS)
    x_pairs = paired_buffer(out.shape[0], x.shape[1])
    pair_activations(x, x_pairs)
    n_out = w.shape[0]
    for p in prange(-(-n_out // panel)):
        end = min(n_out, (p + 1) * panel)
        for t0 in range(0, out.shape[0], TOKENS):
            for r0 in range(p * panel, end, ROWS):
                if r0 + ROWS <= end:
                    _gemm_rows(w, x_pairs, r0, t0, out)
                else:
                    for r in range(r0, end):
                        _gemm_row(w, x_pairs, r, t0, out)


def panel_rows(n_in):
    """Rows per GEMM panel: ~200 KB of bf16 weights, to stay in L2 (1-2 MB per core)."""
    return 32 if n_in <= 4096 else 16


def matmul(w, x):
    """x (T, in) float32 @ widen(w (out, in)).T through the kernels above: T = 1
    the GEMV, else the GEMM, its output padded to a multiple of 4 tokens."""
    n_tok, n_out = x.shape[0], w.shape[0]
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"bf16 dot kernel: activations {x.shape} do not fit weights {w.shape}")
    if n_tok == 1:
        out = np.empty((1, n_out), np.float32)
        gemv_bf16_dot(w, x, out)
        return out
    out = np.empty((-(-n_tok // TOKENS) * TOKENS, n_out), np.float32)
    gemm_bf16_dot(w, x, out, panel_rows(w.shape[1]))
    return out[:n_tok] if out.shape[0] != n_tok else out
