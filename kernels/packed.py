"""Packed integer weights: 4-bit (`Int4Weight`) or 8-bit (`Int8Weight`) codes
with a scale per group, multiplied by int8 activations.

What every element means (`reference.dequantize` is the definition):

    w[r, k] = s[r, g] * (c[r, k] - z[r, g]) + b[r, g]        g = k // G

Layout (drawn in docs/formats.md; `reference.pack_tiles` is its definition):
  codes   (out/16, in/n, 64) uint8   tile j of row block b; row r owns bytes
          4r..4r+3, one 32-bit vector lane: 4 codes (int8, n = 4) or
          8 nibbles (int4, n = 8; byte 4r+e = c[8j+e] | c[8j+4+e] << 4)
  scales  (out/16, in/G, 16) float16 (when exact) or float32
  zeros   (out/16, in/G, 16) uint8    zero codes, or one `zero` per tensor
  offsets (out/16, in/G, 16) float32  or none (b = 0)

Why this layout. A dot product of bytes is one instruction on CPUs with VNNI
(`vpdpbusd`: in each 32-bit lane, 4 unsigned bytes times 4 signed bytes,
summed into the lane). With one output row per lane, a 32-byte load of a tile
is 8 rows x 4 codes; against the broadcast word of 4 int8 activations one
`vpdpbusd` does 32 multiply-adds with no shuffles and no horizontal sums. For
int4 an `and` and a shift split a tile's bytes into the low and high nibbles,
inputs 8j..8j+3 and 8j+4..8j+7: two `vpdpbusd` per 32 bytes, 64 weights.
The codes are unsigned (that is what `vpdpbusd` multiplies); signed formats
shift them by their zero code and the kernel subtracts z * sum(x) per group.

Activations are quantized per group of 32 inputs (`reference.quantize_activations`:
int8, max|x|/254 error at most per element), as llama.cpp does (Q8_0) for its
Q4_0 and K-quant dot products: the integer sums are then exact, and the scales
are applied once per group, in float32, to 16 rows at a time. Decode (GEMV)
and prefill (GEMM, 4 tokens per pass over a block) run the same arithmetic in
the same order, so a token's output does not depend on how many tokens share
the call; and the VNNI and portable paths (`cpu.py`) give the same bits.

Sizes that do not divide: rows are padded to a multiple of 16 and inputs to a
multiple of the group size (codes = zero code, scale 0); activations are
zero-padded (a copy, only then). Phi-3 shapes need no padding.
"""

import numpy as np
from numba import njit, prange

from . import amx, cpu
from . import reference as ref
from .activations import activation_buffers, check_shapes, prepare_token, quantize_activations  # noqa: F401
from .checks import as_activations, as_row_ids
from .quantizer import quantize_symmetric
from .scalars import widen
from .simd import packed_block_kernel

# Up to this many tokens, one GEMV per token beats the GEMM (which reads each
# weight block once for all T tokens); from AMX_MIN_TOKENS on, AMX (16 tokens per
# tile) beats the VNNI GEMM. Measured on one thread (docs/kernels.md). Two
# tokens go to the GEMM: two GEMVs read the weights twice, and in a batched
# decode step of two sequences on Phi-3-mini that cost 440 ms against 381.
GEMV_MAX_TOKENS = 1
GEMM_TOKENS = 4
AMX_MIN_TOKENS = 16

_int4_gemv_vnni = packed_block_kernel(1, 4, "vnni")
_int4_gemm_vnni = packed_block_kernel(GEMM_TOKENS, 4, "vnni")
_int8_gemv_vnni = packed_block_kernel(1, 8, "vnni")
_int8_gemm_vnni = packed_block_kernel(GEMM_TOKENS, 8, "vnni")
_int4_gemv_portable = packed_block_kernel(1, 4, "portable")
_int4_gemm_portable = packed_block_kernel(GEMM_TOKENS, 4, "portable")
_int8_gemv_portable = packed_block_kernel(1, 8, "portable")
_int8_gemm_portable = packed_block_kernel(GEMM_TOKENS, 8, "portable")


