"""The non-GEMM parts of an encoder block, one pass over memory each: LayerNorm,
quick_gelu, the attention softmax.

    layer_norm_rows(x, weight, bias, eps, out)   out[t] = LN(x[t]) * weight + bias
    quick_gelu_in_place(h, bias)                 h <- z * sigmoid(1.702 z), z = h + bias
    softmax_rows_in_place(scores, scale)         each row <- softmax(scale * row)
    add_residual_in_place(x, y, bias)            x <- x + (y + bias)

Why kernels. Between its matrix products a vision tower block (CLIP ViT-L: 577
positions x 1024 channels per view, 4096 in the MLP) does element-wise work that
NumPy runs as several calls, each a pass over the whole array with a temporary:
LayerNorm is five (mean, subtract, square, mean, scale), quick_gelu four (multiply,
tanh, multiply-add, multiply), the softmax six (max, subtract, exp, sum, divide,
zero the tiny). At 17 views the MLP's array is 160 MB, so each pass is a trip to
memory. Here each is one loop over a row that stays in cache, and the
exponential is `attention.exp_nonpositive` (a polynomial that vectorises), not
libm's scalar call.

Each kernel runs on the calling thread with the GIL released (`nogil`); the
wrappers below share an array's rows among Python threads, and the attention calls
the softmax once per (view, head) from its own (`threads.side_by_side`).
Not Numba's `prange`: its OpenMP threads spin after each call and slow the BLAS
product that follows by more than the kernel takes (`threads.on_python_threads`). The plain-NumPy twins (`reference.layer_norm_rows`,
`reference.quick_gelu`, `reference.softmax_rows`) are the definitions;
tests/test_rowwise_kernels.py holds them equal.
"""

import numpy as np
from numba import njit

from .attention import TINY, exp_nonpositive
from .scalars import bits_to_f32, f32_to_bits
from .threads import get_threads, on_python_threads, row_bands

# LLVM may reorder sums, fuse multiply-adds and ignore the sign of zero, but not
# assume "no NaN, no inf" (a NaN from a damaged weight must reach the output) and
# not replace a division by a multiplication with the reciprocal ("arcp"): the
# mean as total * (1/D) is off by an ulp of 1/D, which LayerNorm amplifies by
# 1/std, 300x for a row whose spread is eps's.
FASTMATH = {"reassoc", "contract", "nsz"}
QUICK_GELU_SLOPE = np.float32(1.702)  # CLIP's sigmoid(1.702 x), a cheap stand-in for GELU's Phi(x)


@njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def layer_norm_rows(x, weight, bias, eps, out):
    """out (T, D) = (x - mean) / sqrt(var + eps) * weight + bias, per row of x (T, D).

    Two passes over a row that is in L1 by then: the mean, then the variance of the
    centred values (not E[x^2] - mean^2, which cancels when |mean| >> std)."""
    T, D = x.shape
    for t in range(T):
        total = np.float32(0.0)
        for d in range(D):
            total += x[t, d]
        mean = total / np.float32(D)
        squares = np.float32(0.0)
        for d in range(D):
            c = x[t, d] - mean
            squares += c * c
        inv_std = np.float32(1.0) / np.sqrt(squares / np.float32(D) + eps)
        for d in range(D):
            out[t, d] = weight[d] * ((x[t, d] - mean) * inv_std) + bias[d]


@njit(inline="always")
def sigmoid(z):
    """1 / (1 + exp(-z)), from exp(-|z|) <= 1 so nothing overflows: for z >= 0 that
    is 1 / (1 + e), for z < 0 e / (1 + e). NaN stays NaN."""
    e = exp_nonpositive(-abs(z))
    return (np.float32(1.0) if z >= 0 else e) / (np.float32(1.0) + e)


@njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def quick_gelu_in_place(h, bias):
    """h (T, F) <- z * sigmoid(1.702 z) with z = h + bias (F,): the MLP's bias and
    its activation in one pass (fc1's output is never needed without them)."""
    T, F = h.shape
    for t in range(T):
        for f in range(F):
            z = h[t, f] + bias[f]
            h[t, f] = z * sigmoid(QUICK_GELU_SLOPE * z)


