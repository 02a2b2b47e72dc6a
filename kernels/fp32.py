"""fp32 matmul: Numba GEMV for decode, a register-blocked Numba GEMM, BLAS.

Layout: the hub's nn.Linear layout, w (out, in) row-major; y = x @ w.T.

GEMV (decode) streams every weight once, so it runs at memory speed if
the arithmetic keeps up. `gemv` gives each thread a contiguous run of
rows, four rows per step so one load of x feeds four multiply-adds;
`fastmath` lets LLVM turn each row's sum into vector accumulators. It is as
fast as OpenBLAS's sgemv (docs/kernels.md has the figures). The same loop
serves bf16 weights (`bf16.py`): each weight goes through `widen_weight`,
which is nothing for float32 and a shift for a bf16 word, and Numba compiles
one machine-code version per weight dtype.

It takes a few rows of x at once, the next token of each of several sequences
(batched decoding, minislm/batch.py): every token passes over a block of four
weight rows while that block sits in cache, so the weights are read from memory
once for all of them, and each token's sums run in the same order whatever the
number of tokens. A sequence's result then does not depend on which others
share the step, bit for bit; BLAS promises no such thing (its sgemv and sgemm
sum in different orders). `DecodeRows` wraps a matrix so that `matmul` always
takes this path.

GEMM (prefill) is compute-bound: `gemm_f32` keeps a 4x4 block of outputs in
registers so each loaded weight and activation feeds four multiply-adds.
OpenBLAS's hand-written AVX-512 kernels are still ~2x faster, so
`Fp32Weight.matmul` and the bf16/int4 prefill paths use np.matmul for GEMM;
`matmul_by_tiles` lets those formats widen a few hundred rows at a time
into a reusable fp32 buffer and hand each tile to BLAS.
"""

import numpy as np
from numba import njit, prange

from .checks import as_activations, as_row_ids, check_finite
from .reference import bf16_to_f32
from .scalars import widen_weight


@njit(inline="always", fastmath=True)
def gemv_block(w, x, t, i, out):
    """out[t, i:i+4] = widen(w[i:i+4]) @ x[t]: one token against one block of four
    weight rows (fewer at the end); both GEMV kernels below are this block in a loop."""
    n_out, n_in = w.shape
    if i + 4 <= n_out:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for k in range(n_in):
            xk = x[t, k]   # one load of x feeds four rows
            a0 += widen_weight(w[i, k]) * xk
            a1 += widen_weight(w[i + 1, k]) * xk
            a2 += widen_weight(w[i + 2, k]) * xk
            a3 += widen_weight(w[i + 3, k]) * xk
        out[t, i], out[t, i + 1], out[t, i + 2], out[t, i + 3] = a0, a1, a2, a3
    else:  # the last 1-3 rows
        for ii in range(i, n_out):
            acc = np.float32(0.0)
            for k in range(n_in):
                acc += widen_weight(w[ii, k]) * x[t, k]
            out[t, ii] = acc