# ---------------------------------------------------------------- GEMV and GEMM, per path
# The same few lines for each (bits, path), kept as separate entry points on purpose:
# Numba compiles a function whole, on its first call, so one function holding both
# the VNNI and the portable block would make LLVM select `vpdpbusd` on a CPU without
# it and fail; one function per path compiles only the paths this CPU calls. They are
# written out rather than made by a factory so that each reads as a plain kernel.


@njit(parallel=True, cache=True)
def gemv_int4_vnni(codes, scales, zeros, offsets, zero, x, out):
    """out (1, out_p) = W @ x_hat for one token x (1, in_p): each thread streams
    a contiguous run of 16-row blocks."""
    check_shapes(codes, scales, x, out, 8)
    xq, xs, xg = activation_buffers(1, x.shape[1], scales.shape[1])
    prepare_token(x[0], scales.shape[1], xq[0], xs[0], xg[0])
    words = xq.view(np.int32)
    for b in prange(codes.shape[0]):
        _int4_gemv_vnni(codes, scales, zeros, offsets, zero, words, xs, xg, b, 0, out)


@njit(parallel=True, cache=True)
def gemm_int4_vnni(codes, scales, zeros, offsets, zero, x, out):
    """out (T, out_p) = x_hat (T, in_p) @ W.T: each thread takes whole 16-row blocks
    (cache-resident) through all tokens, 4 at a time, then the last T % 4 one at a
    time (a speculative verify of 5 tokens computes 5, not 8; the same bits either
    way, so no padding is needed)."""
    check_shapes(codes, scales, x, out, 8)
    xq, xs, xg = activation_buffers(x.shape[0], x.shape[1], scales.shape[1])
    for t in prange(x.shape[0]):
        prepare_token(x[t], scales.shape[1], xq[t], xs[t], xg[t])
    words = xq.view(np.int32)
    whole = x.shape[0] // GEMM_TOKENS * GEMM_TOKENS
    for b in prange(codes.shape[0]):
        for t0 in range(0, whole, GEMM_TOKENS):
            _int4_gemm_vnni(codes, scales, zeros, offsets, zero, words, xs, xg, b, t0, out)
        for t in range(whole, x.shape[0]):
            _int4_gemv_vnni(codes, scales, zeros, offsets, zero, words, xs, xg, b, t, out)


@njit(parallel=True, cache=True)
def gemv_int8_vnni(codes, scales, zeros, offsets, zero, x, out):
    check_shapes(codes, scales, x, out, 4)
    xq, xs, xg = activation_buffers(1, x.shape[1], scales.shape[1])
    prepare_token(x[0], scales.shape[1], xq[0], xs[0], xg[0])
    words = xq.view(np.int32)
    for b in prange(codes.shape[0]):
        _int8_gemv_vnni(codes, scales, zeros, offsets, zero, words, xs, xg, b, 0, out)


@njit(parallel=True, cache=True)
def gemm_int8_vnni(codes, scales, zeros, offsets, zero, x, out):
    check_shapes(codes, scales, x, out, 4)
    xq, xs, xg = activation_buffers(x.shape[0], x.shape[1], scales.shape[1])
    for t in prange(x.shape[0]):
        prepare_token(x[t], scales.shape[1], xq[t], xs[t], xg[t])
    words = xq.view(np.int32)
    whole = x.shape[0] // GEMM_TOKENS * GEMM_TOKENS
    for b in prange(codes.shape[0]):
        for t0 in range(0, whole, GEMM_TOKENS):
            _int8_gemm_vnni(codes, scales, zeros, offsets, zero, words, xs, xg, b, t0, out)
        for t in range(whole, x.shape[0]):
            _int8_gemv_vnni(codes, scales, zeros, offsets, zero, words, xs, xg, b, t, out)


