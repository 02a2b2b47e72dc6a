"""Measure minislm's kernels against the memory bus and against BLAS.

    python tools/bench_kernels.py [--threads N] [--reps R] [--quick] [--no-compile]

Prints one table: the machine's read bandwidth (a Numba parallel streaming
sum over 1 GiB), then for the Phi-3-mini projection shapes each decode
kernel's median time, effective GB/s (bytes of weights read / time) and %
of that bandwidth, then prefill (T = 128) GFLOP/s against np.matmul, the
int4 GEMV-vs-GEMM crossover, and compile time cold vs cached.

Decode reads every weight once per token, from DRAM: a 25 MB int4 matrix
would sit in this machine's L3 if timed on its own, so each kernel cycles
through enough copies of its weights (>= 512 MiB) that every call misses
the cache, as in a real decode step. Bandwidth is measured before and
after the kernels; the table uses their mean. Timings on a shared machine
drift: compare the ratios within one run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import minislm.kernels as K
from minislm.bench.bandwidth import stream_sum  # the same probe as `minislm bench`
from minislm.kernels import bf16, fp32, int4

SHAPES = [(3072, 3072), (9216, 3072), (16384, 3072), (3072, 8192)]  # (out, in): o, qkv, gate_up, down
ROTATION_BYTES = 512 << 20


def timings(fn, args_list, reps):
    """Seconds per call, `reps` calls cycling through `args_list`."""
    fn(*args_list[0])  # warm-up (and compile)
    times = []
    for i in range(reps):
        args = args_list[i % len(args_list)]
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return np.array(times)


def median_time(fn, args_list, reps):
    return float(np.median(timings(fn, args_list, reps)))


def bandwidth(reps):
    """GB/s of each of `reps` streaming reads of 1 GiB."""
    a = np.ones(256 << 20, np.float32)
    return a.nbytes / timings(stream_sum, [(a,)], reps) / 1e9


def copies(arrays, nbytes):
    """Enough copies of `arrays` that cycling through them defeats the caches."""
    n = max(2, -(-ROTATION_BYTES // nbytes))
    return [arrays] + [tuple(np.copy(a) if a is not None else None for a in arrays) for _ in range(n - 1)]


def decode_rows(shape, rng, reps, group_sizes):
    n, k = shape
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    out = np.empty(n, np.float32)
    rows = []

    sets = copies((w,), w.nbytes)
    rows.append(("np.matmul fp32", w.nbytes, timings(lambda a: a @ x, sets, reps)))
    rows.append(("numba fp32", w.nbytes, timings(lambda a: fp32.gemv_f32(a, x, out), sets, reps)))
    del sets

    bits = K.Bf16Weight(w).bits
    sets = copies((bits,), bits.nbytes)
    rows.append(("bf16", bits.nbytes, timings(lambda a: bf16.gemv_bf16(a, x, out), sets, reps)))
    del sets

    for g in group_sizes:
        for sym in (True, False):
            q = K.Int4Weight(w, group_size=g, symmetric=sym)
            sets = copies((q.qweight, q.scales, q.zeros), q.nbytes)
            t = timings(lambda a, b, c: int4.gemv_int4(a, b, c, x, out), sets, reps)
            rows.append((f"int4 {'sym' if sym else 'asym'} g{g}", q.nbytes, t))
            del sets
    return rows


def prefill_rows(shape, rng, reps, tokens):
    n, k = shape
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    out = np.empty((tokens, n), np.float32)
    flops = 2.0 * tokens * n * k
    b, q = K.Bf16Weight(w), K.Int4Weight(w, group_size=32)
    cases = [("np.matmul fp32", lambda: x @ w.T),
             ("numba gemm fp32", lambda: fp32.gemm_f32(x, w, out)),
             ("bf16 tiles+BLAS", lambda: b.matmul(x)),
             ("int4 g32 int GEMM", lambda: q.matmul(x)),
             ("int4 g32 tiles+BLAS", lambda: int4_tiles_matmul(q, x))]
    return [(name, flops / timings(fn, [()], reps)) for name, fn in cases]


def int4_tiles_matmul(q, x):
    """The alternative int4 prefill: dequantize tiles of rows, BLAS multiplies."""
    return fp32.matmul_by_tiles(x, q.shape[0], lambda s, e, buf: int4.dequantize_int4_rows(
        q.qweight, q.scales, q.zeros, np.arange(s, e), buf))


def crossover(shape, rng, reps):
    """int4 matmul for T tokens: T GEMV calls, the int GEMM, tiles + BLAS."""
    n, k = shape
    q = K.Int4Weight((rng.standard_normal(shape) * 0.02).astype(np.float32), group_size=32)
    out = np.empty(n, np.float32)
    result = []
    for t in (1, 2, 4, 8, 16):
        x = rng.standard_normal((t, k)).astype(np.float32)

        def gemv_each():
            for i in range(t):
                int4.gemv_int4(q.qweight, q.scales, q.zeros, x[i], out)
        result.append((t, *(median_time(fn, [()], reps) for fn in
                            (gemv_each, lambda: q.matmul(x), lambda: int4_tiles_matmul(q, x)))))
    return result


COMPILE_SCRIPT = r"""
import time, numpy as np
t0 = time.perf_counter()
import minislm.kernels as K
from minislm.bench.bandwidth import stream_sum  # the same probe as `minislm bench`
t_import = time.perf_counter() - t0
rng = np.random.default_rng(0)
w = rng.standard_normal((32, 64)).astype(np.float32)
x1, x8 = w[:1, :].copy(), rng.standard_normal((8, 64)).astype(np.float32)
t0 = time.perf_counter()
for make in (K.Fp32Weight, K.Bf16Weight, lambda a: K.Int4Weight(a, 32, True),
             lambda a: K.Int4Weight(a, 32, False)):
    m = make(w); m.matmul(x1); m.matmul(x8); m.rows([0, 1])
