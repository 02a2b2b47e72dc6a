"""Plain-NumPy twins of every kernel: the specification of what they compute.

The rule: every Numba kernel in this folder has its twin here, in this one
file, under the kernel's own name where that names an operation
(`search_scales`, `quantize_activations`, `attend_cached`, `widen_f16`, ...),
taking the kernel's inputs (less its output buffer) and returning what the
kernel writes there. One section per kernel file: `fp32.py`, `bf16.py`,
`packed.py` (int4 and int8, with `activations.py`), `amx.py`, `bf16pairs.py`, `convert.py`,
`attention.py`, `blocksparse.py`, `rowwise.py`, `conv.py`. `tests/test_kernels_*.py`,
`tests/test_attention_kernel.py`, `tests/test_blocksparse.py`,
`tests/test_rowwise_kernels.py` and `tests/test_conv_kernel.py` check each
kernel equal to its twin on random and awkward inputs. Read this file to learn
the formats; read the kernel files to learn how they are made fast. Layouts are
drawn in `docs/formats.md`.

This file imports nothing but NumPy: the loader (`minislm/weights.py`) takes its
bf16 conversions from here, so the kernels never reach up into the loader.
"""

import numpy as np

# --- fp32 ---------------------------------------------------------------


def matmul_f32(x, w):
    """x (T, in) @ w (out, in).T -> (T, out), the hub layout of nn.Linear."""
    return (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)


# --- bf16: the top 16 bits of an fp32 number -----------------------------


