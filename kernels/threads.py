"""Threads: how many, and which threading layer runs Numba's `prange`.

A decode step makes a few hundred parallel kernel calls. Numba's `omp`
layer (GNU OpenMP) starts a parallel region in ~1.2 us on the project
machine, `workqueue` in ~92 us: 30-45 ms per token with workqueue. So we ask
for `omp` first, then `tbb`, then `workqueue` (always available), unless
the user chose one with NUMBA_THREADING_LAYER. Numba loads the layer at the
first parallel call; `threading_layer()` reports the one that loaded.
"""

import os

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