K.fp32.gemm_f32(x8, w, np.empty((8, 32), np.float32))
K.threading_layer()
print(f"{t_import:.2f} {time.perf_counter() - t0:.2f}")
"""


def compile_times():
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            res = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env,
                                 capture_output=True, text=True, check=True)
            runs.append([float(v) for v in res.stdout.split()])
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=128, help="prefill length for GEMM")
    ap.add_argument("--quick", action="store_true", help="one shape, group 32 only")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time runs")
    args = ap.parse_args()

    K.set_threads(args.threads)
    import llvmlite.binding as llvm
    import numba
    rng = np.random.default_rng(0)
    shapes = SHAPES[2:3] if args.quick else SHAPES
    groups = (32,) if args.quick else (32, 64, 128)

    print(f"# cpu {llvm.get_host_cpu_name()}, numba {numba.__version__}, layer "
          f"{K.threading_layer()}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    bw_before = bandwidth(max(5, args.reps // 3))
    decode = {shape: decode_rows(shape, rng, args.reps, groups) for shape in shapes}
    bw_after = bandwidth(max(5, args.reps // 3))
    bw_all = np.concatenate([bw_before, bw_after])
    bw, bw_best = float(np.median(bw_all)), float(bw_all.max())
    print(f"\nread bandwidth: {bw:.1f} GB/s median (before {np.median(bw_before):.1f}, after "
          f"{np.median(bw_after):.1f}), best {bw_best:.1f}; Numba prange sum over 1 GiB "
          f"float32, fastmath")

    print("\n## decode: one token (GEMV), weights streamed from DRAM")
    print("(ms, GB/s, % bw: median call against median bandwidth; best: fastest call against "
          "best bandwidth, the figure that survives other processes on the machine)")
    print(f"| {'kernel':<16} | {'shape':>11} | {'MB':>6} | {'ms':>6} | {'GB/s':>5} | {'% bw':>4} "
          f"| {'best GB/s':>9} | {'best %':>6} |")
    print(f"|{'-' * 18}|{'-' * 12}:|{'-' * 7}:|{'-' * 7}:|{'-' * 6}:|{'-' * 5}:|{'-' * 10}:"
          f"|{'-' * 7}:|")
    for (n, k), rows in decode.items():
        for name, nbytes, times in rows:
            gbs, best = nbytes / np.median(times) / 1e9, nbytes / times.min() / 1e9
            print(f"| {name:<16} | {f'{n}x{k}':>11} | {nbytes / 1e6:6.1f} | "
                  f"{np.median(times) * 1e3:6.2f} | {gbs:5.1f} | {100 * gbs / bw:4.0f} | "
                  f"{best:9.1f} | {100 * best / bw_best:6.0f} |")

    if not args.quick:
        print("\n## Phi-3-mini, projections only: 32 x (qkv + o + gate_up + down) + lm_head")
        print("(lm_head 32064x3072 timed as gate_up x 32064/16384; attention, norms and Python "
              "overhead not included)")
        per_kernel = {}
        for (n, k), rows in decode.items():
            for name, _, times in rows:
                per_kernel.setdefault(name, {})[(n, k)] = np.median(times)
        for name, t in per_kernel.items():
            layer = t[(9216, 3072)] + t[(3072, 3072)] + t[(16384, 3072)] + t[(3072, 8192)]
            token = 32 * layer + t[(16384, 3072)] * 32064 / 16384
            print(f"| {name:<16} | {token * 1e3:6.1f} ms/token | <= {1 / token:5.1f} tok/s |")

    print(f"\n## prefill: T = {args.tokens} tokens (GEMM), GFLOP/s")
    names = None
    for shape in shapes:
        rows = prefill_rows(shape, rng, max(5, args.reps // 6), args.tokens)
        if names is None:
            names = [r[0] for r in rows]
            print("(median, best in brackets)")
            print("| shape | " + " | ".join(names) + " |")
            print("|---|" + "---:|" * len(names))
        print(f"| {shape[0]}x{shape[1]} | " + " | ".join(
            f"{np.median(g) / 1e9:.0f} ({g.max() / 1e9:.0f})" for _, g in rows) + " |")

    print("\n## int4 g32, 16384x3072, T tokens: time in ms")
    print("| T | T x GEMV | int GEMM (Int4Weight.matmul) | dequantized tiles + BLAS |\n|---:|---:|---:|---:|")
    for t, t_gemv, t_gemm, t_tiles in crossover((16384, 3072), rng, max(5, args.reps // 3)):
        print(f"| {t} | {t_gemv * 1e3:.2f} | {t_gemm * 1e3:.2f} | {t_tiles * 1e3:.2f} |")

    if not args.no_compile:
        (imp0, first0), (imp1, first1) = compile_times()
        print("\n## compile: first calls of every kernel in a fresh process")
        print(f"cold cache: import {imp0:.2f} s, first calls {first0:.2f} s; "
              f"warm cache (second process): import {imp1:.2f} s, first calls {first1:.2f} s")


if __name__ == "__main__":
    main()
