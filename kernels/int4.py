"""int4 weights: group-wise round-to-nearest, stored in 16-row tiles.

Layout (drawn in docs/formats.md; `reference.pack_tiles` is its definition):
  qweight (out/16, in/4, 32) uint8   tile j of row block b, 32 bytes:
      byte 2r+e = q[16b+r, 4j+e] | q[16b+r, 4j+2+e] << 4    (r < 16, e < 2)
  scales  (out/16, in/G, 16) uint16  bf16 bits of the scale d of each row's group
  zeros   (out/16, in/G, 16) uint8   zero point z (asymmetric only; symmetric z = 8)
  w_hat[row, k] = (q - z) * d

Why this layout is fast to read. A GEMV streams qweight once, front to
back, per thread. One tile is 16 rows x 4 inputs: a 32-byte load gives 16
bytes for rows 0-7 and 16 for rows 8-15; after zero-extending to int16, the
low nibbles of a row's two bytes are its weights for inputs 4j, 4j+1 and sit
in one 32-bit lane, the high nibbles are inputs 4j+2, 4j+3. One
multiply-pairs-and-add instruction (`pmaddwd`/`vpdpwssd`) against the
broadcast int16 pair (x[4j], x[4j+1]) then does two multiply-adds in each of
the 8 lanes: 64 weights cost ~10 instructions, no horizontal sums, no
shuffles across lanes. Scales of the 16 rows of a group are adjacent, one
vector load; they are applied once per group, in float.

Activations are quantized per group to int16 (max error max|x|/65534, ~600x
below the int4 weight error) so the inner products are exact integer sums.
The vector code is in `simd.int4_block_gemv`; prefill runs the same code
for four tokens per pass over a block (`simd.int4_block_gemm4`).

Sizes that do not divide: rows are padded to a multiple of 16 and inputs to
a multiple of the group size, with zero weights; activations are padded with
zeros (a copy, only then). Phi-3 shapes need no padding.
"""

import numpy as np
from numba import njit, prange

from .checks import as_activations, as_row_ids
from .reference import ACT_LEVELS, QUANTIZABLE_LIMIT, SYMMETRIC_ZERO, padded_shape
from .simd import bf16_to_f32, f32_to_bits, int4_block_gemm4, int4_block_gemv

GROUP_SIZES = (32, 64, 128)   # measured and documented; any multiple of 4 up to 1024 works
# Up to this many tokens, one GEMV per token beats one GEMM pass (which
# computes 4 tokens whatever T is); measured in tools/bench_kernels.py.
GEMV_MAX_TOKENS = 2


@njit(cache=True)
def _bf16_ceil(d, nonzero):
    """bf16 bits of the smallest bf16 >= d (d >= 0); >= the smallest bf16 if nonzero."""
    bits = f32_to_bits(d) if d > 0 else np.uint32(0)
    if nonzero and bits == 0:
        bits = np.uint32(1)
    if bits & 0xFFFF:
        bits = (bits | np.uint32(0xFFFF)) + np.uint32(1)
    return np.uint16(bits >> 16)


