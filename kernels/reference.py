"""Plain-NumPy twins of every kernel: the specification of what they compute.

Each function here has the same inputs and outputs as its fast twin in
`fp32.py`, `bf16.py` or `int4.py`; `tests/test_kernels_*.py` check them
equal on random and awkward inputs. Read this file to learn the formats;
read the kernel files to learn how they are made fast. Layouts are drawn in
`docs/formats.md`.
"""

import numpy as np

# --- fp32 ---------------------------------------------------------------


def matmul_f32(x, w):
    """x (T, in) @ w (out, in).T -> (T, out), the hub layout of nn.Linear."""
    return (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)


# --- bf16: the top 16 bits of an fp32 number -----------------------------


# The loader's own conversions (minislm/weights.py) are the specification here too:
# f32_to_bf16 rounds to nearest, ties to even (adding 0x7FFF plus the lowest kept
# bit, then truncating); bf16_to_f32 widens exactly (a 16-bit shift). Finite inputs
# only: a NaN can round to inf, and callers reject NaN.
from minislm.weights import bf16_to_float32 as bf16_to_f32  # noqa: E402
from minislm.weights import float32_to_bf16 as f32_to_bf16  # noqa: E402


def matmul_bf16(x, w_bits):
    """x (T, in) @ widen(w_bits (out, in)).T -> (T, out)."""
    return matmul_f32(x, bf16_to_f32(w_bits))


# --- int4, group-wise round-to-nearest ----------------------------------

TILE_ROWS, TILE_INPUTS = 16, 4   # one tile = 16 output rows x 4 inputs = 32 bytes
SYMMETRIC_ZERO = 8               # symmetric codes are stored as q + 8 in [1, 15]
QUANTIZABLE_LIMIT = np.float32(2.0 ** 127)  # |w| below this; larger could round to inf


def bf16_ceil(d, nonzero):
    """Round non-negative float32 `d` up to a bf16 number (returned as float32).

    Rounding the scale *up* keeps every weight within the code range, so the
    round-trip error stays <= half a step. `nonzero` marks groups that hold a
    non-zero weight: their scale is at least the smallest bf16 number even
    when `amax / 7` underflows to 0."""
    d = np.asarray(d, dtype=np.float32)
    bits = np.where(d > 0, d.view(np.uint32), 0).astype(np.uint64)
    bits = np.where(nonzero & (bits == 0), 1, bits)
    bits = np.where(bits & 0xFFFF, (bits | 0xFFFF) + 1, bits)
    return (bits >> 16).astype(np.uint16)


