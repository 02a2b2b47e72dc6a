"""Threads: how many, and which threading layer runs Numba's `prange`.

A decode step makes a few hundred parallel kernel calls. Numba's `omp`
layer (GNU OpenMP) starts a parallel region in ~1.2 us on the project
machine, `workqueue` in ~92 us: 30-45 ms per token with workqueue. So we ask
for `omp` first, then `tbb`, then `workqueue` (always available), unless
the user chose one with NUMBA_THREADING_LAYER. Numba loads the layer at the
first parallel call; `threading_layer()` reports the one that loaded.
"""

import functools
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


def on_python_threads(work, n_items):
    """Run work(i) for i in range(n_items), shared among `get_threads()` Python threads.

    For work done between BLAS products (an encoder's element-wise kernels, its
    attention heads). After a parallel region OpenMP's threads (Numba's `omp` layer)
    spin a while before they sleep, so a BLAS product that starts right after one
    shares a core with a spinning thread: on 2 cores a 12 ms (1154 x 1024 x 1024)
    product took 20 ms after a 1 ms Numba kernel. Python threads block as soon as
    they run out of work. `work` must release the GIL to run in parallel: NumPy's
    matmul does, and Numba kernels compiled with `nogil=True`.
    """
    n = min(get_threads(), n_items)
    if n <= 1:
        for i in range(n_items):
            work(i)
        return
    list(worker_pool(n).map(work, range(n_items)))


@functools.cache
def worker_pool(n):
    """n Python threads, started once per count and idle (blocked) between calls."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(n, thread_name_prefix="minislm-worker")


def row_bands(n_rows, n_bands):
    """[start, stop) of n_bands near-equal runs of rows covering range(n_rows)."""
    return [(b * n_rows // n_bands, (b + 1) * n_rows // n_bands) for b in range(n_bands)]


@functools.cache
def blas_libraries():
    """The BLAS libraries loaded in this process, found once (a scan of the loaded
    libraries, ~3 ms: too slow to repeat around every short burst of work)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def side_by_side(work, n_items):
    """`on_python_threads`, with BLAS on one thread meanwhile: for items that are small
    matrix products themselves, such as one attention head of one image crop. A
    (577 x 64) @ (64 x 577) product is too small for BLAS to split across cores with
    profit (measured: 2 threads ran the 16 heads' products 2-4x slower than one), so
    the cores take whole items instead."""
    limits = blas_libraries().limit(limits=1)
    try:
        on_python_threads(work, n_items)
    finally:
        limits.restore_original_limits()


def matmul_in_bands(x, w, out):
    """out (T, n) = x (T, k) @ w (n, k).T for float32 arrays, each thread multiplying its
    band of x's rows by the whole of w with BLAS on one thread (`side_by_side`).

    As fast as BLAS's own threads on these products (measured on 2 cores: 12.6 against
    12.4 ms at 1154 x 1024 x 1024, 409 against 411 ms at 9809 x 4096 x 1024), and it
    leaves no BLAS thread behind: after a threaded product OpenBLAS's threads spin for
    up to ~0.1 s, and the Python threads of the work that follows share the cores with
    them (a 2-view CLIP attention took 28 ms right after a threaded product, 23 ms
    after a pause)."""
    bands = row_bands(len(x), max(1, min(get_threads(), len(x))))

    def band(i):
        a, b = bands[i]
        np.matmul(x[a:b], w.T, out=out[a:b])

    side_by_side(band, len(bands))
    return out
