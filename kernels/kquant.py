"""K-quant weights (llama.cpp's Q4_K, Q5_K, Q6_K) multiplied at the file's own size.

What every element means (`reference.dequantize_kquant` is the definition):

    w[r, k] = d[r, s] * sc[r, j] * (c[r, k] - z) - dmin[r, s] * m[r, j]
              s = k // 256 (super-block), j = k // sub_block (32; Q6_K: 16)

Why a class of its own. `Int4Weight`/`Int8Weight` hold one float scale and offset
per group: a K-quant's two levels of scales (fp16 d and dmin per 256 inputs, 6-bit
sc and m per sub-block) widened into that form cost 6 bits a weight for Q4_K (the
file: 4.5) and 10 for Q6_K, whose 6-bit codes take a byte each (the file: 6.5625).
Decode reads every weight once per token, so bits are time. Here the codes keep
their bits and the scales their two levels; what is read per token, per weight:

    kind   file     here     (here: 16-row records of `reference.kquant_layout`)
    Q4_K   4.5      4.625    sc and m stored as bytes (1/8 bit a weight more)
    Q5_K   5.5      5.625    the same
    Q6_K   6.5625   6.5625   the same bytes, reordered

Layout: one record per 16 rows x one super-block, `reference.pack_superblocks`
(drawn in docs/formats.md). The loader reorders the file's bytes into records
once; nothing is widened.

Arithmetic (`kquant_simd.py`): activations are int8 with one scale per super-block
(as llama.cpp quantizes activations for its K-quant dot products, Q8_K); integer
dot products per sub-block (`vpdpbusd`), times the integer sc, minus the integer
m times the sub-block's activation sum; then two float32 FMAs per super-block. The
GEMV (decode) and GEMM (prefill, 4 tokens per pass over a block, `GEMM_TOKENS`) run
the same operations in the same order, and the VNNI and portable paths differ only
in how they add byte products (exactly), so every call returns the same bits for a
token whatever shares the call or whatever the CPU. There is no AMX kernel: on AMX
machines prefill runs the VNNI GEMM, which gives the same bits.
"""

import numpy as np
from numba import njit, prange

from . import cpu
from . import reference as ref
from .activations import quantize_activations
from .checks import as_activations, as_row_ids
from .kquant_simd import kquant_block_kernel
from .packed import GEMM_TOKENS, GEMV_MAX_TOKENS
from .scalars import f32_to_half_bits, half_to_f32

QK_K = ref.QK_K
# bits -> bytes of one record (16 rows x 256 inputs); index 0-3 unused (a tuple Numba can index)
RECORD_BYTES = tuple(ref.kquant_layout(b)["record"] if b in ref.KQUANT_KINDS else 0 for b in range(7))
SUB_BLOCK = tuple(ref.KQUANT_KINDS[b][0] if b in ref.KQUANT_KINDS else 0 for b in range(7))

_q4_gemv_vnni = kquant_block_kernel(1, 4, "vnni")
_q5_gemv_vnni = kquant_block_kernel(1, 5, "vnni")
_q6_gemv_vnni = kquant_block_kernel(1, 6, "vnni")
_q4_gemm_vnni = kquant_block_kernel(GEMM_TOKENS, 4, "vnni")
_q5_gemm_vnni = kquant_block_kernel(GEMM_TOKENS, 5, "vnni")
_q6_gemm_vnni = kquant_block_kernel(GEMM_TOKENS, 6, "vnni")
_q4_gemv_portable = kquant_block_kernel(1, 4, "portable")
_q5_gemv_portable = kquant_block_kernel(1, 5, "portable")
_q6_gemv_portable = kquant_block_kernel(1, 6, "portable")
_q4_gemm_portable = kquant_block_kernel(GEMM_TOKENS, 4, "portable")
_q5_gemm_portable = kquant_block_kernel(GEMM_TOKENS, 5, "portable")
_q6_gemm_portable = kquant_block_kernel(GEMM_TOKENS, 6, "portable")


# ---------------------------------------------------------------- activations


