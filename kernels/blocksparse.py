"""Block-sparse attention over the KV cache (Phi-3-small): only the blocks a head may read.

    out[h, t] = sum_j softmax_j(q[h, t] . k[j] * scale) v[j]
                over keys j <= pos[t] whose block j // B the layout allows for (h, pos[t] // B)

`layout` is minislm.blocksparse's (H, n, KB) pattern for the query blocks this forward
touches (first .. first + n - 1). A block the pattern excludes is skipped, not masked:
its keys and values are never read. At Phi-3-small's real settings, a decode step at
position 8000 reads 1793 to 1857 of the 8001 cached keys (by head: 16 local blocks and
13 or 14 vertical ones), 23%, in every sparse layer.

Queries of one head differ in which blocks they read, and heads of one kv group
differ too (the pattern shifts per head), so a work item is one query head and a
tile of queries, not a kv head as in kernels/attention.py, whose scalar helpers
(`scores_of`, `softmax_in_place`; `widen` from scalars.py) and storage formats
(float32, float16 bits, int8 with per-position scales) this kernel shares.

`reference.attend_blocksparse` is the plain-NumPy twin, the specification:
tests/test_blocksparse.py holds them equal.
"""

import numpy as np
from numba import njit, prange

from .attention import FASTMATH, PARALLEL_WORK, QUERY_TILE, kernel_arrays, scores_of, softmax_in_place
from .scalars import widen


@njit(inline="always")
def attend_row(qrow, keys, values, key_scales, value_scales, kv, row, position, block_size, scale, scores, out_row):
    """One query (at `position`) of one head: scores over the keys of the allowed blocks
    in `row` (KB,) (cut at the query itself), softmax, the weighted sum of their values."""
    n = 0
    for kb in range(position // block_size + 1):
        if not row[kb]:
            continue  # excluded by the pattern: neither its keys nor its values are read
        lo = kb * block_size
        hi = min(lo + block_size, position + 1)
        scores_of(qrow, keys, key_scales, kv, lo, hi, scale, scores[n : n + hi - lo])
        n += hi - lo
    probs = scores[:n]
    softmax_in_place(probs)
    scaled = value_scales.shape[1] > 0
    for d in range(out_row.size):
        out_row[d] = 0.0
    n = 0
    for kb in range(position // block_size + 1):
        if not row[kb]:
            continue
        lo = kb * block_size
        hi = min(lo + block_size, position + 1)
        for j in range(lo, hi):
            p = probs[n + j - lo] * (value_scales[kv, j] if scaled else np.float32(1.0))
            v = values[kv, j]
            for d in range(out_row.size):
                out_row[d] += p * widen(v[d])
        n += hi - lo


@njit(inline="always")
def attend_item(q, keys, values, key_scales, value_scales, positions, layout, first_block, block_size, scale, out, item):
    """Work item `item` = (query head, tile of QUERY_TILE queries)."""
    H, T, _ = q.shape
    G = H // keys.shape[0]
    n_tiles = (T + QUERY_TILE - 1) // QUERY_TILE
    h, t0 = item // n_tiles, (item % n_tiles) * QUERY_TILE
    scores = np.empty(positions[min(T, t0 + QUERY_TILE) - 1] + 1, np.float32)
    for t in range(t0, min(T, t0 + QUERY_TILE)):
        row = layout[h, positions[t] // block_size - first_block]
        attend_row(q[h, t], keys, values, key_scales, value_scales, h // G, row, positions[t], block_size, scale,
                   scores, out[h, t])


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def attend_blocksparse_kernel(q, keys, values, key_scales, value_scales, positions, layout, first_block, block_size,
                              scale, out):
    """out (H, T, hd): every (head, query tile) work item, shared among the threads."""
    n_items = q.shape[0] * ((q.shape[1] + QUERY_TILE - 1) // QUERY_TILE)
    for item in prange(n_items):
        attend_item(q, keys, values, key_scales, value_scales, positions, layout, first_block, block_size, scale, out, item)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def attend_blocksparse_serial(q, keys, values, key_scales, value_scales, positions, layout, first_block, block_size,
                              scale, out):
    """`attend_blocksparse_kernel` on the calling thread, for work too small to share (a
    second entry point: Numba fixes `parallel=True` per compiled function)."""
    n_items = q.shape[0] * ((q.shape[1] + QUERY_TILE - 1) // QUERY_TILE)
    for item in range(n_items):
        attend_item(q, keys, values, key_scales, value_scales, positions, layout, first_block, block_size, scale, out, item)


def check_arguments(q, keys, positions, layout, first_block, block_size):
    H, T, _ = q.shape
    positions = np.asarray(positions)
    if positions.shape != (T,) or (T and (positions[0] < 0 or np.any(np.diff(positions) != 1))):
        raise ValueError(f"attend_blocksparse: positions must be {T} consecutive positions >= 0")
    if H % keys.shape[0]:
        raise ValueError(f"attend_blocksparse: {H} query heads do not share {keys.shape[0]} kv heads evenly")
    if T and positions[-1] >= keys.shape[1]:
        raise ValueError(f"attend_blocksparse: position {positions[-1]} is past the {keys.shape[1]} cached positions")
    blocks = positions // block_size - first_block
    if layout.shape[0] != H or (T and (blocks[0] < 0 or blocks[-1] >= layout.shape[1]
                                       or positions[-1] // block_size >= layout.shape[2])):
        raise ValueError(f"attend_blocksparse: layout {layout.shape} (from block {first_block}) does not cover "
                         f"positions {positions[0]}..{positions[-1]} in blocks of {block_size}")


def attend_blocksparse(q, keys, values, key_scales, value_scales, positions, layout, first_block, block_size, scale):
    """Attention of q (H, T, hd) float32 at `positions` (T,) over one layer's cache
    keys/values (KV, capacity, hd) (float32, float16, or int8 with key/value_scales
    (KV, capacity)), query t of head h reading the blocks kb with
    layout[h, positions[t] // block_size - first_block, kb], up to itself. -> (H, T, hd)."""
    check_arguments(q, keys, positions, layout, first_block, block_size)
    H, T, hd = q.shape
    out = np.empty((H, T, hd), np.float32)
    if T == 0:
        return out
    k, v, ks, vs = kernel_arrays(keys, values, key_scales, value_scales)
    work = H * T * (int(positions[-1]) + 1) * hd
    kernel = attend_blocksparse_kernel if work >= PARALLEL_WORK else attend_blocksparse_serial
    kernel(np.ascontiguousarray(q, dtype=np.float32), k, v, ks, vs, np.ascontiguousarray(positions, dtype=np.int64),
           np.ascontiguousarray(layout, dtype=np.bool_), int(first_block), int(block_size), np.float32(scale), out)
    return out
