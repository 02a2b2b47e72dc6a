"""The default int4 quantizer in one pass per 16-row block: scale search and codes.

`Int4Weight(w)` (symmetric, the default) used to make three passes over the whole
matrix: the group scales (one weight at a time, to find the largest), the scale
search (`packed.search_scales`), and the codes (`packed.quantize_codes`, each code
or-ed into its byte). About 16 ns per weight per thread, 33 s for Phi-3-mini on 2
threads (issue 21's goal: 10 s). Here one work item takes one 16-row block and,
for each row's groups in turn, while the group is in L1:

    scan    the group's words as integers: the largest |w| (the bits of a positive
            float order as the float does), whether the largest is positive or
            negative, and how many values are NaN, inf or >= 2**127
    search  `reference.search_scales`: three candidate scales, their codes' exact
            fixed-point sums (`packed._code_sums`), the least-squares refit
    codes   c = clip(round(w / d), -8, 7) + 8 into a row of bytes, then packed
            two nibbles a byte into the block's 32-bit lanes (a 16-row block of
            tiles is 16 x in/2 bytes: it stays in L2 while it is written)

Every step runs on contiguous vectors, so LLVM vectorises the scans and the sums;
the arithmetic is the twin's (`reference.quantize_int4_symmetric`), in the same
order, bit for bit. The scales need no second rounding either: the search rounds
each to float16 where that is a normal float16 number, so whatever
`reference.store_scales` keeps (float16 when all fit, float32 otherwise) holds
exactly these values, and `store_scales` below only moves bits (NumPy's version,
a mask, a min, a max and a float16 cast on one thread, took 2 s of Phi-3-mini's
12.7).
"""

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic, overload

from . import reference as ref
from .scalars import bf16_to_f32, bits_to_f32, bits_to_f64, f32_to_bits, half_to_f32
from .simd import array_args, check_arrays, index_helpers

MAGNITUDE = np.uint32(0x7FFFFFFF)
UNQUANTIZABLE = np.uint32(0x7F000000)  # the bits of 2**127: |w| at or above it (inf, NaN) is refused


@njit(inline="always")
def round_f16(d):
    """`reference.round_f16` for one float32: nearest float16 (ties to even) when
    |d| is a normal float16 number, else d. Bit arithmetic: drop 13 of the 23
    mantissa bits, rounding to nearest even. Written without a branch, so that a
    loop over many groups' scales vectorises."""
    mag = abs(d)
    bits = f32_to_bits(d)
    rounded = bits_to_f32((bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000))
    return rounded if (mag >= ref.FP16_MIN_NORMAL and mag <= ref.FP16_MAX) else d


@njit(inline="always")
def not_underflowed(d, nonzero):
    """d, or the smallest float32 of d's sign where d underflowed to 0 from a nonzero value."""
    smallest = np.float32(ref.SMALLEST) if f32_to_bits(d) >> np.uint32(31) == 0 else -np.float32(ref.SMALLEST)
    return smallest if (d == 0 and nonzero) else d


def as_float32(v, half):
    """A checkpoint value as float32: float32 as it is, a uint16 word as a float16
    (half = True) or a bf16 (half = False): typed per dtype by the overload below."""


@overload(as_float32, inline="always")
def _as_float32(v, half):
    if v == types.uint16:
        return lambda v, half: half_to_f32(v) if half else bf16_to_f32(v)
    if v == types.float32:
        return lambda v, half: v
    return None