def padded_shape(shape, group_size):
    """(out, in) -> (out rounded up to 16, in rounded up to the group size)."""
    n, k = shape
    return -(-n // TILE_ROWS) * TILE_ROWS, -(-k // group_size) * group_size


def rtn_quantize(w, group_size, symmetric):
    """Round-to-nearest int4 quantization along the input dimension.

    w (out, in) float32 is zero-padded to `padded_shape`, then each run of
    `group_size` inputs of a row is one group with a scale d (bf16) and:
      symmetric:  d = max|w| / 7,  q = round(w/d) + 8 in [1, 15],  w_hat = (q - 8) d
      asymmetric: lo = min(w, 0), hi = max(w, 0), d = (hi - lo) / 15,
                  z = round(-lo/d) in [0, 15], q = clip(round(w/d) + z, 0, 15),
                  w_hat = (q - z) d
    round(v) is floor(v + 0.5). Returns codes (out_p, in_p) uint8, scale bits
    (out_p, groups) uint16 and zero points (out_p, groups) uint8, or None
    when symmetric (z = 8)."""
    if not (np.abs(w) < QUANTIZABLE_LIMIT).all():
        raise ValueError("rtn_quantize: weight holds NaN, inf or a value beyond +-2**127")
    n_p, k_p = padded_shape(w.shape, group_size)
    wp = np.zeros((n_p, k_p), np.float32)
    wp[: w.shape[0], : w.shape[1]] = w
    g = wp.reshape(n_p, k_p // group_size, group_size)
    half = np.float32(0.5)
    if symmetric:
        amax = np.abs(g).max(axis=2)
        d_bits = bf16_ceil(amax / np.float32(7), amax > 0)
        d = bf16_to_f32(d_bits)[:, :, None]
        safe = np.where(d > 0, d, np.float32(1))
        q = np.where(d > 0, np.floor(g / safe + half), 0)
        codes = np.clip(q, -8, 7) + SYMMETRIC_ZERO
        zeros = None
    else:
        lo = np.minimum(g.min(axis=2), 0)
        hi = np.maximum(g.max(axis=2), 0)
        d_bits = bf16_ceil(hi / np.float32(15) - lo / np.float32(15), hi > lo)
        d = bf16_to_f32(d_bits)
        safe = np.where(d > 0, d, np.float32(1))
        z = np.where(d > 0, np.clip(np.floor(-lo / safe + half), 0, 15), 0)
        d, safe = d[:, :, None], safe[:, :, None]
        q = np.where(d > 0, np.floor(g / safe + half), 0) + z[:, :, None]
        codes = np.clip(q, 0, 15)
        zeros = z.astype(np.uint8)
    return codes.reshape(n_p, k_p).astype(np.uint8), d_bits, zeros


def dequantize(codes, scale_bits, zeros, group_size):
    """codes (out, in), per-group scales/zeros (out, groups) -> float32 (out, in)."""
    d = np.repeat(bf16_to_f32(scale_bits), group_size, axis=1)
    z = SYMMETRIC_ZERO if zeros is None else np.repeat(zeros.astype(np.float32), group_size, axis=1)
    return (codes.astype(np.float32) - z) * d


def pack_tiles(codes, scale_bits, zeros):
    """Logical arrays -> the stored layout (see docs/formats.md).

    codes (out_p, in_p) -> qweight (out_p/16, in_p/4, 32) uint8 where, in
    tile j of row block b, byte 2r+e = codes[16b+r, 4j+e] | codes[16b+r, 4j+2+e] << 4.
    scales/zeros (out_p, groups) -> (out_p/16, groups, 16): the 16 rows of a
    block are adjacent so one vector load fetches them."""
    n_p, k_p = codes.shape
    c = codes.reshape(n_p // 16, 16, k_p // 4, 4).transpose(0, 2, 1, 3)  # (b, j, r, 4)
    low, high = c[..., 0:2], c[..., 2:4]                                   # (b, j, r, e)
    qweight = (low | (high << 4)).reshape(n_p // 16, k_p // 4, 32)

    def by_block(a):
        return None if a is None else np.ascontiguousarray(
            a.reshape(n_p // 16, 16, -1).transpose(0, 2, 1))

    return np.ascontiguousarray(qweight), by_block(scale_bits), by_block(zeros)


def unpack_tiles(qweight, scales, zeros):
    """Inverse of `pack_tiles`."""
    nb, n_tiles, _ = qweight.shape
    b = qweight.reshape(nb, n_tiles, 16, 2)
    c = np.concatenate([b & 15, b >> 4], axis=3)                  # (b, j, r, 4)
    codes = c.transpose(0, 2, 1, 3).reshape(nb * 16, n_tiles * 4)

    def by_row(a):
        return None if a is None else a.transpose(0, 2, 1).reshape(nb * 16, -1)

    return codes, by_row(scales), by_row(zeros)


def quantize_int4(w, group_size, symmetric):
    """float32 (out, in) -> (qweight, scales, zeros) in the stored layout."""
    return pack_tiles(*rtn_quantize(w, group_size, symmetric))


def dequantize_int4(qweight, scales, zeros, shape):
    """Stored layout -> float32 `shape` (padding dropped)."""
    codes, d, z = unpack_tiles(qweight, scales, zeros)
    group_size = codes.shape[1] // d.shape[1]
    return dequantize(codes, d, z, group_size)[: shape[0], : shape[1]]


ACT_LEVELS = 32767  # int16 activations: xq in [-32767, 32767]


def quantize_activations(x, group_size):
    """x (in_p,) float32 -> xq int16, x_scale (groups,), x_sum (groups,).

    Per group of the weight's group size: x_scale = max|x| / 32767,
    xq = round(x / x_scale), x_sum = x_scale * sum(xq). x_hat = x_scale * xq
    differs from x by at most max|x| / 65534 per element. A group holding
    NaN or inf gets x_scale = NaN, which makes every output NaN."""
    g = x.reshape(-1, group_size).astype(np.float32)
    amax = np.abs(g).max(axis=1)
    scale = (amax / np.float32(ACT_LEVELS)).astype(np.float32)
    ok = np.isfinite(amax) & (amax > 0)
    safe = np.where(ok, scale, np.float32(1))[:, None]
    xq = np.where(ok[:, None], np.clip(np.floor(g / safe + np.float32(0.5)), -ACT_LEVELS, ACT_LEVELS), 0)
    xq = xq.astype(np.int16)
    scale = np.where(np.isfinite(amax), scale, np.float32(np.nan)).astype(np.float32)
    with np.errstate(over="ignore"):   # |x| near 3e38: the sum is inf, as in the kernel
        x_sum = (scale * xq.astype(np.int64).sum(axis=1).astype(np.float32)).astype(np.float32)
    return xq.reshape(-1), scale, x_sum


def int4_gemv(qweight, scales, zeros, x):
    """One token: W_hat @ x_hat for the padded weight, in float64.

    x (in_p,) is quantized with `quantize_activations`; the integer dot
    products are exact, so the fast kernel differs from this only by the
    order of its float32 sums over groups."""
    codes, d_bits, z = unpack_tiles(qweight, scales, zeros)
    n_p, k_p = codes.shape
    groups = d_bits.shape[1]
    group_size = k_p // groups
    xq, x_scale, x_sum = quantize_activations(x, group_size)
    isum = (codes.astype(np.int64).reshape(n_p, groups, group_size)
            * xq.astype(np.int64).reshape(groups, group_size)).sum(axis=2)
    z = np.float64(SYMMETRIC_ZERO) if z is None else z.astype(np.float64)
    d = bf16_to_f32(d_bits).astype(np.float64)
    part = x_scale.astype(np.float64) * isum - z * x_sum.astype(np.float64)
    return (d * part).sum(axis=1)


def matmul_int4(x, qweight, scales, zeros, shape):
    """x (T, in) -> (T, out): `int4_gemv` for each token, padding dropped.

    Prefill (T > 1) and decode (T = 1) compute the same thing."""
    n, k = shape
    k_p = 4 * qweight.shape[1]
    xp = np.zeros((x.shape[0], k_p), np.float32)
    xp[:, :k] = x
    return np.stack([int4_gemv(qweight, scales, zeros, row)[:n] for row in xp]).astype(np.float32)
