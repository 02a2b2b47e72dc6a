"""The decode roofline: how fast this machine streams memory into the cores.

A decode step reads every weight once, so tokens/s can never exceed
bandwidth / bytes read per token. We measure bandwidth the way a decode
kernel reads: a parallel sum over an array far larger than the caches, with
the bench's thread count.

`fastmath=True` is not optional: without it LLVM must keep the float sum in
order, cannot vectorise the reduction, and the loop reports a fraction of the
real bandwidth (PERF_NOTES): the measurement would be of the adder, not of
the memory.
"""

import time

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def stream_sum(a):
    total = np.float32(0.0)
    for i in prange(a.size):
        total += a[i]
    return total


def measure_bandwidth(gib: float = 2.0, threads: int = 2, repeats: int = 7) -> dict:
    """Median read bandwidth in GB/s (1e9 bytes/s) of `repeats` sums over `gib` GiB of float32."""
    import numba

    numba.set_num_threads(threads)
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)  # written, so every page is really mapped
    stream_sum(a)  # compile (or load from cache) and fault the pages in, untimed
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        stream_sum(a)
        rates.append(a.nbytes / (time.perf_counter() - start) / 1e9)
    return {
        "gbs": float(np.median(rates)),
        "runs_gbs": [round(r, 2) for r in rates],
        "array_gib": gib,
        "threads": threads,
        "threading_layer": numba.threading_layer(),
    }