@njit(parallel=True, fastmath=True, cache=True)
def gemv(w, x, out):
    """out (B, out) = x (B, in) @ widen(w (out, in)).T, four weight rows per step,
    every token passing over a block while it sits in cache; w float32, or uint16
    bf16 words."""
    for ib in prange((w.shape[0] + 3) // 4):
        for t in range(x.shape[0]):
            gemv_block(w, x, t, 4 * ib, out)


@njit(fastmath=True, cache=True)
def gemv_serial(w, x, out):
    """`gemv` on the calling thread alone, as BLAS runs a decode step's float32
    matmuls (`minislm.runtime.blas_threads`): what `DecodeRows` multiplies float32 by."""
    for ib in range((w.shape[0] + 3) // 4):
        for t in range(x.shape[0]):
            gemv_block(w, x, t, 4 * ib, out)


@njit(parallel=True, fastmath=True, cache=True)
def gemm_f32(x, w, out):
    """out (T, out) = x (T, in) @ w (out, in).T, 4 tokens x 4 rows per step."""
    n_tok, n_in = x.shape
    n_out = w.shape[0]
    for ib in prange((n_out + 3) // 4):
        i = 4 * ib
        for t in range(0, n_tok, 4):
            if i + 4 <= n_out and t + 4 <= n_tok:
                a00 = a01 = a02 = a03 = np.float32(0.0)
                a10 = a11 = a12 = a13 = np.float32(0.0)
                a20 = a21 = a22 = a23 = np.float32(0.0)
                a30 = a31 = a32 = a33 = np.float32(0.0)
                for k in range(n_in):
                    w0, w1, w2, w3 = w[i, k], w[i + 1, k], w[i + 2, k], w[i + 3, k]
                    x0, x1, x2, x3 = x[t, k], x[t + 1, k], x[t + 2, k], x[t + 3, k]
                    a00 += x0 * w0; a01 += x0 * w1; a02 += x0 * w2; a03 += x0 * w3
                    a10 += x1 * w0; a11 += x1 * w1; a12 += x1 * w2; a13 += x1 * w3
                    a20 += x2 * w0; a21 += x2 * w1; a22 += x2 * w2; a23 += x2 * w3
                    a30 += x3 * w0; a31 += x3 * w1; a32 += x3 * w2; a33 += x3 * w3
                out[t, i], out[t, i + 1], out[t, i + 2], out[t, i + 3] = a00, a01, a02, a03
                out[t + 1, i], out[t + 1, i + 1], out[t + 1, i + 2], out[t + 1, i + 3] = a10, a11, a12, a13
                out[t + 2, i], out[t + 2, i + 1], out[t + 2, i + 2], out[t + 2, i + 3] = a20, a21, a22, a23
                out[t + 3, i], out[t + 3, i + 1], out[t + 3, i + 2], out[t + 3, i + 3] = a30, a31, a32, a33
            else:  # ragged edge: plain dot products
                for tt in range(t, min(t + 4, n_tok)):
                    for ii in range(i, min(i + 4, n_out)):
                        acc = np.float32(0.0)
                        for k in range(n_in):
                            acc += x[tt, k] * w[ii, k]
                        out[tt, ii] = acc


def matmul_by_tiles(x, n_out, fill_tile, tile_bytes=8 << 20):
    """x (T, in) @ W.T -> (T, n_out) for a W that exists only in compact form.

    `fill_tile(start, stop, buf)` writes fp32 rows start..stop of W into
    `buf`; each tile is then one BLAS call. Tiles of ~8 MB stay in cache
    and bound the extra memory, whatever the size of W."""
    n_tok, n_in = x.shape
    rows = max(16, (tile_bytes // (4 * n_in)) // 16 * 16)
    out = np.empty((n_tok, n_out), np.float32)
    buf = np.empty((min(rows, n_out), n_in), np.float32)
    part = np.empty((n_tok, buf.shape[0]), np.float32)
    for start in range(0, n_out, rows):
        stop = min(start + rows, n_out)
        tile = buf[: stop - start]
        fill_tile(start, stop, tile)
        np.matmul(x, tile.T, out=part[:, : stop - start])
        out[:, start:stop] = part[:, : stop - start]
    return out


class OneArrayWeight:
    """What the fp32 and bf16 weights share: the matrix is one (out, in) array,
    `data`, saved as `{prefix}.weight`; `matmul` runs `gemv` (float32 or bf16 words
    alike) for one token and the subclass's `gemm` for more."""

    @classmethod
    def from_tensors(cls, tensors, prefix):
        return cls(tensors[f"{prefix}.weight"], name=prefix)

    def tensors(self, prefix):
        return {f"{prefix}.weight": self.data}

    @property
    def shape(self):
        return self.data.shape

    @property
    def nbytes(self):
        return self.data.nbytes

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape}, {self.nbytes / 1e6:.1f} MB)"

    def matmul(self, x, path=None):
        """x (T, in) -> (T, out); `path` picks a prefill path where the format
        has several (bf16: 'amx' or 'portable'), for tests and measurements."""
        x = as_activations(x, self.shape[1])  # (T, in)
        if x.shape[0] == 1:
            return self.gemv(x)
        return self.gemm(x, path)  # (T, out)

    def gemv(self, x, kernel=gemv):
        """x (B, in) -> (B, out) by the GEMV kernel: each row as it would be alone."""
        out = np.empty((x.shape[0], self.shape[0]), np.float32)
        kernel(self.data, x, out)
        return out


class Fp32Weight(OneArrayWeight):
    """An fp32 (out, in) weight: Numba GEMV for one token, BLAS otherwise."""

    def __init__(self, w, name="weight"):
        """float32/float16 `w` (used in place when float32 and contiguous), or
        uint16 bf16 bits (widened); NaN and inf are rejected."""
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (out, in) array, got shape {w.shape}")
        if w.dtype == np.uint16:
            w = bf16_to_f32(w)
        elif w.dtype not in (np.float32, np.float16):
            raise ValueError(f"{name}: cannot make fp32 weights from dtype {w.dtype}")
        check_finite(w, name)
        self.w = np.ascontiguousarray(w, dtype=np.float32)

    @classmethod
    def wrap(cls, w):
        """A float32 array the loader has already checked, used as it is (no copy when
        contiguous, no second pass over its values)."""
        weight = cls.__new__(cls)
        weight.w = np.ascontiguousarray(w, dtype=np.float32)
        return weight

    @property
    def data(self):
        return self.w

    def gemm(self, x, path=None):
        return np.matmul(x, self.w.T)

    def rows(self, ids):
        return self.w[as_row_ids(ids, self.shape[0])]


class DecodeRows:
    """A weight whose `matmul` treats every row of x as one token's decode step: the
    GEMV kernel for float32 and bf16 matrices, however many rows come, so each row
    gets exactly the bits it would get alone. (A plain matmul sends one row to GEMV
    and several to BLAS's GEMM, whose sums run in another order.) float32 runs it on
    the calling thread, as a decode step runs BLAS; bf16 on every thread, as before.

    `weight` is a float32 array, an `Fp32Weight` or a `Bf16Weight`; nothing is
    copied. `rows` (the embedding lookup) is the weight's own.
    """

    def __init__(self, weight):
        self.weight = Fp32Weight.wrap(weight) if isinstance(weight, np.ndarray) else weight
        self.shape = self.weight.shape

    @property
    def nbytes(self):
        return self.weight.nbytes

    def matmul(self, x):
        x = as_activations(x, self.shape[1])  # (B, in)
        return self.weight.gemv(x, gemv_serial if isinstance(self.weight, Fp32Weight) else gemv)  # (B, out)

    def rows(self, ids):
        return self.weight.rows(ids)