@intrinsic
def transpose16(typingctx, src, row0, col0, half, dst, drow0, dcol0):
    """dst[drow0 + j, dcol0 + i] = src[row0 + i, col0 + j] as float32, i, j < 16: one
    16 x 16 block in sixteen vector loads, 64 two-input shuffles and sixteen stores.
    src is float32, or uint16 words of float16 (half) or bf16; both C-contiguous 2-D.
    The shuffles swap the off-diagonal h x h sub-blocks of every 2h x 2h block for
    h = 8, 4, 2, 1, which is the transpose. (Numba's own loop for this read one
    value at a time from 16 rows: 3 cycles a value, a third of the quantizer.)"""
    check_arrays("transpose16", [(src, (types.float32, types.uint16), 2), (dst, types.float32, 2)])
    sig = types.void(src, types.intp, types.intp, types.boolean, dst, types.intp, types.intp)
    widen_words = src.dtype == types.uint16

    def codegen(context, builder, signature, args):
        source, _, _, _, target, _, _ = array_args(context, builder, signature, args)
        _, const, dim = index_helpers(context, builder)
        f32, i16, i32 = ir.FloatType(), ir.IntType(16), ir.IntType(32)
        v16f, v16w = ir.VectorType(f32, 16), ir.VectorType(i16, 16)
        rows = []
        for i in range(16):
            at = builder.add(builder.mul(builder.add(args[1], const(i)), dim(source, 1)), args[2])
            pointer = builder.gep(source.data, [at])
            if not widen_words:
                rows.append(builder.load(builder.bitcast(pointer, v16f.as_pointer()), align=4))
                continue
            words = builder.load(builder.bitcast(pointer, v16w.as_pointer()), align=2)
            as_half = builder.fpext(builder.bitcast(words, ir.VectorType(ir.HalfType(), 16)), v16f)
            as_bf16 = builder.bitcast(builder.shl(builder.zext(words, ir.VectorType(i32, 16)),
                                                  ir.Constant(ir.VectorType(i32, 16), [16] * 16)), v16f)
            rows.append(builder.select(args[3], as_half, as_bf16))
        for h in (8, 4, 2, 1):
            low = [p if not p & h else 16 + p - h for p in range(16)]
            high = [p + h if not p & h else 16 + p for p in range(16)]
            for i in range(16):
                if i & h:
                    continue
                a, b = rows[i], rows[i + h]
                rows[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 16), low))
                rows[i + h] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 16), high))
        for j in range(16):
            at = builder.add(builder.mul(builder.add(args[5], const(j)), dim(target, 1)), args[6])
            builder.store(rows[j], builder.bitcast(builder.gep(target.data, [at]), v16f.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def frexp_exponent(magnitude):
    """math.frexp(x)[1] for the float32 x >= 0 with these bits (x < 2**e, e = 0 for 0),
    in integer arithmetic: subnormals are first scaled by 2**64 into the normal range."""
    field = np.int32(magnitude >> np.uint32(23))
    tiny = field == 0
    scaled = f32_to_bits(bits_to_f32(magnitude) * (np.float32(2.0**64) if tiny else np.float32(1.0)))
    e = np.int32(scaled >> np.uint32(23)) - 126 - (64 if tiny else 0)
    return e if magnitude != 0 else np.int32(0)


@njit(inline="always")
def power_of_two(e):
    """2.0**e as a float64, for -1022 <= e <= 1023."""
    return bits_to_f64(np.int64(e + 1023) << np.int64(52))


@njit(inline="always")
def int4_code(v, safe, keep):
    """clip(round(v / d), -8, 7) + 8, with safe = d or 1 and keep = 0 where d = 0."""
    q = keep * min(max(np.floor(v / safe + np.float32(0.5)), np.float32(-8.0)), np.float32(7.0))
    return np.uint32(np.int32(q) + 8)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_int4_symmetric(w, half, group_size, candidates, d, lanes, items):
    """Scales into d (out/16, groups * 16) float32, the 16 rows of a group side by side
    (`reference.by_block`'s order), and codes into `lanes` (out/16, in/8, 16) uint32,
    the tiles of `reference.pack_tiles` seen as 32-bit lanes (row r's four bytes of a
    tile are lane r); w (out, in) float32, or uint16 words of float16 (half = True) or
    bf16 values, widened as they are read (a 16-bit checkpoint needs no float32 copy),
    padded to whole blocks and groups. Returns how many values are NaN, inf or beyond
    +-2**127 (then nothing written means anything).

    Each block is first transposed to (G, groups x 16): one column per (group, row),
    so that every step below is a loop over columns, which LLVM vectorises, and the
    per-group arithmetic of the search runs on vectors of groups, not one at a time."""
    n_blocks, _, _ = lanes.shape
    n_cols = d.shape[1]
    groups = n_cols // 16
    G = group_size
    # `items` work items (a few per thread), each a run of blocks with buffers of its
    # own, allocated once per call (allocated per block, the OS zeroed gigabytes)
    items = max(1, min(n_blocks, items))
    wt_all = np.empty((items, G, n_cols), np.float32)
    fixed_all = np.empty((items, G, n_cols))
    f64 = np.empty((items, 5, n_cols))  # per column: unit, steps, wq, qq, best_e
    f32 = np.empty((items, 5, n_cols), np.float32)  # per column: extreme, d0, safe, keep, best_d
    tops = np.empty((items, 2, n_cols), np.uint32)
    bad = 0
    for item in prange(items):
        wt, fixed = wt_all[item], fixed_all[item]
        unit, steps, wq, qq, best_e = f64[item, 0], f64[item, 1], f64[item, 2], f64[item, 3], f64[item, 4]
        extreme, d0, safe, keep, best_d = f32[item, 0], f32[item, 1], f32[item, 2], f32[item, 3], f32[item, 4]
        top_pos, top_neg = tops[item, 0], tops[item, 1]
        item_bad = 0
        for b in range(item * n_blocks // items, (item + 1) * n_blocks // items):
            for g in range(groups):  # the transpose: column g * 16 + r holds row r's group g
                if G % 16 == 0:
                    for k in range(0, G, 16):
                        transpose16(w, 16 * b, g * G + k, half, wt, k, g * 16)
                    continue
                for k in range(G):
                    for r in range(16):
                        wt[k, g * 16 + r] = as_float32(w[16 * b + r, g * G + k], half)
            # scan: the largest magnitude among the positive and among the negative
            # values of each column (the bits of a float >= 0 order as the float does)
            top_pos[:] = 0
            top_neg[:] = 0
            for k in range(G):
                for c in range(n_cols):
                    bits = f32_to_bits(wt[k, c])
                    magnitude = bits & MAGNITUDE
                    item_bad += magnitude >= UNQUANTIZABLE
                    top_pos[c] = max(top_pos[c], magnitude if bits == magnitude else np.uint32(0))
                    top_neg[c] = max(top_neg[c], magnitude if bits != magnitude else np.uint32(0))
            for c in range(n_cols):  # the extreme, np.abs(g).argmax's: the first of equal magnitudes
                top = max(top_pos[c], top_neg[c])
                extreme[c] = bits_to_f32(top) if top_pos[c] > top_neg[c] else -bits_to_f32(top)
                e = frexp_exponent(top) - ref.FIXED_POINT_BITS
                unit[c] = power_of_two(e)  # the value of one fixed-point step
                steps[c] = power_of_two(-e)  # 1 / unit, exactly
            for c in range(n_cols):  # +m and -m both, or a zero group: the first one wins
                if top_pos[c] == top_neg[c]:
                    for k in range(G):
                        if f32_to_bits(wt[k, c]) & MAGNITUDE == top_pos[c]:
                            extreme[c] = wt[k, c]
                            break
            for k in range(G):  # w in fixed point: integers, so the sums below are exact
                for c in range(n_cols):
                    fixed[k, c] = np.floor(np.float64(wt[k, c]) * steps[c] + 0.5)
            # the search (`reference.search_scales`): each candidate's codes, their
            # exact sums, the least-squares refit, the smallest error kept
            for i in range(candidates.size):
                for c in range(n_cols):
                    s = round_f16(not_underflowed(extreme[c] / candidates[i], extreme[c] != 0))
                    d0[c] = s
                    safe[c] = s if s != 0 else np.float32(1.0)
                    keep[c] = np.float32(1.0) if s != 0 else np.float32(0.0)
                    wq[c] = 0.0
                    qq[c] = 0.0
                for k in range(G):
                    for c in range(n_cols):
                        q = np.float64(keep[c] * min(max(np.floor(wt[k, c] / safe[c] + np.float32(0.5)),
                                                          np.float32(-8.0)), np.float32(7.0)))
                        wq[c] += q * fixed[k, c]
                        qq[c] += q * q
                for c in range(n_cols):
                    sum_wq = wq[c] * unit[c]
                    fit = round_f16(not_underflowed(np.float32(sum_wq / max(qq[c], 1.0)), extreme[c] != 0))
                    s = fit if qq[c] > 0 else d0[c]
                    s64 = np.float64(s)
                    err = s64 * s64 * qq[c] - 2 * s64 * sum_wq
                    better = i == 0 or err < best_e[c]
                    best_d[c] = s if better else best_d[c]
                    best_e[c] = err if better else best_e[c]
            for c in range(n_cols):
                d[b, c] = best_d[c]
                safe[c] = best_d[c] if best_d[c] != 0 else np.float32(1.0)
                keep[c] = np.float32(1.0) if best_d[c] != 0 else np.float32(0.0)
            # the codes, two nibbles a byte, four bytes a lane: tile j of the row block
            # holds inputs 8j..8j+7, lane r = row r (`reference.pack_tiles`)
            for g in range(groups):
                for j in range(G // 8):
                    for r in range(16):
                        c = g * 16 + r
                        word = np.uint32(0)
                        for e in range(4):
                            low = int4_code(wt[8 * j + e, c], safe[c], keep[c])
                            high = int4_code(wt[8 * j + 4 + e, c], safe[c], keep[c])
                            word |= (low | (high << np.uint32(4))) << np.uint32(8 * e)
                        lanes[b, g * (G // 8) + j, r] = word
        bad += item_bad
    return bad


F16_LOWEST_BITS = np.uint32(0x38800000)   # the bits of 2**-14, float16's smallest normal
F16_HIGHEST_BITS = np.uint32(0x477FE000)  # the bits of 65504, float16's largest


@njit(parallel=True, cache=True)
def float16_bits(d, out):
    """out = the float16 bits of d's float32 values, each of which is 0 or a normal
    float16 number already (the search rounded it): the exponent rebased from 127 to
    15 and the 10 leading mantissa bits kept, the sign as it is. Returns how many
    nonzero values are not normal float16 numbers (then `out` means nothing)."""
    src, dst = d.reshape(-1), out.reshape(-1)
    outside = 0
    for i in prange(src.size):
        bits = f32_to_bits(src[i])
        magnitude = bits & MAGNITUDE
        sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
        outside += magnitude != 0 and (magnitude < F16_LOWEST_BITS or magnitude > F16_HIGHEST_BITS)
        half = (magnitude >> np.uint32(13)) - np.uint32(112 << 10) if magnitude != 0 else np.uint32(0)
        dst[i] = np.uint16(sign | half)
    return outside


def store_scales(d):
    """`reference.store_scales(d, round_up=False)` for the search's scales, in one
    parallel pass: float16 when every nonzero one is a normal float16, else d itself."""
    bits = np.empty(d.shape, np.uint16)
    return d if float16_bits(d, bits) else bits.view(np.float16)


def quantize_symmetric(w, group_size):
    """(bad values, tiles (out_p/16, in_p/8, 64) uint8, scales (out_p/16, groups, 16)
    float16|float32) of the default int4 (`reference.quantize_int4(w, G, True)` of w
    widened to float32), w (out, in) float32, float16 or uint16 bf16 words, read as it
    is (a memory-mapped checkpoint tensor too): padded (a copy) only where the shape
    needs it."""
    w = np.asarray(w)
    half = w.dtype == np.float16
    w = np.ascontiguousarray(w.view(np.uint16) if half else w)
    if w.dtype not in (np.uint16, np.float32):
        w = w.astype(np.float32)
    n_p, k_p = ref.padded_shape(w.shape, group_size)
    if w.shape != (n_p, k_p):
        w = np.pad(w, ((0, n_p - w.shape[0]), (0, k_p - w.shape[1])))
    d = np.empty((n_p // 16, k_p // group_size * 16), np.float32)
    tiles = np.empty((n_p // 16, k_p // ref.TILE_INPUTS[4], ref.TILE_BYTES), np.uint8)
    bad = quantize_int4_symmetric(w, half, group_size, np.array(ref.SCALE_CANDIDATES, np.float32), d,
                                  tiles.view(np.uint32), 4 * get_num_threads())
    return bad, tiles, store_scales(d.reshape(n_p // 16, -1, 16))
