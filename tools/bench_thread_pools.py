"""Thread pools that spin after their work, and what they cost the work that follows.

    python tools/bench_thread_pools.py [--threads 2] [--rounds 10]

1. A float32 (1154 x 1024) @ (1024 x 1024) product (a CLIP q_proj on 2 views) right
   after another product, right after a short `prange` kernel (quick_gelu over
   1154 x 4096 values, compiled here with `parallel=True` from the serial kernel of
   kernels/rowwise.py), and right after that kernel run on Python threads
   (`threads.on_python_threads`, what the encoders do). OpenMP's threads spin for a
   while after a parallel region; a BLAS thread that starts then may share a core
   with one.
2. Ten of those kernels on Python threads (~10 ms of work) right after the product
   done by BLAS's own threads, and right after the same product in row bands on
   Python threads with BLAS on one thread (`threads.matmul_in_bands`, what the CLIP
   tower does). OpenBLAS's threads spin for a while after a threaded product.

The best and the median of --rounds rounds are printed.
"""

import argparse
import statistics
import time

import numba
import numpy as np

from minislm.kernels.rowwise import QUICK_GELU_SLOPE, sigmoid


@numba.njit(parallel=True, fastmath={"reassoc", "contract", "nsz"}, error_model="numpy")
def quick_gelu_prange(h, bias):
    """kernels/rowwise.py's quick_gelu_in_place with its rows shared by `prange`."""
    for t in numba.prange(h.shape[0]):
        for f in range(h.shape[1]):
            z = h[t, f] + bias[f]
            h[t, f] = z * sigmoid(QUICK_GELU_SLOPE * z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    from minislm.kernels import rowwise, set_threads
    from minislm.kernels.threads import matmul_in_bands, on_python_threads, row_bands

    set_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1154, 1024), dtype=np.float32)
    w = rng.standard_normal((1024, 1024), dtype=np.float32)
    h = rng.standard_normal((1154, 4096), dtype=np.float32) * np.float32(0.01)
    bias = np.zeros(4096, np.float32)
    bands = row_bands(len(h), args.threads)

    def on_threads():
        on_python_threads(lambda b: rowwise.quick_gelu_in_place(h[bands[b][0] : bands[b][1]], bias), len(bands))

    def product():
        return x @ w.T

    before = {"another product": product, "a prange kernel": lambda: quick_gelu_prange(h, bias),
              "the kernel on Python threads": on_threads}
    for run in before.values():  # compile, warm up
        run()
    times = {name: [] for name in before}
    for _ in range(args.rounds):
        for name, run in before.items():
            run()
            start = time.perf_counter()
            product()
            times[name].append(time.perf_counter() - start)
    print(f"(1154 x 1024) @ (1024 x 1024) float32 product, threads {args.threads}, ms:")
    for name, t in times.items():
        print(f"  right after {name:30s} best {min(t) * 1e3:6.2f}  median {statistics.median(t) * 1e3:6.2f}")

    out = np.empty((len(x), len(w)), np.float32)
    products = {"the product on BLAS's threads": lambda: np.matmul(x, w.T, out=out),
                "the product in bands (BLAS on one thread)": lambda: matmul_in_bands(x, w, out)}
    times = {name: [] for name in products}
    for _ in range(args.rounds):
        for name, run in products.items():
            run()
            start = time.perf_counter()
            for _ in range(10):
                on_threads()
            times[name].append(time.perf_counter() - start)
    print(f"ten quick_gelu kernels on Python threads, threads {args.threads}, ms:")
    for name, t in times.items():
        print(f"  right after {name:44s} best {min(t) * 1e3:6.2f}  median {statistics.median(t) * 1e3:6.2f}")


if __name__ == "__main__":
    main()