@njit(nogil=True, error_model="numpy", cache=True)  # no fastmath: x + (y + bias) in this order, as NumPy
def add_residual_in_place(x, y, bias):
    """x (T, D) <- x + (y + bias (D,)): a sublayer's output y, less its last bias,
    added to the residual stream x in one pass (NumPy: the bias, then the sum, each a
    pass and a fresh array)."""
    T, D = x.shape
    for t in range(T):
        for d in range(D):
            x[t, d] = x[t, d] + (y[t, d] + bias[d])


@njit(inline="always")
def sortable(bits):
    """float32 bits (as int32) <-> an int32 that sorts as the float does: the bits
    themselves for x >= 0, all but the sign flipped for x < 0 (so -0 < +0). Its own
    inverse."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


@njit(inline="always")
def row_max(row):
    """The largest float32 of `row`, found as an integer max over `sortable` bits:
    LLVM vectorises that without leave to ignore NaNs, where a float max stays a chain
    of compares, one element at a time (5x slower on a 577-long row). A NaN sorts
    beyond +inf or -inf by its sign bit; either way it reaches the exp and the sum."""
    top = np.int32(-(2**31))
    for j in range(row.size):
        top = max(top, sortable(np.int32(f32_to_bits(row[j]))))
    return bits_to_f32(np.uint32(sortable(top)))


@njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def softmax_rows_in_place(scores, scale):
    """scores (R, S) <- softmax(scale * scores) along each row, weights below
    float32's smallest normal number set to 0 (as `minislm.model.softmax`: a
    subnormal weight changes no sum but slows the next product ~60x). scale > 0,
    so the row's largest score is also its largest scaled score."""
    R, S = scores.shape
    for r in range(R):
        top = row_max(scores[r])
        total = np.float32(0.0)
        for j in range(S):
            e = exp_nonpositive((scores[r, j] - top) * scale)
            scores[r, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(S):
            p = scores[r, j] * inv
            scores[r, j] = np.float32(0.0) if p < TINY else p  # NaN stays NaN


# ---------------------------------------------------------------- on arrays of any leading shape


def as_rows(x, width):
    """x (..., width) as a C-contiguous float32 (rows, width) array (a view when it already is one)."""
    return np.ascontiguousarray(x, dtype=np.float32).reshape(-1, width)


def by_bands(kernel, rows, *arrays):
    """kernel(rows[a:b], *arrays) for bands [a, b) of rows, one per thread (Python
    threads: see `threads.on_python_threads`). An array in `arrays` with as many rows
    as `rows` is cut into the same bands; the others (bias, weight, eps) go whole."""
    bands = row_bands(len(rows), max(1, min(get_threads(), len(rows))))

    def band(i):
        a, b = bands[i]
        kernel(rows[a:b], *(v[a:b] if isinstance(v, np.ndarray) and v.ndim == 2 else v for v in arrays))

    on_python_threads(band, len(bands))


def layer_norm(x, weight, bias, eps, out=None):
    """LayerNorm over the last axis of x (..., D) -> float32 of x's shape, in `out`
    (a C-contiguous float32 array of that shape) or a new array."""
    D = x.shape[-1]
    out = np.empty(x.shape, np.float32) if out is None else out
    by_bands(layer_norm_rows, as_rows(x, D), as_rows(weight, D)[0], as_rows(bias, D)[0], np.float32(eps), out.reshape(-1, D))
    return out


def add_residual(x, y, bias):
    """x + (y + bias) over the last axis, written into x (the residual stream: a
    C-contiguous float32 array); returns x."""
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"add_residual: the stream must be C-contiguous float32 to be updated in place, got {x.dtype}")
    D = x.shape[-1]
    by_bands(add_residual_in_place, x.reshape(-1, D), as_rows(y, D), as_rows(bias, D)[0])
    return x


def quick_gelu(h, bias):
    """quick_gelu(h + bias) over the last axis of h (..., F), computed in place when h
    is a C-contiguous float32 array (as a fresh matmul result is); returns the result."""
    F = h.shape[-1]
    rows = as_rows(h, F)
    by_bands(quick_gelu_in_place, rows, as_rows(bias, F)[0])
    return rows.reshape(h.shape)
