"""Attention over the KV cache: one Numba pass over the keys and values a query can see.

    out[h, t] = sum_j softmax_j(q[h, t] . k[j] * scale) v[j]   over the keys j with allowed[t, j]

`allowed` is the model's own (T, S) mask (`model.attention_mask`: causal, and
the last w positions with a sliding window; Phi-3-mini-4k: w = 2047), so what a
query sees is defined in one place, the same for this kernel and for the plain
definition (`model.plain_attention`).

Why a kernel. A decode step is one query per head against every cached key: a
matrix-vector product per head, memory-bound like the weight GEMVs. Done as NumPy
calls it is ~10 calls per layer, each over the whole cache, with the cache widened
to float32 first when it is stored in 16 bits. Here each kv head is one work
item: its keys are read once (scores of its G query heads), its values once
(the weighted sum), straight from the cache's own format, and only between the
first and the last key a query's mask row allows: keys before a sliding window
are never touched.

Storage formats (the cache's `dtype`), widened inside the loops:

    float32  4 bytes/value   the verified path (logits within 1e-4 of transformers)
    float16  2 bytes/value   IEEE half, 11 significant bits; what llama.cpp keeps
    int8     1 byte/value    + one float32 scale per (kv head, position), x = q * s

Numba takes no float16 arrays, so float16 values arrive as their uint16 bit
patterns and `scalars.widen` widens them (`vcvtph2ps` on x86 with F16C).

`exp` is a polynomial (`exp_nonpositive`): Numba calls libm's scalar `expf`
otherwise, and at 2k positions x 32 heads x 32 layers a token that is ~2 M
calls. The plain-NumPy twins, the specification, are `reference.attend_cached` and
`reference.store_cached`; tests/test_attention_kernel.py holds them equal.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import reference as ref
from .scalars import bits_to_f32, f32_to_half_bits, widen
from .simd import array_args, emit_prefetch

# Below this many multiply-adds (query heads x queries x keys x head dim, ~20 us
# on one core) the kernel runs on the calling thread: waking the other threads
# costs more than it saves, and when the matmuls around it run in another thread
# pool (OpenBLAS, for float32 weights), each pool's threads spin after their
# work and the other's wait for a core: measured 1-11 ms a call on 2 busy cores.
PARALLEL_WORK = 1 << 16
# How far ahead of the row being read to ask for memory. The hardware prefetcher
# alone leaves one thread short of its streaming rate (as for the int4 GEMV,
# docs/kernels.md); a few KB ahead is a few microseconds of work.
PREFETCH_BYTES = 4096
# Queries handled by one work item in a prefill (they share the item's pass over
# its kv head's keys, which stay in L2). Decode (T = 1) is one item per kv head.
QUERY_TILE = 16
# The softmax's smallest kept weight. exp(x) for x below log(tiny) is set to 0,
# like `model.softmax`: subnormal weights change no result but make the value
# sum ~60x slower on x86.
TINY = np.float32(np.finfo(np.float32).tiny)
EXP_CUTOFF = np.float32(-87.33654)  # log(TINY)
# LLVM may reorder sums and fuse multiply-adds, but not assume "no NaN, no inf":
# masked keys are -inf, and a NaN from a damaged weight must reach the logits.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


# ---------------------------------------------------------------- scalar helpers


@intrinsic
def prefetch(typingctx, array, byte_offset):
    """Ask the memory system for the cache line `byte_offset` bytes into `array`'s data
    (LLVM's prefetch: a hint, never a fault, even past the end)."""
    sig = types.void(array, byte_offset)

    def codegen(context, builder, signature, args):
        data = array_args(context, builder, signature, args)[0].data
        emit_prefetch(builder, builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]]))
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def prefetch_rows(array, kv, j, n_rows):
    """Prefetch rows [j + AHEAD, j + AHEAD + n_rows) of array[kv] (one hint per cache line)."""
    row_bytes = array.shape[2] * array.itemsize
    start = ((kv * array.shape[1] + j) * array.shape[2]) * array.itemsize + PREFETCH_BYTES
    for b in range(0, n_rows * row_bytes, 64):
        prefetch(array, start + b)