@njit(parallel=True, cache=True)
def gemv_int4_portable(codes, scales, zeros, offsets, zero, x, out):
    check_shapes(codes, scales, x, out, 8)
    xq, xs, xg = activation_buffers(1, x.shape[1], scales.shape[1])
    prepare_token(x[0], scales.shape[1], xq[0], xs[0], xg[0])
    words = xq.view(np.int32)
    for b in prange(codes.shape[0]):
        _int4_gemv_portable(codes, scales, zeros, offsets, zero, words, xs, xg, b, 0, out)


@njit(parallel=True, cache=True)
def gemm_int4_portable(codes, scales, zeros, offsets, zero, x, out):
    check_shapes(codes, scales, x, out, 8)
    xq, xs, xg = activation_buffers(x.shape[0], x.shape[1], scales.shape[1])
    for t in prange(x.shape[0]):
        prepare_token(x[t], scales.shape[1], xq[t], xs[t], xg[t])
    words = xq.view(np.int32)
    whole = x.shape[0] // GEMM_TOKENS * GEMM_TOKENS
    for b in prange(codes.shape[0]):
        for t0 in range(0, whole, GEMM_TOKENS):
            _int4_gemm_portable(codes, scales, zeros, offsets, zero, words, xs, xg, b, t0, out)
        for t in range(whole, x.shape[0]):
            _int4_gemv_portable(codes, scales, zeros, offsets, zero, words, xs, xg, b, t, out)


@njit(parallel=True, cache=True)
def gemv_int8_portable(codes, scales, zeros, offsets, zero, x, out):
    check_shapes(codes, scales, x, out, 4)
    xq, xs, xg = activation_buffers(1, x.shape[1], scales.shape[1])
    prepare_token(x[0], scales.shape[1], xq[0], xs[0], xg[0])
    words = xq.view(np.int32)
    for b in prange(codes.shape[0]):
        _int8_gemv_portable(codes, scales, zeros, offsets, zero, words, xs, xg, b, 0, out)


@njit(parallel=True, cache=True)
def gemm_int8_portable(codes, scales, zeros, offsets, zero, x, out):
    check_shapes(codes, scales, x, out, 4)
    xq, xs, xg = activation_buffers(x.shape[0], x.shape[1], scales.shape[1])
    for t in prange(x.shape[0]):
        prepare_token(x[t], scales.shape[1], xq[t], xs[t], xg[t])
    words = xq.view(np.int32)
    whole = x.shape[0] // GEMM_TOKENS * GEMM_TOKENS
    for b in prange(codes.shape[0]):
        for t0 in range(0, whole, GEMM_TOKENS):
            _int8_gemm_portable(codes, scales, zeros, offsets, zero, words, xs, xg, b, t0, out)
        for t in range(whole, x.shape[0]):
            _int8_gemv_portable(codes, scales, zeros, offsets, zero, words, xs, xg, b, t, out)


GEMV = {(4, "vnni"): gemv_int4_vnni, (8, "vnni"): gemv_int8_vnni,
        (4, "portable"): gemv_int4_portable, (8, "portable"): gemv_int8_portable}
GEMM = {(4, "vnni"): gemm_int4_vnni, (8, "vnni"): gemm_int8_vnni,
        (4, "portable"): gemm_int4_portable, (8, "portable"): gemm_int8_portable}


# ---------------------------------------------------------------- rows and quantization


