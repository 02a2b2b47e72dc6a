"""Threads: how many, which threading layer runs Numba's `prange`, and when BLAS
gets threads of its own (`blas_threads`).

A decode step makes a few hundred parallel kernel calls. Numba's `omp`
layer (GNU OpenMP) starts a parallel region in ~1.2 us on the project
machine, `workqueue` in ~92 us: 30-45 ms per token with workqueue. So we ask
for `omp` first, then `tbb`, then `workqueue` (always available), unless
the user chose one with NUMBA_THREADING_LAYER. Numba loads the layer at the
first parallel call; `threading_layer()` reports the one that loaded.
"""

import os
from contextlib import contextmanager
from functools import cache

import numba
import numpy as np

LAYER_PREFERENCE = ["omp", "tbb", "workqueue"]

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = LAYER_PREFERENCE
    numba.config.THREADING_LAYER = "default"   # first loadable in the priority list


def set_threads(n):
    """Use `n` threads in Numba kernels and in BLAS (np.matmul)."""
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"--threads {n}: must be between 1 and {limit} "
                         f"(set NUMBA_NUM_THREADS before start-up to allow more)")
    numba.set_num_threads(n)
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=n, user_api="blas")


# A forward pass over fewer tokens than this (a decode step, a chat's new turn) runs
# BLAS on the calling thread alone; a longer prefill gives BLAS all its threads.
BLAS_THREADS_FROM_TOKENS = 64


@contextmanager
def blas_threads(n_tokens):
    """BLAS on one thread for a short forward pass, its own count for a long one.

    Two thread pools share the cores: Numba's (the kernels, attention) and BLAS's (the
    float32 matmuls). Each splits a call's work evenly over its threads and spins while
    it waits for the slowest, so when a thread of one pool has lost its core (to the
    other pool's spinning threads, a server's other requests, another program) the
    whole call waits for it. On the shipped model a 20-token follow-up on a 400-token
    cache took 180-790 ms this way, often more than a fresh 420-token prefill, and
    17-70 ms with BLAS on one thread; decode steps were no slower. A long prefill's big
    matmuls gain from BLAS's threads, so they keep them (docs/serve.md has the figures).
    """
    if n_tokens >= BLAS_THREADS_FROM_TOKENS:
        yield
        return
    limits = blas_libraries().limit(limits=1)
    try:
        yield
    finally:
        limits.restore_original_limits()


@cache
def blas_libraries():
    """The BLAS libraries loaded in this process, found once (a scan of the loaded libraries)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def get_threads():
    return numba.get_num_threads()


@numba.njit(parallel=True, cache=True)
def _touch(a):
    for i in numba.prange(a.size):
        a[i] = i


def threading_layer():
    """Name of the threading layer in use ('omp', 'tbb' or 'workqueue').

    Runs a tiny parallel kernel first, because Numba picks the layer lazily."""
    _touch(np.empty(2, np.int64))
    return numba.threading_layer()
