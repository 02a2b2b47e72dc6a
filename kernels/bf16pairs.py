"""bf16 activations times bf16 weights, a pair per lane: `vdpbf16ps` (AVX512-BF16).

transformers in bf16 rounds the activations to bf16 before every linear layer
and multiplies bf16 by bf16. This is that product on CPUs with AVX512-BF16
(AMD Zen 4+, Intel Cooper Lake and Sapphire Rapids+). One `vdpbf16ps` takes 32
bf16 weights and 32 bf16 activations and adds, into each of its 16 float32
lanes, the products of one pair:

    lane i:  acc = acc + x[2i+1] * w[2i+1]     (rounded to float32, nearest-even)
             acc = acc + x[2i]   * w[2i]       (rounded again)

with denormal operands read as zero and denormal results flushed to zero
(Intel's SDM; checked on Zen 4, `reference.dpbf16ps` is the definition). That
is 32 multiply-adds per instruction where `bf16dot.py`'s two float32 FMAs do
32 per two: the same issue rate on Zen 4, so about twice the products per
second, and float32 BLAS's rate doubled.

A checkpoint row's 32 consecutive bf16 weights are one operand as they are
stored, and 32 consecutive activations rounded to bf16 the other: no repacked
weights, no paired activations. Lanes run along the inputs, so each output's
16 lanes are summed at the end, as a fixed tree (halves, quarters, ...: the
order of `bf16dot.py`'s sums). The arithmetic of one output (row r, token t)
is therefore the same in every block shape, and a token gets the same bits
alone or among many:

    acc = 16 float32 zeros
    for each 32 inputs k (the last ones zero-padded):
        acc = vdpbf16ps(acc, w[r, k:k+32], bf16(x[t, k:k+32]))
    out[t, r] = the 16 lanes summed as a tree

Blocking: 4 weight rows x 4 tokens per step (16 accumulators, 8 vector loads
per 16 instructions); panels of rows that stay in L2 while every block of 4
tokens passes, as in `bf16dot.gemm_bf16_dot`; the threads share the panels. At
the end of a block the 16 accumulators are reduced together, pairwise, so the
16 trees cost 15 vector additions instead of 60
(`simd.reduce_lanes_together`; `simd.lane_block_kernel` is the block, shared with
`bf16dot.py`).

Only where the CPU has AVX512-BF16 (`cpu.has_avx512_bf16`): elsewhere
`Bf16Weight` rounds the activations to bf16 the same way and multiplies them
through its own paths (exact products, float32 sums in another order).
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils

from .scalars import f32_to_bits, round_to_bf16
from .threads import get_threads
from .simd import F32, I32, _load_vec, _vec, lane_block_kernel

INPUTS_PER_STEP = 32    # bf16 weights per 64-byte load, one vdpbf16ps
ROWS, TOKENS = 4, 4     # a GEMM step: 4 weight rows x 4 tokens, 16 accumulators
QUIET_NAN = 0x7FC0      # what a NaN activation becomes (torch's bf16 NaN)


class _BFloat(ir.types._BaseFloatType):
    """LLVM's `bfloat`, which llvmlite does not name: the operand type of
    `llvm.x86.avx512bf16.dpbf16ps.512` since LLVM 17."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"


_BFloat._create_instance()
BF16 = _BFloat()


def _dpbf16ps(builder, acc, a, b):
    """acc <16 x float> + the pairwise products of a, b (<16 x i32>: two bf16 each)."""
    v16f, v32b = _vec(F32, 16), _vec(BF16, 32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v32b, v32b]),
                                        "llvm.x86.avx512bf16.dpbf16ps.512")
    return builder.call(fn, [acc, builder.bitcast(a, v32b), builder.bitcast(b, v32b)])


def _load_words(builder, x_data, at, const):
    """A token's 32 bf16 activations, as they lie: <16 x i32>."""
    return _load_vec(builder, x_data, at, _vec(I32, 16))


def pairs_block_kernel(n_rows, n_tok):
    """out[t0+t, r0+r] = w[r0+r] . xb[t0+t] for r < n_rows, t < n_tok, over all inputs,
    xb the activations' bf16 words (`bf16_activations`): `simd.lane_block_kernel` with
    one vdpbf16ps per 32 weights."""
    return lane_block_kernel("pairs_block", types.uint16, n_rows, n_tok, _load_words, _dpbf16ps)