@njit(cache=True)
def prepare_kquant_token(x, sub_block, xq, x_scale, bsums):
    """One token's int8 activations, a scale per super-block and the integer sum of
    each sub-block (`reference.kquant_activations`)."""
    x_sum = np.empty(x_scale.size, np.float32)
    quantize_activations(x, QK_K, xq, x_scale, x_sum)
    for j in range(bsums.size):
        total = np.int32(0)
        for k in range(j * sub_block, (j + 1) * sub_block):
            total += np.int32(xq[k])
        bsums[j] = total


@njit(cache=True)
def kquant_buffers(records, bits, x, out):
    """Check the shapes (the IR does no bounds checks) and make the activation buffers."""
    n_blocks, n_super, record = records.shape
    if (bits < 4 or bits > 6 or record != RECORD_BYTES[bits] or x.ndim != 2 or x.shape[1] != QK_K * n_super
            or out.shape[0] != x.shape[0] or out.shape[1] != 16 * n_blocks):
        raise ValueError("kquant kernel: records must be (blocks, in/256, record), x (T, in), out (T, 16 blocks)")
    sub_block = SUB_BLOCK[bits]
    xq = np.empty((x.shape[0], x.shape[1]), np.int8)
    x_scale = np.empty((x.shape[0], n_super), np.float32)
    bsums = np.empty((x.shape[0], x.shape[1] // sub_block), np.int32)
    return sub_block, xq, x_scale, bsums


# ---------------------------------------------------------------- GEMV and GEMM, per path
# One entry point per (GEMV or GEMM, path), as in packed.py: Numba compiles a
# function whole, so the VNNI blocks must not sit in a function the portable path
# calls. Each holds the three kinds; `bits` picks one per call.


@njit(parallel=True, cache=True)
def gemv_kquant_vnni(records, bits, x, out):
    """out (1, out_p) = W @ x_hat for one token x (1, in): each thread streams a
    contiguous run of 16-row blocks."""
    sub_block, xq, xs, bs = kquant_buffers(records, bits, x, out)
    prepare_kquant_token(x[0], sub_block, xq[0], xs[0], bs[0])
    words = xq.view(np.int32)
    for b in prange(records.shape[0]):
        if bits == 4:
            _q4_gemv_vnni(records, words, xs, bs, b, 0, out)
        elif bits == 5:
            _q5_gemv_vnni(records, words, xs, bs, b, 0, out)
        else:
            _q6_gemv_vnni(records, words, xs, bs, b, 0, out)


@njit(parallel=True, cache=True)
def gemm_kquant_vnni(records, bits, x, out):
    """out (T, out_p) = x_hat (T, in) @ W.T, T a multiple of 4: each thread takes
    whole 16-row blocks (cache-resident) through all tokens, 4 at a time."""
    sub_block, xq, xs, bs = kquant_buffers(records, bits, x, out)
    for t in prange(x.shape[0]):
        prepare_kquant_token(x[t], sub_block, xq[t], xs[t], bs[t])
    words = xq.view(np.int32)
    for b in prange(records.shape[0]):
        for t0 in range(0, x.shape[0], GEMM_TOKENS):
            if bits == 4:
                _q4_gemm_vnni(records, words, xs, bs, b, t0, out)
            elif bits == 5:
                _q5_gemm_vnni(records, words, xs, bs, b, t0, out)
            else:
                _q6_gemm_vnni(records, words, xs, bs, b, t0, out)


@njit(parallel=True, cache=True)
def gemv_kquant_portable(records, bits, x, out):
    sub_block, xq, xs, bs = kquant_buffers(records, bits, x, out)
    prepare_kquant_token(x[0], sub_block, xq[0], xs[0], bs[0])
    words = xq.view(np.int32)
    for b in prange(records.shape[0]):
        if bits == 4:
            _q4_gemv_portable(records, words, xs, bs, b, 0, out)
        elif bits == 5:
            _q5_gemv_portable(records, words, xs, bs, b, 0, out)
        else:
            _q6_gemv_portable(records, words, xs, bs, b, 0, out)


@njit(parallel=True, cache=True)
def gemm_kquant_portable(records, bits, x, out):
    sub_block, xq, xs, bs = kquant_buffers(records, bits, x, out)
    for t in prange(x.shape[0]):
        prepare_kquant_token(x[t], sub_block, xq[t], xs[t], bs[t])
    words = xq.view(np.int32)
    for b in prange(records.shape[0]):
        for t0 in range(0, x.shape[0], GEMM_TOKENS):
            if bits == 4:
                _q4_gemm_portable(records, words, xs, bs, b, t0, out)
            elif bits == 5:
                _q5_gemm_portable(records, words, xs, bs, b, t0, out)
            else:
                _q6_gemm_portable(records, words, xs, bs, b, t0, out)


GEMV = {"vnni": gemv_kquant_vnni, "portable": gemv_kquant_portable}
GEMM = {"vnni": gemm_kquant_vnni, "portable": gemm_kquant_portable}


# ---------------------------------------------------------------- packing and rows


def layout_offsets(bits):
    """`reference.kquant_layout` as the tuple the Numba kernels take: byte offsets of
    (d, dmin, scales, mins, chunks) in a record, -1 where absent, and a chunk's size."""
    at = ref.kquant_layout(bits)
    return tuple(-1 if at[p] is None else at[p] for p in ("d", "dmin", "scales", "mins", "chunks", "chunk"))


@njit(parallel=True, cache=True)
def pack_superblocks(codes, d, sub_scales, dmin, sub_mins, bits, offsets, records):
    """Fill zeroed `records` (out_p/16, in/256, record) from the fields, as
    `reference.pack_superblocks` (its twin) lays them out; one pass, a row block per
    thread. sub_scales as uint8 (Q6_K's int8 bytes as they are); dmin and sub_mins
    (rows, 0)-shaped where the kind has none. Rows beyond codes' stay zero (w = 0)."""
    d_at, dmin_at, sc_at, m_at, chunks_at, chunk = offsets
    n, k = codes.shape
    n_sub = sub_scales.shape[1] // d.shape[1]
    hb = bits - 4
    for b in prange(records.shape[0]):
        for r in range(16):
            row = 16 * b + r
            if row >= n:
                break
            for s in range(records.shape[1]):
                rec = records[b, s]
                half = f32_to_half_bits(d[row, s])
                rec[d_at + 2 * r], rec[d_at + 2 * r + 1] = np.uint8(half & 255), np.uint8(half >> 8)
                if dmin_at >= 0:
                    half = f32_to_half_bits(dmin[row, s])
                    rec[dmin_at + 2 * r], rec[dmin_at + 2 * r + 1] = np.uint8(half & 255), np.uint8(half >> 8)
                for j in range(n_sub):
                    rec[sc_at + 16 * j + r] = sub_scales[row, s * n_sub + j]
                    if m_at >= 0:
                        rec[m_at + 16 * j + r] = sub_mins[row, s * n_sub + j]
                for kk in range(0, QK_K, 8):   # one nibble tile: inputs kk..kk+7 of the super-block
                    chunk_at = chunks_at + chunk * (kk // 32)
                    for e in range(4):
                        low, high = codes[row, s * QK_K + kk + e], codes[row, s * QK_K + kk + 4 + e]
                        rec[chunk_at + 64 * ((kk % 32) // 8) + 4 * r + e] = (low & np.uint8(15)) | ((high & np.uint8(15)) << np.uint8(4))
                if hb > 0:
                    per = 32 // hb
                    for kk in range(QK_K):
                        at = chunks_at + chunk * (kk // 32) + 256 + 64 * ((kk % 32) // per) + 4 * r + kk % 4
                        rec[at] |= (codes[row, s * QK_K + kk] >> np.uint8(4)) << np.uint8(hb * ((kk % per) // 4))


@njit(cache=True)
def _half_at(rec, at):
    """The float16 stored little-endian at bytes at, at+1 of a record, as float32."""
    return half_to_f32(np.uint16(np.uint16(rec[at]) | (np.uint16(rec[at + 1]) << np.uint16(8))))


@njit(parallel=True, cache=True)
def dequantize_kquant_rows(records, bits, offsets, ids, out):
    """out (len(ids), in) float32 = rows `ids` of W, as `reference.dequantize_kquant`.
    offsets: `layout_offsets(bits)`."""
    d_at, dmin_at, sc_at, m_at, chunks_at, chunk = offsets
    sub_block = SUB_BLOCK[bits]
    hb = bits - 4
    zero = np.float32(32.0) if bits == 6 else np.float32(0.0)
    for i in prange(ids.size):
        b, r = ids[i] // 16, ids[i] % 16
        for s in range(records.shape[1]):
            rec = records[b, s]
            d = _half_at(rec, d_at + 2 * r)
            dmin = _half_at(rec, dmin_at + 2 * r) if dmin_at >= 0 else np.float32(0.0)
            for kk in range(QK_K):
                j = kk // sub_block
                chunk_at = chunks_at + chunk * (kk // 32)
                byte = rec[chunk_at + 64 * ((kk % 32) // 8) + 4 * r + kk % 4]
                c = (byte >> np.uint8(4)) if kk % 8 >= 4 else (byte & np.uint8(15))
                if hb > 0:
                    per = 32 // hb
                    high_at = chunk_at + 256 + 64 * ((kk % 32) // per)
                    top = rec[high_at + 4 * r + kk % 4] >> np.uint8(hb * ((kk % per) // 4))
                    c = c | ((top & np.uint8((1 << hb) - 1)) << np.uint8(4))
                sc = np.int32(rec[sc_at + 16 * j + r])
                if bits == 6 and sc >= 128:   # Q6_K's scales are int8
                    sc -= 256
                w = (d * np.float32(sc)) * (np.float32(c) - zero)
                if m_at >= 0:
                    w = w - dmin * np.float32(rec[m_at + 16 * j + r])
                out[i, s * QK_K + kk] = w


# ---------------------------------------------------------------- the weight class


class KQuantWeight:
    """A Q4_K, Q5_K or Q6_K (out, in) weight, its super-blocks kept as the file has them.

    `KQuantWeight.from_superblocks(codes, d, sub_scales, dmin, sub_mins, bits)` takes
    the fields of a GGUF tensor (minislm/formats/gguf_blocks.py unpacks them):

      codes       uint8 (out, in), in a multiple of 256, codes below 2**bits
      d           float (out, in/256), float16 values: the scale of the sub-block scales
      sub_scales  (out, in/sub_block): uint8 below 64 (Q4_K, Q5_K) or int8 (Q6_K)
      dmin        float (out, in/256), float16 values (Q4_K, Q5_K; None for Q6_K)
      sub_mins    uint8 (out, in/sub_block) below 64 (Q4_K, Q5_K; None for Q6_K)

    and holds `d * sc * (codes - z) - dmin * m` exactly (z = 32 for Q6_K, else 0).
    """

    def __init__(self, records, bits, shape):
        self.records, self.bits = records, int(bits)
        self.shape = tuple(int(s) for s in shape)
        self.sub_block = ref.KQUANT_KINDS[self.bits][0]

    @property
    def kind(self):
        """The GGUF type name: 'Q4_K', 'Q5_K' or 'Q6_K'."""
        return ref.KQUANT_NAMES[self.bits]

    @classmethod
    def from_superblocks(cls, codes, d, sub_scales, dmin=None, sub_mins=None, bits=4, name="weight"):
        if bits not in ref.KQUANT_KINDS:
            raise ValueError(f"{name}: K-quant codes have 4, 5 or 6 bits, not {bits}")
        sub_block, _, has_mins = ref.KQUANT_KINDS[bits]
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.dtype != np.uint8 or codes.size == 0 or codes.shape[1] % QK_K:
            raise ValueError(f"{name}: codes must be a non-empty 2-D uint8 array whose rows are a multiple "
                             f"of {QK_K} long, got {codes.dtype} {codes.shape}")
        if int(codes.max()) >= 2 ** bits:
            raise ValueError(f"{name}: codes go up to {int(codes.max())}, beyond {bits} bits")
        n, k = codes.shape
        supers, subs = (n, k // QK_K), (n, k // sub_block)

        def scale_of_scales(a, what):
            a = np.asarray(a)
            if a.shape != supers or a.dtype.kind != "f" or not np.isfinite(a).all() \
                    or not np.array_equal(a.astype(np.float16).astype(a.dtype), a):
                raise ValueError(f"{name}: {what} must be finite float16 values of shape {supers}, "
                                 f"got {a.dtype} {a.shape}")
            return np.ascontiguousarray(a, np.float32)

        def small_ints(a, what, dtype):
            a = np.asarray(a)
            if a.shape != subs or a.dtype != dtype or (dtype == np.uint8 and int(a.max()) > 63):
                raise ValueError(f"{name}: {what} must be {np.dtype(dtype)} of shape {subs}"
                                 f"{' below 64' if dtype == np.uint8 else ''}, got {a.dtype} {a.shape}")
            return a

        if has_mins != (dmin is not None) or has_mins != (sub_mins is not None):
            raise ValueError(f"{name}: {ref.KQUANT_NAMES[bits]} {'needs' if has_mins else 'has no'} dmin and sub_mins")
        d = scale_of_scales(d, "d")
        sub_scales = small_ints(sub_scales, "sub_scales", np.uint8 if has_mins else np.int8)
        if has_mins:
            dmin, sub_mins = scale_of_scales(dmin, "dmin"), small_ints(sub_mins, "sub_mins", np.uint8)
        records = np.zeros((-(-n // 16), k // QK_K, RECORD_BYTES[bits]), np.uint8)
        if not has_mins:   # the kernel takes arrays: empty ones
            dmin, sub_mins = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.uint8)
        pack_superblocks(np.ascontiguousarray(codes), d, np.ascontiguousarray(sub_scales).view(np.uint8), dmin,
                         np.ascontiguousarray(sub_mins), bits, layout_offsets(bits), records)
        return cls(records, bits, (n, k))

    @property
    def nbytes(self):
        return int(self.records.nbytes)

    def __repr__(self):
        return f"KQuantWeight({self.kind}, shape={self.shape}, {self.nbytes / 1e6:.1f} MB)"

    def matmul(self, x, path=None):
        """x (T, in) -> (T, out). One token: the GEMV; more: the GEMM, 4 tokens per
        pass. `path` ('vnni' or 'portable'; 'amx' runs 'vnni', there is no AMX kernel)
        overrides the CPU's choice (`cpu.py`), for tests; every path returns the same bits."""
        n, k = self.shape
        x = as_activations(x, k)
        n_tok, n_p = x.shape[0], 16 * self.records.shape[0]
        chosen = cpu.int8_dot_path() if path in (None, "amx") else path
        if n_tok <= GEMV_MAX_TOKENS:
            out = np.empty((n_tok, n_p), np.float32)
            for t in range(n_tok):
                GEMV[chosen](self.records, self.bits, x[t: t + 1], out[t: t + 1])
        else:
            x = np.pad(x, ((0, -n_tok % GEMM_TOKENS), (0, 0))) if n_tok % GEMM_TOKENS else x
            out = np.empty((x.shape[0], n_p), np.float32)
            GEMM[chosen](self.records, self.bits, x, out)
        return out if out.shape == (n_tok, n) else np.ascontiguousarray(out[:n_tok, :n])

    def rows(self, ids):
        ids = as_row_ids(ids, self.shape[0])
        out = np.empty((ids.size, self.shape[1]), np.float32)
        dequantize_kquant_rows(self.records, self.bits, layout_offsets(self.bits), ids, out)
        return out

    def dequantize(self):
        """W as float32 (out, in): for tests and inspection, not per token."""
        return self.rows(np.arange(self.shape[0]))