@njit(cache=True)
def _code(codes, b, k, r, bits):
    if bits == 4:
        byte = codes[b, k // 8, 4 * r + k % 4]
        return (byte >> 4) if k % 8 >= 4 else (byte & 15)
    return codes[b, k // 4, 4 * r + k % 4]


@njit(parallel=True, cache=True)
def dequantize_rows(codes, scales, zeros, offsets, zero, bits, ids, out):
    """out (len(ids), in_p) float32 = rows `ids` of W, as `reference.dequantize`."""
    group_size = out.shape[1] // scales.shape[1]
    for i in prange(ids.size):
        b, r = ids[i] // 16, ids[i] % 16
        for k in range(out.shape[1]):
            g = k // group_size
            z = zero if zeros is None else np.float32(zeros[b, g, r])
            w = (np.float32(_code(codes, b, k, r, bits)) - z) * widen(scales[b, g, r])
            if offsets is not None:
                w = w + offsets[b, g, r]
            out[i, k] = w


@njit(parallel=True, cache=True)
def group_scales(w, group_size, kind, d):
    """d (out_p, groups) float32: the unrounded scale of each group (the first
    step of `reference.quantize_int4/int8`). kind 0: int4 symmetric (the
    largest-magnitude weight / -8), 1: int4 asymmetric, 2: int8 (max|w| / 127).
    Returns how many weights are NaN, inf or beyond +-2**127."""
    n_out, n_in = w.shape
    bad = 0
    for row in prange(d.shape[0]):
        for g in range(d.shape[1]):
            amax, extreme = np.float32(-1.0), np.float32(0.0)
            lo = hi = np.float32(0.0)
            for k in range(g * group_size, (g + 1) * group_size):
                v = w[row, k] if (row < n_out and k < n_in) else np.float32(0.0)
                if not abs(v) < ref.QUANTIZABLE_LIMIT:   # also true for NaN
                    bad += 1
                if abs(v) > amax:   # the first of equal magnitudes, as argmax
                    amax, extreme = abs(v), v
                lo, hi = min(lo, v), max(hi, v)
            if kind == 0:
                s, nonzero = extreme / np.float32(-8), extreme != 0
            elif kind == 1:
                s, nonzero = hi / np.float32(15) - lo / np.float32(15), hi > lo
            else:
                s, nonzero = amax / np.float32(127), amax > 0
            if s == 0 and nonzero:   # underflowed (|w| near 1e-45): the smallest float32
                s = np.float32(ref.SMALLEST) if extreme <= 0 or kind != 0 else -np.float32(ref.SMALLEST)
            d[row, g] = s
    return bad


@njit(parallel=True, cache=True)
def quantize_codes(w, group_size, kind, d, codes, zeros):
    """Codes from the stored scale values d (out_p, groups) float32, written as
    tiles into zeroed `codes`; zero points into `zeros` (kind 1). The same
    arithmetic as `reference.quantize_int4/int8`, bit for bit."""
    n_out, n_in = w.shape
    half = np.float32(0.5)
    bits = 8 if kind == 2 else 4
    for b in prange(codes.shape[0]):
        for r in range(16):
            row = 16 * b + r
            for g in range(d.shape[1]):
                s = d[row, g]
                z = np.float32(0.0)
                if kind == 1:
                    lo = np.float32(0.0)
                    for k in range(g * group_size, (g + 1) * group_size):
                        if row < n_out and k < n_in:
                            lo = min(lo, w[row, k])
                    if s > 0:
                        z = min(max(np.floor(-lo / s + half), np.float32(0.0)), np.float32(15.0))
                    zeros[b, g, r] = np.uint8(z)
                for k in range(g * group_size, (g + 1) * group_size):
                    v = w[row, k] if (row < n_out and k < n_in) else np.float32(0.0)
                    q = np.floor(v / s + half) if s != 0 else np.float32(0.0)
                    if kind == 0:
                        c = min(max(q, np.float32(-8.0)), np.float32(7.0)) + np.float32(8.0)
                    elif kind == 1:
                        c = min(max(q + z, np.float32(0.0)), np.float32(15.0))
                    else:
                        c = min(max(q, np.float32(-127.0)), np.float32(127.0)) + np.float32(128.0)
                    code = np.uint8(int(c))
                    if bits == 4:
                        codes[b, k // 8, 4 * r + k % 4] |= code << np.uint8(4 * ((k % 8) // 4))
                    else:
                        codes[b, k // 4, 4 * r + k % 4] = code


# ---------------------------------------------------------------- the weight classes


class PackedWeight:
    """What Int4Weight and Int8Weight share: tensors, matmul, rows."""

    BITS = 0
    KIND = ""

    def _set(self, codes, scales, zeros, offsets, zero, shape):
        self.codes, self.scales, self.zeros, self.offsets = codes, scales, zeros, offsets
        self.zero = np.float32(zero)
        self.shape = tuple(int(s) for s in shape)
        self.group_size = ref.TILE_INPUTS[self.BITS] * codes.shape[1] // scales.shape[1]

    @classmethod
    def _check_group_size(cls, group_size):
        step = ref.TILE_INPUTS[cls.BITS]
        if not (isinstance(group_size, (int, np.integer)) and step <= group_size <= 1024
                and group_size % step == 0):
            raise ValueError(f"--group-size {group_size}: use 32, 64 or 128 "
                             f"(any multiple of {step} up to 1024 works)")

    @classmethod
    def _quantize(cls, w, group_size, kind, name):
        """Round-to-nearest quantization in three steps: group scales (Numba),
        their storage format (`reference.store_scales`), codes (Numba)."""
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (out, in) array, got shape {w.shape}")
        cls._check_group_size(group_size)
        if w.dtype not in (np.float32, np.float16, np.uint16):
            raise ValueError(f"{name}: cannot quantize dtype {w.dtype}; pass float32/float16 "
                             f"values or uint16 bf16 bits")
        n_p, k_p = ref.padded_shape(w.shape, group_size)
        if kind == 0:   # the default: widening, scale search and codes in one pass (quantizer.py)
            bad, codes, scales = quantize_symmetric(w, group_size)
        else:
            w = ref.bf16_to_f32(w) if w.dtype == np.uint16 else np.ascontiguousarray(w, dtype=np.float32)
            d = np.empty((n_p, k_p // group_size), np.float32)
            bad = group_scales(w, group_size, kind, d)
        if bad:
            raise ValueError(f"{name}: {bad} of {w.size} values are NaN, inf or beyond +-1.7e38; "
                             f"cannot quantize (the checkpoint is damaged or was saved after a "
                             f"diverged step)")
        if kind == 0:
            return codes, scales, np.zeros((n_p // 16, k_p // group_size, 16), np.uint8)
        scales = ref.store_scales(d, round_up=True)
        codes = np.zeros((n_p // 16, k_p // ref.TILE_INPUTS[cls.BITS], 64), np.uint8)
        zeros = np.zeros((n_p // 16, d.shape[1], 16), np.uint8)
        quantize_codes(w, group_size, kind, ref.scale_values(scales), codes, zeros)
        return codes, ref.by_block(scales), zeros

    @classmethod
    def from_codes(cls, codes, scales, group_size, zero=None, offsets=None, name="weight"):
        """A weight from integer codes, exactly: element [r, k] is
        scales[r, k // G] * (codes[r, k] - z) + offsets[r, k // G], in float32.

        codes    uint8 (out, in), each < 2**BITS (unsigned: shift signed codes)
        scales   float (out, ceil(in / G)); kept as float16 when that is exact
        zero     int (the same zero code for every group; default: the class's
                 symmetric zero, 8 or 128) or uint8 (out, groups)
        offsets  float32 (out, groups) or None (b = 0)
        """
        codes = np.asarray(codes)
        n, k = codes.shape if codes.ndim == 2 else (0, 0)
        cls._check_group_size(group_size)
        groups = -(-k // group_size)
        if codes.ndim != 2 or codes.dtype != np.uint8 or codes.size == 0:
            raise ValueError(f"{name}: codes must be a non-empty 2-D uint8 array, got "
                             f"{codes.dtype} {codes.shape}")
        if int(codes.max()) > ref.MAX_CODE[cls.BITS]:
            raise ValueError(f"{name}: codes go up to {int(codes.max())}, beyond {cls.BITS} bits")
        scales = np.asarray(scales)
        if scales.shape != (n, groups) or scales.dtype.kind != "f" or not np.isfinite(scales).all():
            raise ValueError(f"{name}: scales must be finite floats of shape {(n, groups)}, "
                             f"got {scales.dtype} {scales.shape}")
        if zero is None:
            zero = ref.SYMMETRIC_ZERO[cls.BITS]
        per_group_zero = np.ndim(zero) != 0
        if per_group_zero:
            zero = np.asarray(zero)
            if zero.shape != (n, groups) or zero.dtype != np.uint8 or int(zero.max()) > ref.MAX_CODE[cls.BITS]:
                raise ValueError(f"{name}: zero points must be uint8 of shape {(n, groups)} "
                                 f"below 2**{cls.BITS}")
        elif not 0 <= int(zero) <= ref.MAX_CODE[cls.BITS]:
            raise ValueError(f"{name}: zero code {zero} is outside 0..{ref.MAX_CODE[cls.BITS]}")
        if offsets is not None:
            offsets = np.asarray(offsets)
            if offsets.shape != (n, groups) or offsets.dtype != np.float32 or not np.isfinite(offsets).all():
                raise ValueError(f"{name}: offsets must be finite float32 of shape {(n, groups)}")
        n_p, k_p = ref.padded_shape((n, k), group_size)

        def padded(a, cols, dtype, fill=0):   # to (n_p, cols), new entries `fill`
            out = np.full((n_p, cols), fill, dtype)
            out[:n, : a.shape[1]] = a
            return out

        s32 = scales.astype(np.float32)
        exact16 = bool(np.array_equal(s32.astype(np.float16).astype(np.float32), s32))
        scale_dtype = np.float16 if exact16 else np.float32
        stored_scales = padded(s32.astype(scale_dtype), groups, scale_dtype)
        pad_code = 0 if per_group_zero else int(zero)
        self = cls.__new__(cls)
        self._set(ref.pack_tiles(padded(codes, k_p, np.uint8, pad_code), cls.BITS),
                  ref.by_block(stored_scales),
                  ref.by_block(padded(zero, groups, np.uint8)) if per_group_zero else None,
                  None if offsets is None else ref.by_block(padded(offsets, groups, np.float32)),
                  0 if per_group_zero else int(zero), (n, k))
        return self

    @classmethod
    def from_tensors(cls, tensors, prefix, shape):
        """From `tensors()` output (memory-mapped arrays are used in place).
        `shape` is the logical (out, in), known from the model config."""
        codes = tensors[f"{prefix}.qweight"]
        scales = tensors[f"{prefix}.scales"]
        zeros = tensors.get(f"{prefix}.zeros")
        offsets = tensors.get(f"{prefix}.offsets")
        zero = tensors.get(f"{prefix}.zero")
        zero = ref.SYMMETRIC_ZERO[cls.BITS] if zero is None else zero
        n_inputs = ref.TILE_INPUTS[cls.BITS]
        ok = (codes.dtype == np.uint8 and codes.ndim == 3 and codes.shape[2] == 64
              and scales.dtype in (np.float16, np.float32) and scales.ndim == 3
              and scales.shape[0] == codes.shape[0] and scales.shape[2] == 16
              and scales.shape[1] > 0 and (n_inputs * codes.shape[1]) % scales.shape[1] == 0
              and (zeros is None or (zeros.dtype == np.uint8 and zeros.shape == scales.shape))
              and (offsets is None or (offsets.dtype == np.float32 and offsets.shape == scales.shape))
              and np.size(zero) == 1 and int(np.asarray(zero).reshape(-1)[0]) <= ref.MAX_CODE[cls.BITS])
        if ok:
            group_size = n_inputs * codes.shape[1] // scales.shape[1]
            ok = (group_size % n_inputs == 0 and ref.padded_shape(shape, group_size)
                  == (16 * codes.shape[0], n_inputs * codes.shape[1]))
        if not ok:
            raise ValueError(f"{prefix}: stored tensors do not match the minislm {cls.KIND} layout "
                             f"for shape {tuple(shape)}; re-run `minislm quantize`")
        self = cls.__new__(cls)
        self._set(np.ascontiguousarray(codes), np.ascontiguousarray(scales),
                  None if zeros is None else np.ascontiguousarray(zeros),
                  None if offsets is None else np.ascontiguousarray(offsets),
                  int(np.asarray(zero).reshape(-1)[0]), shape)
        return self

    def tensors(self, prefix):
        out = {f"{prefix}.qweight": self.codes, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        elif self.zero != ref.SYMMETRIC_ZERO[self.BITS]:
            out[f"{prefix}.zero"] = np.array([int(self.zero)], np.uint8)
        if self.offsets is not None:
            out[f"{prefix}.offsets"] = self.offsets
        return out

    @property
    def qweight(self):
        """The codes under their stored name (`{prefix}.qweight`)."""
        return self.codes

    @property
    def symmetric(self):
        return self.zeros is None and self.offsets is None and self.zero == ref.SYMMETRIC_ZERO[self.BITS]

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.codes, self.scales, self.zeros, self.offsets) if a is not None)

    def __repr__(self):
        return (f"{type(self).__name__}(shape={self.shape}, group_size={self.group_size}, "
                f"scales={self.scales.dtype}, {self.nbytes / 1e6:.1f} MB)")

    def _kernel_scales(self):
        """float16 scales travel to the kernels as their uint16 bits (Numba has no float16)."""
        return self.scales.view(np.uint16) if self.scales.dtype == np.float16 else self.scales

    def matmul(self, x, path=None):
        """x (T, in) -> (T, out). One token: a GEMV ('vnni' or 'portable');
        more: a GEMM ('amx', 'vnni' or 'portable'). `path`
        overrides the CPU's choice (`cpu.py`), for tests and measurements;
        every path returns the same bits."""
        n, k = self.shape
        k_p = ref.TILE_INPUTS[self.BITS] * self.codes.shape[1]
        x = as_activations(x, k)
        if k_p != k:
            x = np.pad(x, ((0, 0), (0, k_p - k)))
        n_tok, n_p = x.shape[0], 16 * self.codes.shape[0]
        args = (self.codes, self._kernel_scales(), self.zeros, self.offsets, self.zero)
        if n_tok <= GEMV_MAX_TOKENS:
            gemv = GEMV[self.BITS, "vnni" if path == "amx" else path or cpu.int8_dot_path()]
            out = np.empty((n_tok, n_p), np.float32)
            for t in range(n_tok):
                gemv(*args, x[t: t + 1], out[t: t + 1])
            return out if out.shape == (n_tok, n) else np.ascontiguousarray(out[:n_tok, :n])
        if path is None:
            path = cpu.int8_gemm_path() if n_tok >= AMX_MIN_TOKENS else cpu.int8_dot_path()
        if path == "amx" and not cpu.has_amx_int8():   # also asks Linux for the tile state
            raise ValueError("path='amx': this CPU or operating system offers no AMX-INT8")
        if path == "amx" and not amx.usable(self.group_size):
            path = "vnni"
        if path == "amx":   # whole tiles of 16 tokens (zero tokens added)
            x = np.pad(x, ((0, -n_tok % amx.TILE_TOKENS), (0, 0))) if n_tok % amx.TILE_TOKENS else x
            out = np.empty((x.shape[0], n_p), np.float32)
            amx.GEMM[self.BITS](amx.packed_config(ref.act_group_size(self.group_size)), *args, x, out)
        else:
            out = np.empty((n_tok, n_p), np.float32)
            GEMM[self.BITS, path](*args, x, out)
        return out if out.shape == (n_tok, n) else np.ascontiguousarray(out[:n_tok, :n])

    def rows(self, ids):
        ids = as_row_ids(ids, self.shape[0])
        out = np.empty((ids.size, ref.TILE_INPUTS[self.BITS] * self.codes.shape[1]), np.float32)
        dequantize_rows(self.codes, self._kernel_scales(), self.zeros, self.offsets, self.zero,
                        self.BITS, ids, out)
        return out if out.shape[1] == self.shape[1] else np.ascontiguousarray(out[:, : self.shape[1]])

    def dequantize(self):
        """W as float32 (out, in): for tests and inspection, not per token."""
        return self.rows(np.arange(self.shape[0]))


class Int4Weight(PackedWeight):
    """A 4-bit (out, in) weight, a scale per group of inputs.

    `Int4Weight(w, group_size=32, symmetric=True)` quantizes float32/float16 `w`
    (or uint16 bf16 bits) by round-to-nearest: symmetric as llama.cpp's Q4_0
    (all 16 levels), or with a zero point per group; NaN, inf and |w| >= 2**127
    are rejected. `Int4Weight.from_codes(...)` takes codes and scales made
    elsewhere (GGUF, AWQ, GPTQ, MLX) exactly as they are;
    `Int4Weight.from_tensors(...)` rebuilds one from stored tensors."""

    BITS, KIND = 4, "int4"

    def __init__(self, w, group_size=32, symmetric=True, name="weight"):
        codes, scales, zeros = self._quantize(w, group_size, 0 if symmetric else 1, name)
        self._set(codes, scales, None if symmetric else zeros, None,
                  ref.SYMMETRIC_ZERO[4] if symmetric else 0, np.shape(w))


class Int8Weight(PackedWeight):
    """An 8-bit (out, in) weight, a scale per group of inputs.

    `Int8Weight(w, group_size=32)` quantizes symmetrically as llama.cpp's Q8_0
    (d = max|w| / 127, codes q + 128). minislm keeps the output layer (lm_head,
    or a tied embedding) at 8 bits: it decides every logit.
    `Int8Weight.from_codes(...)` takes codes of up to 8 bits made elsewhere
    (Q8_0, Q5_0/Q5_1, Q6_K) exactly as they are."""

    BITS, KIND = 8, "int8"

    def __init__(self, w, group_size=32, name="weight"):
        codes, scales, _ = self._quantize(w, group_size, 2, name)
        self._set(codes, scales, None, None, ref.SYMMETRIC_ZERO[8], np.shape(w))


def from_old_int4_tensors(tensors, prefix, shape):
    """An Int4Weight from a version-1 minislm int4 folder (layout "tiles-16x4":
    int16-activation tiles of 16 rows x 4 inputs, bf16 scales), converted
    exactly: the same codes, zero points and scale values (a bf16 number is a
    float16 number when in range, else the scales stay float32)."""
    qweight = tensors[f"{prefix}.qweight"]
    scales = tensors[f"{prefix}.scales"]
    zeros = tensors.get(f"{prefix}.zeros")
    ok = (qweight.dtype == np.uint8 and qweight.ndim == 3 and qweight.shape[2] == 32
          and scales.dtype == np.uint16 and scales.ndim == 3 and scales.shape[0] == qweight.shape[0]
          and scales.shape[2] == 16 and scales.shape[1] > 0 and (4 * qweight.shape[1]) % scales.shape[1] == 0
          and (zeros is None or (zeros.dtype == np.uint8 and zeros.shape == scales.shape)))
    group_size = 4 * qweight.shape[1] // scales.shape[1] if ok else 0
    if not ok or group_size % 8 or ref.padded_shape(shape, group_size) != (16 * qweight.shape[0], 4 * qweight.shape[1]):
        raise ValueError(f"{prefix}: stored tensors do not match the version-1 minislm int4 layout "
                         f"for shape {tuple(shape)}; re-run `minislm quantize`")
    nb, n_tiles, _ = qweight.shape
    pairs = np.asarray(qweight).reshape(nb, n_tiles, 16, 2)
    codes = np.concatenate([pairs & 15, pairs >> 4], axis=3).transpose(0, 2, 1, 3).reshape(nb * 16, n_tiles * 4)
    n, k = shape
    groups = -(-k // group_size)
    d = ref.bf16_to_f32(ref.by_row(np.asarray(scales)))[:n, :groups]
    zero = None if zeros is None else ref.by_row(np.asarray(zeros))[:n, :groups]
    return Int4Weight.from_codes(np.ascontiguousarray(codes[:n, :k]), d, group_size, zero=zero, name=prefix)