_gemm_rows = pairs_block_kernel(ROWS, TOKENS)
_gemm_row = pairs_block_kernel(1, TOKENS)


@njit(inline="always")
def activation_word(x):
    """The bf16 word nearest to float32 `x`, ties to even (`scalars.round_to_bf16`),
    NaN kept a NaN (`reference.bf16_activations`)."""
    if f32_to_bits(x) & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
        return np.uint16(QUIET_NAN)
    return np.uint16(round_to_bf16(x))


@njit(cache=True)
def bf16_activations(x, xb):
    """x (T, in) float32 -> xb (T_p, in_p) bf16 words (`reference.bf16_activations`),
    zeros beyond x: T_p >= T tokens, in_p >= in inputs. On one thread: ~30 GB/s
    of float32 read on Zen 4, 1-3 % of the GEMM after it, and one parallel region
    fewer to wake the threads for (on a busy machine each costs a time slice)."""
    n_tok, n_in = x.shape
    for t in range(xb.shape[0]):
        if t < n_tok:
            for k in range(n_in):
                xb[t, k] = activation_word(x[t, k])
            for k in range(n_in, xb.shape[1]):
                xb[t, k] = 0
        else:
            for k in range(xb.shape[1]):
                xb[t, k] = 0


@njit(cache=True)
def check_shapes(w, x, out):
    """The IR does no bounds checks: refuse arrays that do not fit."""
    if (x.shape[1] != w.shape[1] or out.shape[1] != w.shape[0] or out.shape[0] < x.shape[0]
            or out.shape[0] % TOKENS):
        raise ValueError("bf16 pairs kernel: x must be (T, in) and out (T rounded up to 4, out)")


@njit(parallel=True, cache=True)
def gemm_bf16_pairs(w, x, out, panel):
    """out (T_p, out) = bf16(x (T, in)) @ w (out, in).T, bf16 times bf16 summed in
    float32, T_p = T rounded up to 4 (zero tokens): each thread takes panels of
    `panel` rows (a multiple of 4) through every block of 4 tokens."""
    check_shapes(w, x, out)
    xb = np.empty((out.shape[0], -(-x.shape[1] // INPUTS_PER_STEP) * INPUTS_PER_STEP), np.uint16)
    bf16_activations(x, xb)
    n_out = w.shape[0]
    for p in prange(-(-n_out // panel)):
        end = min(n_out, (p + 1) * panel)
        for t0 in range(0, out.shape[0], TOKENS):
            for r0 in range(p * panel, end, ROWS):
                if r0 + ROWS <= end:
                    _gemm_rows(w, xb, r0, t0, out)
                else:
                    for r in range(r0, end):
                        _gemm_row(w, xb, r, t0, out)


PANEL_BYTES = 256 * 1024   # of bf16 weights per panel: a quarter of Zen 4's L2 per core
BIG_ACTIVATIONS = 8 << 20  # bf16 activations past this stream from memory, not L3, once per panel


def panel_rows(n_out, n_in, n_tok, threads):
    """Rows per GEMM panel: about PANEL_BYTES of weights (one thread, Zen 4: 256 KB
    ran 5-15 % faster than 32-128 KB at 1024-8192 inputs), twice that when the
    activations are big (every panel reads all of them: SigLIP's 3072 x 4304 ran 10 %
    faster on 512 KB panels), in a number of panels the threads share evenly (9
    panels on 2 threads would leave one idle a ninth of the time)."""
    panel_bytes = PANEL_BYTES * (2 if 2 * n_tok * n_in > BIG_ACTIVATIONS else 1)
    fit = max(ROWS, panel_bytes // (2 * n_in))
    panels = -(-n_out // fit)
    panels = -(-panels // threads) * threads                # a multiple of the threads
    rows = -(-n_out // panels)
    return -(-rows // ROWS) * ROWS


def matmul(w, x):
    """bf16(x (T, in) float32) @ w (out, in).T, as float32 (T, out)."""
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"bf16 pairs kernel: activations {x.shape} do not fit weights {w.shape}")
    n_tok, n_in = x.shape
    n_p = -(-n_tok // TOKENS) * TOKENS
    out = np.empty((n_p, w.shape[0]), np.float32)
    gemm_bf16_pairs(w, x, out, panel_rows(w.shape[0], n_in, n_tok, get_threads()))
    return out[:n_tok] if n_p != n_tok else out