@njit(parallel=True, cache=True)
def quantize_int4(w, group_size, symmetric, qweight, scales, zeros):
    """RTN-quantize w (out, in) float32 into zeroed qweight, scales, zeros.

    Same arithmetic as `reference.rtn_quantize` + `pack_tiles`, bit for bit.
    Returns how many weights were NaN, inf or beyond +-2**127 (their groups
    are left unwritten): a scale rounded up from such a value could overflow.
    A group's codes go to a small buffer first and are then packed four at a
    time with plain stores: both loops vectorise (2.5x faster than or-ing
    each code into its byte)."""
    n_out, n_in = w.shape
    half = np.float32(0.5)
    bad = 0
    for b in prange(qweight.shape[0]):
        codes = np.empty(group_size, np.float32)
        for r in range(16):
            row = 16 * b + r
            for g in range(scales.shape[1]):
                k0, k1 = g * group_size, min((g + 1) * group_size, n_in)
                lo = hi = np.float32(0.0)   # min(w, 0), max(w, 0); max|w| = max(hi, -lo)
                n_bad = 0
                if row < n_out:
                    for k in range(k0, k1):
                        v = w[row, k]
                        n_bad += 0 if abs(v) < QUANTIZABLE_LIMIT else 1   # also counts NaN
                        lo = min(lo, v)
                        hi = max(hi, v)
                if n_bad:
                    bad += n_bad
                    continue
                if symmetric:
                    amax = max(hi, -lo)
                    d_bits = _bf16_ceil(amax / np.float32(7), amax > 0)
                else:
                    d_bits = _bf16_ceil(hi / np.float32(15) - lo / np.float32(15), hi > lo)
                d = bf16_to_f32(d_bits)
                z = np.float32(SYMMETRIC_ZERO)
                if not symmetric:
                    z = min(max(np.floor(-lo / d + half), 0.0), 15.0) if d > 0 else np.float32(0)
                    zeros[b, g, r] = np.uint8(z)
                scales[b, g, r] = d_bits
                safe = d if d > 0 else np.float32(1.0)
                for i in range(group_size):
                    k = k0 + i
                    v = w[row, k] if (row < n_out and k < n_in) else np.float32(0.0)
                    q = np.floor(v / safe + half) if d > 0 else np.float32(0.0)
                    codes[i] = min(max(q, -8.0), 7.0) + 8.0 if symmetric else min(max(q + z, 0.0), 15.0)
                for j in range(group_size // 4):   # inputs 4j, 4j+1: low nibbles; 4j+2, 4j+3: high
                    c0, c1 = np.uint8(codes[4 * j]), np.uint8(codes[4 * j + 1])
                    c2, c3 = np.uint8(codes[4 * j + 2]), np.uint8(codes[4 * j + 3])
                    qweight[b, k0 // 4 + j, 2 * r] = c0 | (c2 << 4)
                    qweight[b, k0 // 4 + j, 2 * r + 1] = c1 | (c3 << 4)
    return bad


@njit(cache=True)
def quantize_activations(x, group_size, xq, x_scale, x_sum):
    """x (in,) float32 -> int16 xq, per-group x_scale and x_sum; the same
    arithmetic as `reference.quantize_activations`."""
    levels = np.float32(ACT_LEVELS)
    for g in range(x_scale.size):
        amax = np.float32(0.0)
        finite = True
        for k in range(g * group_size, (g + 1) * group_size):
            a = abs(x[k])
            if not np.isfinite(a):
                finite = False
            elif a > amax:
                amax = a
        scale = amax / levels
        total = 0
        for k in range(g * group_size, (g + 1) * group_size):
            q = 0
            if finite and amax > 0:
                q = int(min(max(np.floor(x[k] / scale + np.float32(0.5)), -levels), levels))
            xq[k] = q
            total += q
        x_scale[g] = scale if finite else np.float32(np.nan)
        x_sum[g] = x_scale[g] * np.float32(total)


@njit(parallel=True, cache=True)
def gemv_int4(qweight, scales, zeros, x, out):
    """out (out_p,) = W_hat @ x_hat for one token x (in_p,) float32.

    Quantizes x, then each thread runs `simd.int4_block_gemv` over a
    contiguous run of 16-row blocks: one pass over memory."""
    n_blocks, n_tiles, _ = qweight.shape
    n_groups = scales.shape[1]
    if x.size != 4 * n_tiles or out.size != 16 * n_blocks:   # the IR does no bounds checks
        raise ValueError("gemv_int4: x must have in_p and out out_p elements")
    xq = np.empty((1, 4 * n_tiles), np.int16)
    x_scale = np.empty((1, n_groups), np.float32)
    x_sum = np.empty((1, n_groups), np.float32)
    quantize_activations(x, 4 * n_tiles // n_groups, xq[0], x_scale[0], x_sum[0])
    x_pairs = xq.reshape(-1).view(np.int32).reshape(1, 2 * n_tiles)  # (x[2i], x[2i+1]) per word
    out_row = out.reshape(1, -1)
    for b in prange(n_blocks):
        int4_block_gemv(qweight, scales, zeros, x_pairs, x_scale, x_sum, b, 0, out_row)


@njit(parallel=True, cache=True)
def gemm_int4(qweight, scales, zeros, x, out):
    """out (T, out_p) = x_hat (T, in_p) @ W_hat.T, T a multiple of 4.

    Each thread takes whole 16-row blocks (24-64 KB, cache-resident) and
    runs all tokens over a block, four at a time (`simd.int4_block_gemm4`),
    so weights come from memory once and each unpacked tile feeds 4 tokens."""
    n_blocks, n_tiles, _ = qweight.shape
    n_groups = scales.shape[1]
    n_tok = x.shape[0]
    if (n_tok % 4 or x.shape[1] != 4 * n_tiles or out.shape[0] != n_tok
            or out.shape[1] != 16 * n_blocks):   # the IR does no bounds checks
        raise ValueError("gemm_int4: x must be (T, in_p) with T % 4 == 0 and out (T, out_p)")
    xq = np.empty((n_tok, 4 * n_tiles), np.int16)
    x_scale = np.empty((n_tok, n_groups), np.float32)
    x_sum = np.empty((n_tok, n_groups), np.float32)
    for t in prange(n_tok):
        quantize_activations(x[t], 4 * n_tiles // n_groups, xq[t], x_scale[t], x_sum[t])
    x_pairs = xq.reshape(-1).view(np.int32).reshape(n_tok, 2 * n_tiles)
    for b in prange(n_blocks):
        for t0 in range(0, n_tok, 4):
            int4_block_gemm4(qweight, scales, zeros, x_pairs, x_scale, x_sum, b, t0, out)


@njit(parallel=True, cache=True)
def dequantize_int4_rows(qweight, scales, zeros, ids, out):
    """out (len(ids), in_p) float32 = rows `ids` of W_hat."""
    n_tiles = qweight.shape[1]
    tiles_per_group = n_tiles // scales.shape[1]
    for i in prange(ids.size):
        b, r = ids[i] // 16, ids[i] % 16
        for g in range(scales.shape[1]):
            d = bf16_to_f32(scales[b, g, r])
            z = np.float32(SYMMETRIC_ZERO) if zeros is None else np.float32(zeros[b, g, r])
            for j in range(g * tiles_per_group, (g + 1) * tiles_per_group):
                byte0, byte1 = qweight[b, j, 2 * r], qweight[b, j, 2 * r + 1]
                out[i, 4 * j] = (np.float32(byte0 & 15) - z) * d
                out[i, 4 * j + 1] = (np.float32(byte1 & 15) - z) * d
                out[i, 4 * j + 2] = (np.float32(byte0 >> 4) - z) * d
                out[i, 4 * j + 3] = (np.float32(byte1 >> 4) - z) * d


class Int4Weight:
    """An int4 (out, in) weight, quantized group-wise along the inputs.

    `Int4Weight(w, group_size=32, symmetric=True)` quantizes float32/float16
    `w` (or uint16 bf16 bits) by round-to-nearest; NaN, inf and |w| >= 2**127
    are rejected.
    `Int4Weight.from_tensors(...)` rebuilds one from stored tensors without
    re-quantizing."""

    def __init__(self, w, group_size=32, symmetric=True, name="weight"):
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (out, in) array, got shape {w.shape}")
        if not (isinstance(group_size, (int, np.integer)) and 4 <= group_size <= 1024
                and group_size % 4 == 0):
            raise ValueError(f"--group-size {group_size}: use 32, 64 or 128 "
                             f"(any multiple of 4 up to 1024 works)")
        if w.dtype == np.uint16:
            w = (w.astype(np.uint32) << 16).view(np.float32)   # bf16 bits -> float32
        elif w.dtype not in (np.float32, np.float16):
            raise ValueError(f"{name}: cannot quantize dtype {w.dtype}; pass float32/float16 "
                             f"values or uint16 bf16 bits")
        w = np.ascontiguousarray(w, dtype=np.float32)
        n_p, k_p = padded_shape(w.shape, group_size)
        qweight = np.zeros((n_p // 16, k_p // 4, 32), np.uint8)
        scales = np.zeros((n_p // 16, k_p // group_size, 16), np.uint16)
        zeros = np.zeros(scales.shape, np.uint8)
        bad = quantize_int4(w, group_size, symmetric, qweight, scales, zeros)
        if bad:
            raise ValueError(f"{name}: {bad} of {w.size} values are NaN, inf or beyond +-1.7e38; "
                             f"cannot quantize (the checkpoint is damaged or was saved after a "
                             f"diverged step)")
        self._set(qweight, scales, None if symmetric else zeros, w.shape)

    def _set(self, qweight, scales, zeros, shape):
        self.qweight, self.scales, self.zeros = qweight, scales, zeros
        self.shape = tuple(int(s) for s in shape)
        self.group_size = 4 * qweight.shape[1] // scales.shape[1]
        self.symmetric = zeros is None

    @classmethod
    def from_tensors(cls, tensors, prefix, shape):
        """From `tensors()` output (memory-mapped arrays are used in place).

        `shape` is the logical (out, in), known from the model config."""
        qweight = tensors[f"{prefix}.qweight"]
        scales = tensors[f"{prefix}.scales"]
        zeros = tensors.get(f"{prefix}.zeros")
        ok = (qweight.dtype == np.uint8 and qweight.ndim == 3 and qweight.shape[2] == 32
              and scales.dtype == np.uint16 and scales.ndim == 3
              and scales.shape[0] == qweight.shape[0] and scales.shape[2] == 16
              and scales.shape[1] > 0 and (4 * qweight.shape[1]) % scales.shape[1] == 0
              and (zeros is None or (zeros.dtype == np.uint8 and zeros.shape == scales.shape)))
        if ok:
            group_size = 4 * qweight.shape[1] // scales.shape[1]
            ok = padded_shape(shape, group_size) == (16 * qweight.shape[0], 4 * qweight.shape[1])
        if not ok:
            raise ValueError(f"{prefix}: stored int4 tensors do not match the minislm int4 layout "
                             f"for shape {tuple(shape)}; re-run `minislm quantize`")
        self = cls.__new__(cls)
        self._set(np.ascontiguousarray(qweight), np.ascontiguousarray(scales),
                  None if zeros is None else np.ascontiguousarray(zeros), shape)
        return self

    def tensors(self, prefix):
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return out

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.qweight, self.scales, self.zeros) if a is not None)

    def __repr__(self):
        return (f"Int4Weight(shape={self.shape}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, {self.nbytes / 1e6:.1f} MB)")

    def matmul(self, x):
        n, k = self.shape
        k_p = 4 * self.qweight.shape[1]
        x = as_activations(x, k)
        if k_p != k:
            x = np.pad(x, ((0, 0), (0, k_p - k)))
        n_tok, n_p = x.shape[0], 16 * self.qweight.shape[0]
        if n_tok <= GEMV_MAX_TOKENS:
            out = np.empty((n_tok, n_p), np.float32)
            for t in range(n_tok):
                gemv_int4(self.qweight, self.scales, self.zeros, x[t], out[t])
        else:
            x = np.pad(x, ((0, -n_tok % 4), (0, 0))) if n_tok % 4 else x
            out = np.empty((x.shape[0], n_p), np.float32)
            gemm_int4(self.qweight, self.scales, self.zeros, x, out)
        return out if out.shape == (n_tok, n) else np.ascontiguousarray(out[:n_tok, :n])

    def rows(self, ids):
        ids = as_row_ids(ids, self.shape[0])
        out = np.empty((ids.size, 4 * self.qweight.shape[1]), np.float32)
        dequantize_int4_rows(self.qweight, self.scales, self.zeros, ids, out)
        return out if out.shape[1] == self.shape[1] else np.ascontiguousarray(out[:, : self.shape[1]])

    def dequantize(self):
        """W_hat as float32 (out, in): for tests and inspection, not per token."""
        return self.rows(np.arange(self.shape[0]))