def bf16_to_f32(words):
    """bf16 words (uint16, any shape) -> float32: bfloat16 is the upper 16 bits of a
    float32, so widening is a shift (exact). The twin of `simd.bf16_to_f32` (one
    word) and of `convert.widen_bf16` (a whole array)."""
    return (np.asarray(words).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """float32 (any shape) -> the nearest bfloat16, ties to even, as uint16 words:
    add 0x7FFF plus the lowest kept bit, then drop the low 16 bits (`simd.round_to_bf16`
    is the kernels' twin). Finite inputs only: a NaN can round to inf, and callers
    reject NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def matmul_bf16(x, w_bits):
    """x (T, in) @ widen(w_bits (out, in)).T -> (T, out)."""
    return matmul_f32(x, bf16_to_f32(w_bits))


# --- packed integer weights: int4 and int8 codes with a scale per group --
#
# Every packed format minislm multiplies, its own and the ones it reads (GGUF,
# AWQ, GPTQ, MLX), is, for output row r and input k in group g = k // G:
#
#     w[r, k] = s[r, g] * (c[r, k] - z[r, g]) + b[r, g]
#
# c: unsigned integer codes (4 bits in Int4Weight, up to 8 in Int8Weight);
# s: a float scale per group (stored as float16 where that is exact, else float32);
# z: an integer zero code, one per group (uint8) or one for the whole tensor;
# b: an optional float32 offset per group (K-quants' -dmin*m, MLX's bias).
# `dequantize` is the definition, in float32 with that order of operations.

TILE_ROWS, TILE_BYTES = 16, 64     # one tile = 16 output rows x 4 bytes per row
TILE_INPUTS = {4: 8, 8: 4}         # inputs per tile: 8 nibbles or 4 bytes per row
SYMMETRIC_ZERO = {4: 8, 8: 128}    # zero code of the symmetric quantizers
MAX_CODE = {4: 15, 8: 255}
ACT_LEVELS = 127                   # int8 activations in [-127, 127]
ACT_GROUP = 32                     # inputs per activation scale (when the weight group allows)
QUANTIZABLE_LIMIT = np.float32(2.0 ** 127)  # |w| below this; larger could overflow a scale
FP16_MIN_NORMAL, FP16_MAX = 2.0 ** -14, 65504.0


def act_group_size(group_size):
    """Inputs per int8 activation scale: 32 when it divides the weight group, else
    the whole weight group (Q6_K's 16, or odd sizes)."""
    return ACT_GROUP if group_size % ACT_GROUP == 0 else group_size


def padded_shape(shape, group_size):
    """(out, in) -> (out rounded up to 16, in rounded up to the group size)."""
    n, k = shape
    return -(-n // TILE_ROWS) * TILE_ROWS, -(-k // group_size) * group_size


def scale_values(scales):
    """Stored scales (float16 or float32) as float32."""
    return np.asarray(scales).astype(np.float32)


def store_scales(d, round_up):
    """Choose how to store the float32 scales `d` of one tensor.

    float16 (half the bytes) if every non-zero |d| is a normal float16 number,
    rounded to the nearest float16 (or up in magnitude when `round_up`, so that
    no weight falls outside the code range); otherwise float32, unrounded.
    Subnormal float16 scales would keep only a few significant bits."""
    d = np.asarray(d, np.float32)
    mag = np.abs(d[d != 0])
    if mag.size and not (mag.min() >= FP16_MIN_NORMAL and mag.max() <= FP16_MAX):
        return d.copy()
    h = d.astype(np.float16)
    if round_up:
        low = np.abs(h.astype(np.float32)) < np.abs(d)
        h[low] = np.nextafter(h[low], np.copysign(np.float16(np.inf), h[low]))
    if not np.isfinite(h).all():   # rounding up past 65504
        return d.copy()
    return h


def _check_quantizable(w):
    if not (np.abs(w) < QUANTIZABLE_LIMIT).all():
        raise ValueError("weight holds NaN, inf or a value beyond +-2**127")


def _groups(w, group_size):
    """w (out, in) zero-padded to padded_shape, as (out_p, groups, G) float32."""
    n_p, k_p = padded_shape(w.shape, group_size)
    wp = np.zeros((n_p, k_p), np.float32)
    wp[: w.shape[0], : w.shape[1]] = w
    return wp.reshape(n_p, k_p // group_size, group_size)


def _round(v):
    return np.floor(v + np.float32(0.5))


SMALLEST = np.float32(2.0 ** -149)   # the smallest positive float32 (a subnormal)


def _not_underflowed(d, nonzero):
    """A group holding a non-zero weight keeps a non-zero scale even when its
    division underflowed to 0 (|w| near 1e-45): the smallest float32, signed as d
    should be."""
    return np.where((d == 0) & nonzero, np.copysign(SMALLEST, d), d).astype(np.float32)


# Symmetric int4 tries these scales d = extreme / m per group (extreme: the
# weight of largest magnitude), refits each by least squares, and keeps the one
# with the smallest squared error. m = -8 is llama.cpp's Q4_0 rule; -7.5 gives
# finer steps, 7 maps the extreme to +7. On the shipped model these three cut
# the KL from the float model by 9 % against the rule alone, as much as five or
# eight candidates did (docs/kernels.md); each costs one pass over the weights.
SCALE_CANDIDATES = (-8.0, -7.5, 7.0)


def round_f16(d):
    """d (float32) rounded to the nearest float16 where |d| is a normal float16
    number, else unchanged: the value `store_scales` will keep."""
    d = np.asarray(d, np.float32)
    mag = np.abs(d)
    normal = (mag >= FP16_MIN_NORMAL) & (mag <= FP16_MAX)
    with np.errstate(over="ignore"):   # the values cast to inf are not kept
        return np.where(normal, d.astype(np.float16).astype(np.float32), d).astype(np.float32)


FIXED_POINT_BITS = 40   # search sums: w as integers, the group's largest |w| below 2**40


def search_scales(g):
    """The symmetric int4 scale of each group of g (rows, groups, G) float32.

    For each m in SCALE_CANDIDATES: d0 = round_f16(extreme / m), codes
    q = clip(round(w / d0), -8, 7), and the least-squares scale for those codes
    d1 = round_f16(sum(w q) / sum(q q)); keep the first d1 with the smallest
    squared error of those codes, sum(w^2) - 2 d1 sum(w q) + d1^2 sum(q q)
    (without the sum(w^2) all share). Rounding again with d1 can only lower the
    error. The sums are exact sums of integers, w taken in fixed point (2**40
    steps up to the group's largest power of two, rounded: |q w| < 2**43, and
    a group of up to 1024 sums to less than 2**53), so float64 adds them
    exactly in any order, and the Numba twin (`packed.search_scales`) picks
    the same d bit for bit."""
    first_max = np.abs(g).argmax(axis=2)[..., None]
    extreme = np.take_along_axis(g, first_max, axis=2)[..., 0]
    nonzero = extreme != 0
    _, e = np.frexp(np.abs(extreme).astype(np.float64))     # |extreme| < 2**e
    unit = np.ldexp(1.0, e - FIXED_POINT_BITS)[..., None]     # value of one fixed-point step
    w_fixed = np.floor(g.astype(np.float64) * (1.0 / unit) + 0.5)   # 1/unit: a power of two, exact
    best_d = best_e = None
    for m in SCALE_CANDIDATES:
        d0 = round_f16(_not_underflowed(extreme / np.float32(m), nonzero))
        safe = np.where(d0 != 0, d0, np.float32(1))[..., None]
        q = np.where(d0[..., None] != 0, np.clip(_round(g / safe), -8, 7), 0).astype(np.float64)
        wq = (q * w_fixed).sum(axis=2) * unit[..., 0]
        qq = (q * q).sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            fit = (wq / np.where(qq > 0, qq, 1)).astype(np.float32)
        d1 = np.where(qq > 0, round_f16(_not_underflowed(fit, nonzero)), d0)
        d64 = d1.astype(np.float64)
        err = d64 * d64 * qq - 2 * d64 * wq
        if best_d is None:
            best_d, best_e = d1, err
        else:
            better = err < best_e
            best_d, best_e = np.where(better, d1, best_d), np.where(better, err, best_e)
    return best_d.astype(np.float32)


def quantize_int4(w, group_size, symmetric):
    """Round-to-nearest int4 along the inputs -> (codes (out_p, in_p) uint8,
    scales (out_p, groups) float16|float32, zeros (out_p, groups) uint8 or None).

    symmetric: d from `search_scales` (llama.cpp's Q4_0 rule, d = extreme / -8,
      is its first candidate; all 16 levels are used), c = clip(round(w / d), -8, 7) + 8,
      zero code 8.
    asymmetric: lo = min(w, 0), hi = max(w, 0), d = (hi - lo) / 15 rounded up,
      z = round(-lo / d) in [0, 15], c = clip(round(w / d) + z, 0, 15).
    round(v) = floor(v + 0.5), with the stored (rounded) scale; zero groups get
    d = 0 and the zero code."""
    _check_quantizable(w)
    g = _groups(w, group_size)
    if symmetric:
        scales = store_scales(search_scales(g), round_up=False)
        d = scale_values(scales)[..., None]
        safe = np.where(d != 0, d, np.float32(1))
        q = np.where(d != 0, _round(g / safe), 0)
        codes, zeros = np.clip(q, -8, 7) + 8, None
    else:
        lo = np.minimum(g.min(axis=2), 0)
        hi = np.maximum(g.max(axis=2), 0)
        scales = store_scales(_not_underflowed(hi / np.float32(15) - lo / np.float32(15), hi > lo), round_up=True)
        d = scale_values(scales)
        safe = np.where(d > 0, d, np.float32(1))
        z = np.where(d > 0, np.clip(_round(-lo / safe), 0, 15), 0)
        d, safe = d[..., None], safe[..., None]
        q = np.where(d > 0, _round(g / safe), 0) + z[..., None]
        codes, zeros = np.clip(q, 0, 15), z.astype(np.uint8)
    return codes.reshape(g.shape[0], -1).astype(np.uint8), scales, zeros


def quantize_int4_symmetric(w, group_size):
    """(d (out_p, groups) float32, tiles): what the one-pass quantizer
    (`quantizer.quantize_int4_symmetric`) writes, the scales of `search_scales` and
    the codes of `quantize_int4(w, group_size, True)` in `pack_tiles`' layout."""
    _check_quantizable(w)
    codes, scales, _ = quantize_int4(w, group_size, True)
    return search_scales(_groups(w, group_size)), pack_tiles(codes, 4)


def quantize_int8(w, group_size):
    """Symmetric int8 (llama.cpp's Q8_0 rule): d = max|w| / 127 rounded up,
    c = round(w / d) + 128 in [1, 255], zero code 128."""
    _check_quantizable(w)
    g = _groups(w, group_size)
    amax = np.abs(g).max(axis=2)
    scales = store_scales(_not_underflowed(amax / np.float32(127), amax > 0), round_up=True)
    d = scale_values(scales)[..., None]
    safe = np.where(d > 0, d, np.float32(1))
    q = np.where(d > 0, _round(g / safe), 0)
    return (np.clip(q, -127, 127) + 128).reshape(g.shape[0], -1).astype(np.uint8), scales


def dequantize(codes, scales, zero, offsets, group_size):
    """The weight every element represents: s * (c - z) + b, in float32.

    codes (out, in) unsigned; scales, offsets (out, groups); zero an int or a
    uint8 (out, groups) array; offsets may be None (b = 0)."""
    def per_element(a):
        return np.repeat(np.asarray(a), group_size, axis=1)[:, : codes.shape[1]]

    z = np.float32(zero) if np.ndim(zero) == 0 else per_element(zero).astype(np.float32)
    w = (codes.astype(np.float32) - z) * per_element(scale_values(scales))
    if offsets is not None:
        w = w + per_element(offsets).astype(np.float32)
    return w


def pack_tiles(codes, bits):
    """codes (out_p, in_p) -> tiles (out_p/16, in_p/n, 64) uint8 (docs/formats.md).

    In tile j of row block b, row r owns bytes 4r .. 4r+3 (one 32-bit lane):
      bits 8 (n = 4): byte 4r+e = c[16b+r, 4j+e]
      bits 4 (n = 8): byte 4r+e = c[16b+r, 8j+e] | c[16b+r, 8j+4+e] << 4"""
    n_p, k_p = codes.shape
    n = TILE_INPUTS[bits]
    c = codes.reshape(n_p // 16, 16, k_p // n, n).transpose(0, 2, 1, 3)   # (b, j, r, n)
    if bits == 4:
        c = c[..., :4] | (c[..., 4:] << 4)
    return np.ascontiguousarray(c.reshape(n_p // 16, k_p // n, TILE_BYTES)).astype(np.uint8)


def unpack_tiles(tiles, bits):
    """Inverse of `pack_tiles`."""
    nb, n_tiles, _ = tiles.shape
    t = tiles.reshape(nb, n_tiles, 16, 4)
    if bits == 4:
        t = np.concatenate([t & 15, t >> 4], axis=3)
    return t.transpose(0, 2, 1, 3).reshape(nb * 16, n_tiles * TILE_INPUTS[bits])


def by_block(a):
    """Per-(row, group) array (out_p, groups) -> (out_p/16, groups, 16): the 16
    rows of a block adjacent, one vector load. None stays None."""
    if a is None or np.ndim(a) == 0:
        return a
    return np.ascontiguousarray(np.asarray(a).reshape(a.shape[0] // 16, 16, -1).transpose(0, 2, 1))


def by_row(a):
    """Inverse of `by_block`."""
    if a is None or np.ndim(a) == 0:
        return a
    return a.transpose(0, 2, 1).reshape(a.shape[0] * 16, -1)


def quantize_activations(x, act_group):
    """x (in_p,) float32 -> int8 codes xq, x_scale and x_sum per activation group.

    x_scale = max|x| / 127, xq = round(x / x_scale) in [-127, 127], so
    x_hat = x_scale * xq is within max|x|/254 of x; x_sum = x_scale * sum(xq)
    (float32) is what the offsets and zero codes multiply. A group holding NaN
    or inf gets x_scale = NaN, which makes every output NaN."""
    g = x.reshape(-1, act_group).astype(np.float32)
    amax = np.abs(g).max(axis=1)
    scale = (amax / np.float32(ACT_LEVELS)).astype(np.float32)
    ok = np.isfinite(amax) & (amax > 0)
    safe = np.where(ok, scale, np.float32(1))[:, None]
    xq = np.where(ok[:, None], np.clip(_round(g / safe), -ACT_LEVELS, ACT_LEVELS), 0).astype(np.int8)
    scale = np.where(np.isfinite(amax), scale, np.float32(np.nan)).astype(np.float32)
    with np.errstate(over="ignore"):
        x_sum = (scale * xq.astype(np.int64).sum(axis=1).astype(np.float32)).astype(np.float32)
    return xq.reshape(-1), scale, x_sum


def group_sums(x_sum, acts_per_group):
    """Sum of x_sum over each weight group's activation groups, left to right in
    float32 (the kernels' order): (n_act,) -> (groups,)."""
    s = x_sum.reshape(-1, acts_per_group)
    total = s[:, 0].copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(1, acts_per_group):
            total = total + s[:, i]
    return total


def packed_gemv(tiles, scales, zero, offsets, x, bits):
    """One token, in float64: sum_k w[r, k] * x_hat[k] for the padded weight
    (blocked arrays as stored), with w = s (c - z) + b exactly (not rounded to
    float32) and x_hat the int8 activations. The kernels differ from this only
    by the float32 roundings of their per-group sums."""
    codes = unpack_tiles(tiles, bits).astype(np.float64)
    s = scale_values(by_row(scales)).astype(np.float64)
    group_size = codes.shape[1] // s.shape[1]
    z = np.float64(zero) if np.ndim(zero) == 0 else np.repeat(by_row(zero).astype(np.float64), group_size, 1)
    w = (codes - z) * np.repeat(s, group_size, axis=1)
    if offsets is not None:
        w = w + np.repeat(by_row(offsets).astype(np.float64), group_size, axis=1)
    a = act_group_size(group_size)
    xq, x_scale, _ = quantize_activations(x, a)
    x_hat = np.repeat(x_scale.astype(np.float64), a) * xq
    with np.errstate(invalid="ignore", over="ignore"):
        return w @ x_hat


def matmul_packed(x, tiles, scales, zero, offsets, shape, bits):
    """x (T, in) -> (T, out): `packed_gemv` for each token, padding dropped.
    Prefill (T > 1) and decode (T = 1) compute the same thing."""
    n, k = shape
    k_p = tiles.shape[1] * TILE_INPUTS[bits]
    xp = np.zeros((x.shape[0], k_p), np.float32)
    xp[:, :k] = x
    return np.stack([packed_gemv(tiles, scales, zero, offsets, row, bits)[:n] for row in xp])


# --- K-quant super-blocks: llama.cpp's Q4_K, Q5_K, Q6_K at their own size (kquant.py) ---
#
# A K-quant row is cut into super-blocks of 256 inputs, each cut into sub-blocks of
# 32 inputs (Q4_K, Q5_K) or 16 (Q6_K), with two levels of scales:
#
#     w[r, k] = d[r, s] * sc[r, j] * (c[r, k] - z) - dmin[r, s] * m[r, j]
#               s = k // 256 (super-block), j = k // sub_block (sub-block)
#
# d and dmin: float16 per super-block; sc and m: 6-bit unsigned integers per
# sub-block (Q6_K: a signed int8 sc, no dmin and m, and z = 32); c: 4-, 5- or 6-bit
# unsigned codes. `dequantize_kquant` is the definition, in float32 in that order
# (every product is exact: at most 11 + 7 + 6 = 24 significant bits).
#
# Kept like that a weight costs the file's bits: 4.5 for Q4_K, 5.5 for Q5_K, 6.5625
# for Q6_K, plus 1/8 bit for Q4_K and Q5_K, whose 6-bit sc and m are stored as
# bytes. A float32 scale and offset per sub-block instead (GroupedCodes, and the
# Int4Weight/Int8Weight tiles) cost 6 bits for Q4_K and 10 for Q6_K, whose 6-bit
# codes then take a byte each.
#
# One record holds 16 rows x one super-block, everything the kernel needs for it in
# the order it needs it, so each thread reads one sequential stream (offsets:
# `kquant_layout`):
#
#     d        16 float16                       rows 0..15
#     dmin     16 float16                       (Q4_K, Q5_K)
#     scales   n_sub x 16 bytes                 sub-block j: rows 0..15 (uint8; Q6_K int8)
#     mins     n_sub x 16 bytes                 (Q4_K, Q5_K)
#     chunks   8 chunks of 32 inputs, each:
#                4 int4 tiles (256 bytes): the low 4 bits of c (`pack_tiles(c & 15, 4)`)
#                then the bits above them (`pack_high_bits`): Q5_K one 64-byte tile
#                (the fifth bit), Q6_K two (bits 4-5); Q4_K none
#
# (A first layout kept all the nibbles, then all the high bits: two streams 2 KB
# apart in one record. On the Zen 4 test machine Q5_K and Q6_K then streamed from
# memory at 4-9 GB/s on one thread, against 28 GB/s for Q4_K, which has no high bits.)

QK_K = 256   # inputs per super-block
# bits -> (inputs per sub-block, zero code z, whether there are dmin and m)
KQUANT_KINDS = {4: (32, 0, True), 5: (32, 0, True), 6: (16, 32, False)}
KQUANT_NAMES = {4: "Q4_K", 5: "Q5_K", 6: "Q6_K"}


def kquant_layout(bits):
    """Byte offsets of the parts of one record (16 rows x 256 inputs) of a
    `bits`-bit K-quant weight: {"d", "dmin", "scales", "mins", "chunks"} (None
    where the kind lacks the part), "chunk" (bytes per chunk of 32 inputs: 256
    of nibbles, then 64 (Q5_K) or 128 (Q6_K) of high bits) and "record" (bytes)."""
    sub_block, _, has_mins = KQUANT_KINDS[bits]
    n_sub = QK_K // sub_block
    chunk = 16 * 32 * bits // 8
    at, end = {}, 0
    for part, size, present in (("d", 32, True), ("dmin", 32, has_mins), ("scales", 16 * n_sub, True),
                                ("mins", 16 * n_sub, has_mins), ("chunks", chunk * QK_K // 32, True)):
        at[part] = end if present else None
        end += size if present else 0
    at["chunk"], at["record"] = chunk, end
    return at


def pack_high_bits(high, hb):
    """The bits above the low nibble, (out_p, in) values below 2**hb (hb = 1 for Q5_K,
    2 for Q6_K) -> (out_p/16, in/(32/hb), 64) uint8.

    Tile m of a row block covers 32/hb inputs; row r owns bytes 4r..4r+3, and bits
    hb*t .. hb*t+hb-1 of byte 4r+e hold input (32/hb)*m + 4t + e. So for the nibble
    tile whose low nibbles are inputs i..i+3 (`pack_tiles`), the same 32-bit lane of
    the high tile has their top bits at the same byte positions: a shift and an `and`
    put them beside the nibbles."""
    n_p, k = high.shape
    per_tile = 32 // hb
    h = high.reshape(n_p // 16, 16, k // per_tile, 8 // hb, 4).astype(np.uint8)   # (b, r, m, t, e)
    h = h.transpose(0, 2, 1, 4, 3)                                                  # (b, m, r, e, t)
    shifts = (hb * np.arange(8 // hb)).astype(np.uint8)
    packed = np.bitwise_or.reduce(h << shifts, axis=-1)                             # (b, m, r, e)
    return np.ascontiguousarray(packed.reshape(n_p // 16, k // per_tile, TILE_BYTES))


def unpack_high_bits(tiles, hb):
    """Inverse of `pack_high_bits`."""
    nb, n_tiles, _ = tiles.shape
    t = tiles.reshape(nb, n_tiles, 16, 4, 1) >> (hb * np.arange(8 // hb)).astype(np.uint8)   # (b, m, r, e, t)
    t = t & np.uint8(2 ** hb - 1)
    return t.transpose(0, 2, 1, 4, 3).reshape(nb * 16, n_tiles * 32 // hb)


def _by_super_block(a, n_super):
    """(out_p, n_super * n) per-row values -> (out_p/16, n_super, n * 16): the 16 rows
    of value i of a super-block adjacent, then value i + 1."""
    n_p = a.shape[0]
    per = a.shape[1] // n_super
    a = a.reshape(n_p // 16, 16, n_super, per).transpose(0, 2, 3, 1)   # (b, s, i, r)
    return np.ascontiguousarray(a).reshape(n_p // 16, n_super, per * 16)


def _by_row_from_super_block(a, per):
    """Inverse of `_by_super_block` (per: values per super-block)."""
    nb, n_super, _ = a.shape
    return a.reshape(nb, n_super, per, 16).transpose(0, 3, 1, 2).reshape(nb * 16, n_super * per)


def pack_superblocks(codes, d, sub_scales, dmin, sub_mins, bits):
    """The records of a K-quant weight (`kquant_layout`): (out_p/16, in/256, record) uint8.

    codes (out, in) uint8 below 2**bits; d, dmin (out, in/256) float16 values;
    sub_scales, sub_mins (out, in/sub_block) uint8 below 64 (Q6_K: int8 sub_scales;
    dmin and sub_mins None). Rows are padded to a multiple of 16 with zeros (w = 0)."""
    sub_block, _, has_mins = KQUANT_KINDS[bits]
    n, k = codes.shape
    n_p, n_super = -(-n // TILE_ROWS) * TILE_ROWS, k // QK_K

    def padded(a, dtype):
        out = np.zeros((n_p, a.shape[1]), dtype)
        out[:n] = a
        return out

    at = kquant_layout(bits)
    records = np.zeros((n_p // 16, n_super, at["record"]), np.uint8)

    def put(part, values):   # values (b, s, bytes)
        records[:, :, at[part]: at[part] + values.shape[2]] = values

    put("d", _by_super_block(padded(d, np.float16), n_super).view(np.uint8))
    put("scales", _by_super_block(padded(sub_scales, np.uint8 if has_mins else np.int8), n_super).view(np.uint8))
    if has_mins:
        put("dmin", _by_super_block(padded(dmin, np.float16), n_super).view(np.uint8))
        put("mins", _by_super_block(padded(sub_mins, np.uint8), n_super))
    c = padded(codes, np.uint8)
    chunks = pack_tiles(c & np.uint8(15), 4).reshape(n_p // 16, n_super, QK_K // 32, 4 * TILE_BYTES)
    if bits > 4:
        high = pack_high_bits(c >> np.uint8(4), bits - 4).reshape(n_p // 16, n_super, QK_K // 32, -1)
        chunks = np.concatenate([chunks, high], axis=3)   # (b, s, chunk, nibbles | high bits)
    put("chunks", chunks.reshape(n_p // 16, n_super, -1))
    return records


def unpack_superblocks(records, bits):
    """Inverse of `pack_superblocks` (padded rows included): (codes, d, sub_scales,
    dmin, sub_mins), d and dmin as float32."""
    sub_block, _, has_mins = KQUANT_KINDS[bits]
    nb, n_super, _ = records.shape
    n_sub = QK_K // sub_block
    at = kquant_layout(bits)

    def part(name, size):
        return np.ascontiguousarray(records[:, :, at[name]: at[name] + size])

    def halves(name):
        return _by_row_from_super_block(part(name, 32).view(np.float16), 1).astype(np.float32)

    chunks = part("chunks", at["chunk"] * QK_K // 32).reshape(nb, n_super, QK_K // 32, at["chunk"])
    codes = unpack_tiles(np.ascontiguousarray(chunks[..., : 4 * TILE_BYTES]).reshape(nb, -1, TILE_BYTES), 4)
    if bits > 4:
        high = np.ascontiguousarray(chunks[..., 4 * TILE_BYTES:]).reshape(nb, -1, TILE_BYTES)
        codes = codes | (unpack_high_bits(high, bits - 4) << np.uint8(4))
    sc = _by_row_from_super_block(part("scales", 16 * n_sub), n_sub)
    if not has_mins:
        return codes, halves("d"), sc.view(np.int8), None, None
    return codes, halves("d"), sc, halves("dmin"), _by_row_from_super_block(part("mins", 16 * n_sub), n_sub)


def dequantize_kquant(codes, d, sub_scales, dmin, sub_mins, bits):
    """The weight every element represents, in float32, in this order:
    (d * sc) * (c - z), then minus dmin * m where the kind has mins."""
    sub_block, zero, has_mins = KQUANT_KINDS[bits]

    def per_element(a, size):
        return np.repeat(np.asarray(a, np.float32), size, axis=1)

    scale = per_element(d, QK_K) * per_element(sub_scales, sub_block)        # exact
    w = scale * (codes.astype(np.float32) - np.float32(zero))               # exact
    if has_mins:
        w = w - per_element(dmin, QK_K) * per_element(sub_mins, sub_block)  # one rounding
    return w


def kquant_activations(x, sub_block):
    """x (in,) float32 -> (xq int8 (in,), x_scale float32 (in/256,), bsums int32
    (in/sub_block,)): int8 activations with one scale per super-block (as llama.cpp's
    Q8_K: the integer sums of a whole super-block then share one float multiply),
    rounded as `quantize_activations` rounds, and the integer sum of xq over each
    sub-block (what the mins and Q6_K's zero code multiply)."""
    xq, x_scale, _ = quantize_activations(x, QK_K)
    bsums = xq.astype(np.int32).reshape(-1, sub_block).sum(axis=1).astype(np.int32)
    return xq, x_scale, bsums


def kquant_gemv(records, bits, x):
    """One token, in float64: the exact weights of the records times
    x_hat = x_scale * xq (`kquant_activations`); the kernels differ from this only
    by float32 roundings (one per super-block and row, plus the conversion of the
    integer sums)."""
    codes, d, sc, dmin, m = unpack_superblocks(records, bits)
    sub_block, zero, has_mins = KQUANT_KINDS[bits]
    rep = lambda a, size: np.repeat(np.asarray(a, np.float64), size, axis=1)  # noqa: E731
    w = rep(d, QK_K) * rep(sc, sub_block) * (codes.astype(np.float64) - zero)
    if has_mins:
        w = w - rep(dmin, QK_K) * rep(m, sub_block)
    xq, x_scale, _ = kquant_activations(x, sub_block)
    x_hat = np.repeat(x_scale.astype(np.float64), QK_K) * xq
    with np.errstate(invalid="ignore", over="ignore"):
        return w @ x_hat


def matmul_kquant(x, records, bits, shape):
    """x (T, in) -> (T, out): `kquant_gemv` for each token, padded rows dropped.
    Prefill and decode compute the same thing."""
    return np.stack([kquant_gemv(records, bits, row)[: shape[0]] for row in np.asarray(x, np.float32)])


def pair_activations(x):
    """x (T, in) -> (T, in_p), in_p = in rounded up to 32, zero-padded: each 32
    inputs as their 16 even ones, then their 16 odd ones (`bf16dot.py` widens
    a bf16 row's 32-bit words into its even and its odd weights)."""
    n_tok, n_in = x.shape
    padded = np.zeros((n_tok, -(-n_in // 32) * 32), np.float32)
    padded[:, :n_in] = x
    pairs = padded.reshape(n_tok, -1, 16, 2)                # (T, in_p/32, 16, [even, odd])
    return pairs.transpose(0, 1, 3, 2).reshape(n_tok, -1)   # (T, in_p/32 x [16 even, 16 odd])


# --- bf16 weights on AMX: activations split in two bf16 numbers ----------


def split_bf16(x):
    """x float32 -> (hi, lo) bf16 bits with hi = bf16(x), lo = bf16(x - hi):
    hi + lo holds x to 16 significant bits, |x - hi - lo| <= 2**-16 |x| (bf16 rounds to 8 significant bits: twice)."""
    hi = f32_to_bf16(x)
    lo = f32_to_bf16(x - bf16_to_f32(hi))
    return hi, lo


def matmul_bf16_split(x, w_bits):
    """What the AMX bf16 prefill computes, in float64: x (T, in) split into
    hi + lo, times widen(w_bits (out, in)).T; AMX's float32 sums differ from
    this by their rounding only (and flush subnormal operands to zero)."""
    hi, lo = split_bf16(x)
    xs = bf16_to_f32(hi).astype(np.float64) + bf16_to_f32(lo)
    return xs @ bf16_to_f32(w_bits).astype(np.float64).T


# --- bf16 activations times bf16 weights: vdpbf16ps (bf16pairs.py) --------

BF16_QUIET_NAN = 0x7FC0
F32_MIN_NORMAL = 2.0 ** -126


def bf16_activations(x):
    """float32 activations -> bf16 words, nearest-even (`f32_to_bf16`), a NaN kept a
    NaN (0x7FC0, as torch rounds one) instead of whatever the rounding makes of it."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.where(np.isnan(x), np.uint16(BF16_QUIET_NAN), f32_to_bf16(x)).astype(np.uint16)


def flush_denormals(v):
    """Numbers below float32's smallest normal (2**-126) in magnitude -> zero of the
    same sign: how vdpbf16ps reads its operands (DAZ) and writes its results (FTZ)."""
    return np.where(np.abs(v) < F32_MIN_NORMAL, np.copysign(0.0, v), v).astype(v.dtype)


def add_rounded_f32(acc, p):
    """acc (float32) + p (float64, exact) rounded once to float32, nearest-even: an FMA
    whose product is already exact. The float64 sum is made round-to-odd (its exact
    error from TwoSum; when inexact and even, step to the odd neighbour toward the
    exact sum), so rounding it to float32 is not a double rounding (53 >= 24 + 2 bits)."""
    a = acc.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        s = a + p
        back = s - a
        err = (a - (s - back)) + (p - back)   # a + p - s, exactly (Knuth's TwoSum)
        even = (s.view(np.int64) & 1) == 0
        odd = np.where((err != 0) & even & np.isfinite(s), np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return odd.astype(np.float32)


def dpbf16ps(acc, a, b):
    """One `vdpbf16ps` (Intel SDM, AVX512-BF16): acc (..., 16) float32, a and b (..., 32)
    bf16 words; per lane i, with operands below 2**-126 read as zero and results
    below it flushed to zero (signs kept), rounding to nearest-even, odd pair first:

        acc[i] = flush(acc[i] + a[2i+1] * b[2i+1])
        acc[i] = flush(acc[i] + a[2i] * b[2i])

    The products of two bf16 numbers are exact in float64 (8 + 8 significant bits)."""
    fa = flush_denormals(bf16_to_f32(a)).astype(np.float64)
    fb = flush_denormals(bf16_to_f32(b)).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        p = fa * fb                                                # (..., 32), exact or inf/NaN
    acc = flush_denormals(np.asarray(acc, np.float32))
    acc = flush_denormals(add_rounded_f32(acc, p[..., 1::2]))
    return flush_denormals(add_rounded_f32(acc, p[..., 0::2]))


def tree_sum_lanes(v):
    """v (..., 16) float32 -> (...,): halves added, then quarters, ... (8 + 8, 4 + 4,
    2 + 2, 1 + 1), in float32: the order of every lane-wise kernel's last sum."""
    while v.shape[-1] > 1:
        half = v.shape[-1] // 2
        v = v[..., :half] + v[..., half:]
    return v[..., 0]


def matmul_bf16_pairs(x, w_bits):
    """What `bf16pairs.py` computes: x (T, in) rounded to bf16 (`bf16_activations`),
    times w_bits (out, in) bf16, by `dpbf16ps` over each 32 inputs (zero-padded), the
    16 lanes then summed as a tree -> (T, out) float32."""
    xb = bf16_activations(x)
    n_tok, n_in = xb.shape
    n_p = -(-n_in // 32) * 32
    xp = np.zeros((n_tok, n_p), np.uint16)
    wp = np.zeros((w_bits.shape[0], n_p), np.uint16)
    xp[:, :n_in], wp[:, :n_in] = xb, w_bits
    acc = np.zeros((n_tok, w_bits.shape[0], 16), np.float32)
    for k in range(0, n_p, 32):
        acc = dpbf16ps(acc, xp[:, None, k:k + 32], wp[None, :, k:k + 32])
    return tree_sum_lanes(acc)


# --- loading-time conversions of 16-bit checkpoints (convert.py) ---------
#
# The kernels fill a buffer the caller passes and return how many values are NaN
# or inf; the twins return the converted array. `convert.widen_bf16`'s twin is
# `bf16_to_f32` above.


def widen_f16(bits):
    """IEEE half bits (uint16) -> float32, exact."""
    return np.asarray(bits).view(np.float16).astype(np.float32)


def f16_to_bf16(bits):
    """IEEE half bits (uint16) -> bf16 words, rounded to nearest even (exact
    widening first, so it is `f32_to_bf16` of the half's value)."""
    return f32_to_bf16(widen_f16(bits))


# --- attention over the KV cache (attention.py) --------------------------

CACHE_INT8_LEVELS = 127   # int8 cache codes in [-127, 127]


def quantize_cache_int8(x):
    """(KV, T, hd) float32 -> int8 codes and a scale per (head, position): x ~ q * s,
    s = max|x| / 127 over the head dimension, round to nearest (even): what
    `attention.store_int8_kernel` writes, bit for bit for finite rows."""
    scales = np.abs(x).max(axis=-1) / np.float32(CACHE_INT8_LEVELS)  # (KV, T)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.clip(np.rint(x / safe[..., None]), -CACHE_INT8_LEVELS, CACHE_INT8_LEVELS)
    return np.where(np.isnan(codes), 0, codes).astype(np.int8), scales.astype(np.float32)


def dequantize_cache(stored, scales):
    """Cache storage (KV, S, hd) -> float32: widen, times the per-position scale for int8."""
    x = stored.astype(np.float32)
    return x if scales is None else x * scales[..., None]


def store_cached(src, stored, scales, start):
    """`attention.store_cached` in NumPy: a converting slice assignment (int8 via
    `quantize_cache_int8`)."""
    end = start + src.shape[1]
    if stored.dtype == np.int8:
        stored[:, start:end], scales[:, start:end] = quantize_cache_int8(src)
    else:
        stored[:, start:end] = src  # rounds to nearest (even) for float16


def attend_cached(q, keys, values, key_scales, value_scales, allowed, scale):
    """`attention.attend_cached`, written plainly: widen the first S positions, repeat
    each kv head for its G query heads, mask, softmax, weighted values."""
    H = q.shape[0]
    KV, S = keys.shape[0], allowed.shape[1]
    k = dequantize_cache(keys[:, :S], None if key_scales is None else key_scales[:, :S])
    v = dequantize_cache(values[:, :S], None if value_scales is None else value_scales[:, :S])
    k, v = np.repeat(k, H // KV, axis=0), np.repeat(v, H // KV, axis=0)  # (H, S, hd)
    scores = np.where(allowed, (q @ k.transpose(0, 2, 1)) * np.float32(scale), -np.inf)  # (H, T, S)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    out = (probs @ v).astype(np.float32)  # (H, T, hd)
    out[:, ~allowed.any(axis=1)] = 0.0  # a query that sees no key: zeros, by convention
    return out


# --- block-sparse attention over the KV cache (blocksparse.py, Phi-3-small) ---


def attend_blocksparse(q, keys, values, key_scales, value_scales, positions, layout, first_block, block_size, scale):
    """`blocksparse.attend_blocksparse`, written plainly: expand the layout to a (H, T, S)
    token mask (each allowed block's keys, cut at the query), widen the cache, repeat
    each kv head for its query heads, masked softmax, weighted values."""
    H = q.shape[0]
    positions = np.asarray(positions)
    S = int(positions[-1]) + 1
    key_ids = np.arange(S)
    rows = layout[:, positions // block_size - first_block]  # (H, T, KB)
    allowed = rows[:, :, key_ids // block_size] & (key_ids[None, None, :] <= positions[None, :, None])  # (H, T, S)
    k = dequantize_cache(keys[:, :S], None if key_scales is None else key_scales[:, :S])
    v = dequantize_cache(values[:, :S], None if value_scales is None else value_scales[:, :S])
    k, v = np.repeat(k, H // keys.shape[0], axis=0), np.repeat(v, H // keys.shape[0], axis=0)  # (H, S, hd)
    scores = np.where(allowed, (q @ k.transpose(0, 2, 1)) * np.float32(scale), -np.inf)  # (H, T, S)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return ((e / e.sum(axis=-1, keepdims=True)) @ v).astype(np.float32)  # (H, T, hd)


# --- the non-GEMM parts of an encoder block (rowwise.py) -----------------

TINY = np.float32(np.finfo(np.float32).tiny)  # softmax weights below this are set to 0 (subnormals)


def layer_norm_rows(x, weight, bias, eps):
    """(T, D) -> (T, D): each row centred, divided by its standard deviation
    (sqrt(variance + eps)), times weight, plus bias."""
    centered = x - x.mean(axis=-1, keepdims=True)
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return (weight * (centered / np.sqrt(variance + np.float32(eps))) + bias).astype(np.float32)


def quick_gelu(h, bias):
    """z * sigmoid(1.702 z) with z = h + bias: CLIP's quick_gelu, the sigmoid written
    with tanh (sigmoid(a) = (1 + tanh(a / 2)) / 2) so no exp can overflow."""
    z = h + bias
    return (z * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.851) * z))).astype(np.float32)


def add_residual(x, y, bias):
    """x + (y + bias): a sublayer's output y, with its last bias, added to the
    residual stream x (`rowwise.add_residual_in_place` writes it into x)."""
    return (x + (y + bias)).astype(np.float32)


def softmax_rows(scores, scale):
    """softmax(scale * scores) along each row, weights below TINY set to 0."""
    scaled = scores * np.float32(scale)
    e = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    p = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    p[p < TINY] = 0.0
    return p


# --- the Conformer's strided convolutions (conv.py) ----------------------


def conv3x3_stride2(x, taps, bias, relu):
    """x (H, W, C or 1) channels-last, taps (9, C) in (dy, dx) order, bias (C,) ->
    (ceil(H/2), ceil(W/2), C): zero-pad one row and column on every side, then for
    each tap add the stride-2 view of the padded map that tap reads, times its weight
    (a single input channel is shared by every output channel); ReLU if asked."""
    H, W, _ = x.shape
    Ho, Wo = (H + 1) // 2, (W + 1) // 2
    padded = np.zeros((H + 2, W + 2, x.shape[2]), np.float32)
    padded[1:-1, 1:-1] = x
    out = np.zeros((Ho, Wo, taps.shape[1]), np.float32) + bias
    for dy in range(3):
        for dx in range(3):
            out = out + padded[dy : dy + 2 * Ho : 2, dx : dx + 2 * Wo : 2] * taps[3 * dy + dx]
    return np.maximum(out, np.float32(0.0)) if relu else out