@njit(inline="always")
def exp_nonpositive(x):
    """exp(x) for x <= 0 in float32, 0 below EXP_CUTOFF (and for -inf), NaN for NaN.

    Cephes' expf: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
    polynomial, 2^n by writing the exponent bits. Within 2 ulp of libm; written
    without calls or branches so the softmax loop vectorises.
    """
    xc = EXP_CUTOFF if x <= EXP_CUTOFF else x  # a NaN stays NaN and poisons the sum, as in NumPy
    n = np.floor(xc * np.float32(1.44269504) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    e = (p * r * r + r + np.float32(1.0)) * bits_to_f32((np.int32(n) + np.int32(127)) << 23)
    return np.float32(0.0) if x <= EXP_CUTOFF else e


@njit(inline="always")
def span(allowed_row):
    """[lo, hi): from the first to the last key this mask row allows (0, 0 if none)."""
    lo = 0
    while lo < allowed_row.size and not allowed_row[lo]:
        lo += 1
    hi = allowed_row.size
    while hi > lo and not allowed_row[hi - 1]:
        hi -= 1
    return lo, hi


# ---------------------------------------------------------------- the kernel


@njit(inline="always")
def scores_of(qrow, keys, key_scales, kv, lo, hi, scale, dest):
    """dest[j - lo] = qrow . key j * scale for keys j in [lo, hi), four keys per step
    so each load of the query feeds four dot products."""
    scaled = key_scales.shape[1] > 0
    hd = qrow.size
    j = lo
    while j + 4 <= hi:
        prefetch_rows(keys, kv, j, 4)
        k0, k1, k2, k3 = keys[kv, j], keys[kv, j + 1], keys[kv, j + 2], keys[kv, j + 3]
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for d in range(hd):
            x = qrow[d]
            a0 += x * widen(k0[d])
            a1 += x * widen(k1[d])
            a2 += x * widen(k2[d])
            a3 += x * widen(k3[d])
        if scaled:
            a0, a1 = a0 * key_scales[kv, j], a1 * key_scales[kv, j + 1]
            a2, a3 = a2 * key_scales[kv, j + 2], a3 * key_scales[kv, j + 3]
        dest[j - lo], dest[j + 1 - lo], dest[j + 2 - lo], dest[j + 3 - lo] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        j += 4
    while j < hi:
        k0 = keys[kv, j]
        a0 = np.float32(0.0)
        for d in range(hd):
            a0 += qrow[d] * widen(k0[d])
        dest[j - lo] = a0 * (key_scales[kv, j] * scale if scaled else scale)
        j += 1


@njit(inline="always")
def softmax_in_place(x):
    """x <- softmax(x), weights below TINY set to 0. NaN anywhere gives NaN everywhere,
    as NumPy's softmax does, so a damaged weight is found downstream, not hidden."""
    top = np.float32(-np.inf)
    for j in range(x.size):
        top = max(top, x[j])
    total = np.float32(0.0)
    for j in range(x.size):
        e = exp_nonpositive(x[j] - top)
        x[j] = e
        total += e
    inv = np.float32(1.0) / total
    for j in range(x.size):
        p = x[j] * inv
        x[j] = np.float32(0.0) if p < TINY else p  # NaN stays NaN


@njit(inline="always")
def weighted_values(probs, values, value_scales, kv, lo, hi, acc):
    """acc = sum over keys j in [lo, hi) of probs[j - lo] * value j, four values per
    step so acc is loaded and stored once per four."""
    scaled = value_scales.shape[1] > 0
    hd = acc.size
    for d in range(hd):
        acc[d] = 0.0
    j = lo
    while j + 4 <= hi:
        p0, p1, p2, p3 = probs[j - lo], probs[j + 1 - lo], probs[j + 2 - lo], probs[j + 3 - lo]
        if scaled:
            p0, p1 = p0 * value_scales[kv, j], p1 * value_scales[kv, j + 1]
            p2, p3 = p2 * value_scales[kv, j + 2], p3 * value_scales[kv, j + 3]
        prefetch_rows(values, kv, j, 4)
        v0, v1, v2, v3 = values[kv, j], values[kv, j + 1], values[kv, j + 2], values[kv, j + 3]
        for d in range(hd):
            acc[d] += p0 * widen(v0[d]) + p1 * widen(v1[d]) + p2 * widen(v2[d]) + p3 * widen(v3[d])
        j += 4
    while j < hi:
        p0 = probs[j - lo] * (value_scales[kv, j] if scaled else np.float32(1.0))
        v0 = values[kv, j]
        for d in range(hd):
            acc[d] += p0 * widen(v0[d])
        j += 1


@njit(inline="always")
def attend_item(q, keys, values, key_scales, value_scales, allowed, scale, out, item):
    """Work item `item` = (kv head, tile of QUERY_TILE queries): its G query heads x
    tile queries run one after the other over the same keys, which stay in L2."""
    T = q.shape[1]
    G = q.shape[0] // keys.shape[0]
    n_tiles = (T + QUERY_TILE - 1) // QUERY_TILE
    kv, t0 = item // n_tiles, (item % n_tiles) * QUERY_TILE
    probs = np.empty(allowed.shape[1], np.float32)
    for t in range(t0, min(T, t0 + QUERY_TILE)):
        lo, hi = span(allowed[t])
        row, mask = probs[: hi - lo], allowed[t, lo:hi]
        for h in range(kv * G, kv * G + G):
            if hi == lo:  # the mask allows no key: nothing to average
                out[h, t] = 0.0
                continue
            scores_of(q[h, t], keys, key_scales, kv, lo, hi, scale, row)
            for j in range(row.size):  # holes inside the span (none in causal or window masks)
                if not mask[j]:
                    row[j] = -np.inf
            softmax_in_place(row)
            weighted_values(row, values, value_scales, kv, lo, hi, out[h, t])


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def attend_cached_kernel(q, keys, values, key_scales, value_scales, allowed, scale, out):
    """out (H, T, hd) = attention of q (H, T, hd) over keys/values (KV, capacity, hd)
    of one layer where allowed (T, S) says; key/value_scales (KV, capacity) float32
    for int8 storage, (0, 0) otherwise. Every query row must allow some key.
    Work items (`attend_item`) are shared among the threads."""
    n_items = keys.shape[0] * ((q.shape[1] + QUERY_TILE - 1) // QUERY_TILE)
    for item in prange(n_items):
        attend_item(q, keys, values, key_scales, value_scales, allowed, scale, out, item)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def attend_cached_serial(q, keys, values, key_scales, value_scales, allowed, scale, out):
    """`attend_cached_kernel` on the calling thread, for work too small to share. A
    second entry point because Numba fixes `parallel=True` per compiled function;
    both run the same `attend_item`."""
    n_items = keys.shape[0] * ((q.shape[1] + QUERY_TILE - 1) // QUERY_TILE)
    for item in range(n_items):
        attend_item(q, keys, values, key_scales, value_scales, allowed, scale, out, item)


NO_SCALES = np.zeros((0, 0), np.float32)  # what the kernel gets for "no scales" (shape[1] == 0)


def kernel_arrays(keys, values, key_scales, value_scales):
    """The storage as the kernel takes it: float16 as uint16 bits, absent scales as (0, 0)."""
    if keys.dtype == np.float16:
        keys, values = keys.view(np.uint16), values.view(np.uint16)
    if key_scales is None:
        key_scales = value_scales = NO_SCALES
    return keys, values, key_scales, value_scales


def attend_cached(q, keys, values, key_scales, value_scales, allowed, scale):
    """Attention of q (H, T, hd) float32 over one layer's cache keys/values
    (KV, capacity, hd) in float32, float16 or int8 (with key/value_scales
    (KV, capacity) float32 for int8, else None), query t reading the keys j with
    allowed[t, j] (T, S), S <= capacity. -> (H, T, hd) float32; a query whose row
    allows no key gets zeros (the model's masks always allow the query's own key)."""
    H, T, hd = q.shape
    if allowed.shape[0] != T or allowed.shape[1] > keys.shape[1]:
        raise ValueError(f"attend_cached: mask {allowed.shape} for {T} queries and {keys.shape[1]} cached positions")
    if H % keys.shape[0]:
        raise ValueError(f"attend_cached: {H} query heads do not share {keys.shape[0]} kv heads evenly")
    out = np.empty((H, T, hd), np.float32)
    k, v, ks, vs = kernel_arrays(keys, values, key_scales, value_scales)
    kernel = attend_cached_kernel if H * T * allowed.shape[1] * hd >= PARALLEL_WORK else attend_cached_serial
    kernel(np.ascontiguousarray(q, dtype=np.float32), k, v, ks, vs,
           np.ascontiguousarray(allowed, dtype=np.bool_), np.float32(scale), out)
    return out


# ---------------------------------------------------------------- writing the cache


def narrow(x, dst):
    """float32 `x` as an element of the array `dst` (typed per storage format below)."""


@overload(narrow, inline="always")
def _narrow(x, dst):
    if dst.dtype == types.uint16:  # float16 bits
        return lambda x, dst: f32_to_half_bits(x)
    if dst.dtype == types.float32:
        return lambda x, dst: x
    return None


@njit(cache=True)
def store_float_kernel(src, dst, start):
    """dst[:, start:start+T] = src (KV, T, hd) float32, rounded to dst's format
    (float32, or float16 as uint16 bits)."""
    KV, T, hd = src.shape
    for h in range(KV):
        for t in range(T):
            for d in range(hd):
                dst[h, start + t, d] = narrow(src[h, t, d], dst)


@njit(cache=True, error_model="numpy")
def store_int8_kernel(src, dst, scales, start):
    """dst[:, start:start+T] = int8 codes of src (KV, T, hd), scales[:, start:start+T]
    = their row scales, exactly as `reference.quantize_cache_int8`. A row holding NaN gets a NaN
    scale (and zero codes), so the NaN reaches the attention output."""
    KV, T, hd = src.shape
    levels = ref.CACHE_INT8_LEVELS
    for h in range(KV):
        for t in range(T):
            amax = np.float32(0.0)
            nan = False
            for d in range(hd):
                a = abs(src[h, t, d])
                nan |= a != a
                amax = max(amax, a)
            scale = np.float32(np.nan) if nan else amax / np.float32(levels)
            safe = scale if scale > 0 else np.float32(1.0)
            for d in range(hd):
                q = np.rint(src[h, t, d] / safe)
                dst[h, start + t, d] = 0 if nan else np.int8(min(max(q, -levels), levels))
            scales[h, start + t] = scale


def store_cached(src, stored, scales, start):
    """Write src (KV, T, hd) float32 into one layer's keys or values `stored`
    (KV, capacity, hd: float32, float16, or int8 with `scales` (KV, capacity)) at
    positions [start, start + T). One compiled loop: NumPy's strided, converting
    assignment costs ~25 us a call for a decode step's 3072 values."""
    if start + src.shape[1] > stored.shape[1]:
        raise ValueError(f"store_cached: positions up to {start + src.shape[1]}, capacity {stored.shape[1]}")
    src = np.ascontiguousarray(src, dtype=np.float32)
    if stored.dtype == np.int8:
        store_int8_kernel(src, stored, scales, start)
    else:
        store_float_kernel(src, stored.view(np.uint16) if stored.dtype == np.float16 else stored, start)
