"""Measure minislm's kernels against the memory bus and against BLAS.

    python tools/bench_kernels.py [--threads N] [--reps R] [--quick] [--no-compile]

Prints, in one run: which CPU paths run here (`kernel_paths()`), the read
bandwidth (the same Numba streaming sum `minislm bench` uses for its roofline),
then for the Phi-3-mini projection shapes each decode kernel's median time,
effective GB/s (bytes of weights read / time) and % of that bandwidth, then
prefill GFLOP/s per kernel and path against np.matmul, the GEMV-vs-GEMM
crossover, and compile time cold vs cached.

Decode reads every weight once per token, from DRAM: a 28 MB int4 matrix would
sit in this machine's L3 if timed on its own, so each kernel cycles through
enough copies of its weights (>= 640 MiB, twice this machine's 300 MiB L3) that
calls mostly miss the cache, as in a real decode step.

On a shared machine timings drift with the other jobs, so the kernels of one
table are timed *interleaved*: each round calls every kernel once, in turn,
and each kernel's median is over the rounds; bandwidth probes are interleaved
with the decode rounds too. Compare ratios within one run.
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
from minislm.kernels import bf16dot, cpu, fp32, packed

SHAPES = [(3072, 3072), (9216, 3072), (16384, 3072), (3072, 8192)]  # (out, in): o, qkv, gate_up, down
ROTATION_BYTES = 640 << 20   # per kernel; all of one table's kernels are resident at once
GB = 1e9


def interleaved(cases, reps, clock=time.perf_counter):
    """{name: array of seconds}: `reps` rounds, each calling every case once in
    turn (after one warm-up call each). A case is (name, fn, list of arg tuples):
    call i uses the args i % len."""
    for _, fn, args in cases:
        fn(*args[0])
    times = {name: [] for name, _, _ in cases}
    for i in range(reps):
        for name, fn, args in cases:
            a = args[i % len(args)]
            start = clock()
            fn(*a)
            times[name].append(clock() - start)
    return {name: np.array(t) for name, t in times.items()}


def copies(arrays, nbytes):
    """Enough copies of `arrays` that cycling through them defeats the caches."""
    n = max(2, -(-ROTATION_BYTES // max(nbytes, 1)))
    return [arrays] + [tuple(np.copy(a) if isinstance(a, np.ndarray) else a for a in arrays) for _ in range(n - 1)]


def decode_cases(shape, rng, groups):
    """(name, bytes, fn, arg sets) per decode kernel for one shape."""
    n, k = shape
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    x = rng.standard_normal(k).astype(np.float32)
    x2 = x[None, :]
    out = np.empty(n, np.float32)
    out2 = out[None, :]
    path = cpu.int8_dot_path()
    cases = [("np.matmul fp32", w.nbytes, lambda a: a @ x, copies((w,), w.nbytes)),
             ("numba fp32", w.nbytes, lambda a: fp32.gemv(a, x2, out2), copies((w,), w.nbytes))]
    bits = K.Bf16Weight(w).bits
    cases.append(("bf16", bits.nbytes, lambda a: fp32.gemv(a, x2, out2), copies((bits,), bits.nbytes)))
    if cpu.has_avx512():
        cases.append(("bf16 avx512", bits.nbytes, lambda a: bf16dot.gemv_bf16_dot(a, x2, out2),
                      copies((bits,), bits.nbytes)))
    quantized = [(f"int4 sym g{g}", K.Int4Weight(w, group_size=g)) for g in groups]
    quantized.append(("int4 asym g32", K.Int4Weight(w, group_size=32, symmetric=False)))
    quantized.append(("int8 g32", K.Int8Weight(w, group_size=32)))
    for name, q in quantized:
        gemv = packed.GEMV[q.BITS, path]
        arrays = (q.codes, q._kernel_scales(), q.zeros, q.offsets)
        cases.append((name, q.nbytes,
                      lambda c, s, z, o, gemv=gemv, zero=q.zero: gemv(c, s, z, o, zero, x2, out2),
                      copies(arrays, q.nbytes)))
    return cases


def bandwidth_case():
    a = np.ones(256 << 20, np.float32)   # 1 GiB
    return ("bandwidth", a.nbytes, stream_sum, [(a,)])


def prefill_cases(shape, rng, tokens):
    """(name, fn) per prefill kernel and path available here; GFLOP/s = 2 T n k / time."""
    n, k = shape
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    b = K.Bf16Weight(w)
    q32, q128, q8 = K.Int4Weight(w, group_size=32), K.Int4Weight(w, group_size=128), K.Int8Weight(w)
    paths = ["portable"] + (["vnni"] if cpu.has_vnni() else []) + (["amx"] if cpu.has_amx_int8() else [])
    cases = [("np.matmul fp32", lambda: x @ w.T),
             ("bf16 tiles+BLAS", lambda: b.matmul(x, path="portable"))]
    if cpu.has_avx512():
        cases.append(("bf16 avx512", lambda: b.matmul(x, path="avx512")))
    if cpu.has_amx_bf16():
        cases.append(("bf16 amx", lambda: b.matmul(x, path="amx")))
    for name, q in (("int4 g32", q32), ("int4 g128", q128), ("int8 g32", q8)):
        for p in paths:
            cases.append((f"{name} {p}", lambda q=q, p=p: q.matmul(x, path=p)))
    return cases


def crossover(shape, rng, reps):
    """int4 g32 for T tokens: T GEMV calls against one GEMM (the CPU's path)."""
    n, k = shape
    q = K.Int4Weight((rng.standard_normal(shape) * 0.02).astype(np.float32), group_size=32)
    result = []
    for t in (1, 2, 3, 4, 8, 16, 32):
        x = rng.standard_normal((t, k)).astype(np.float32)
        times = interleaved([("gemv", lambda: [q.matmul(x[i: i + 1]) for i in range(t)], [()]),
                             ("gemm", lambda: q.matmul(x), [()])], reps)
        result.append((t, np.median(times["gemv"]), np.median(times["gemm"])))
    return result


COMPILE_SCRIPT = r"""
import time, numpy as np
t0 = time.perf_counter()
import minislm.kernels as K
t_import = time.perf_counter() - t0
rng = np.random.default_rng(0)
w = rng.standard_normal((32, 64)).astype(np.float32)
x1, x8, x32 = w[:1, :].copy(), rng.standard_normal((8, 64)).astype(np.float32), rng.standard_normal((32, 64)).astype(np.float32)
t0 = time.perf_counter()
for make in (K.Fp32Weight, K.Bf16Weight, lambda a: K.Int4Weight(a, 32, True),
             lambda a: K.Int4Weight(a, 32, False), K.Int8Weight):
    m = make(w); m.matmul(x1); m.matmul(x8); m.matmul(x32); m.rows([0, 1])
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
    ap.add_argument("--tokens", default="128,512", help="prefill lengths for the GEMMs")
    ap.add_argument("--quick", action="store_true", help="one shape, group 32 only")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time runs")
    ap.add_argument("--skip", default="", help="sections to skip: decode,prefill,crossover")
    args = ap.parse_args()

    K.set_threads(args.threads)
    import numba
    rng = np.random.default_rng(0)
    shapes = SHAPES[2:3] if args.quick else SHAPES
    groups = (32,) if args.quick else (32, 64, 128)
    skip = set(args.skip.split(","))

    print(f"# {cpu.kernel_paths()}, numba {numba.__version__}, layer {K.threading_layer()}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")

    if "decode" not in skip:
        print("\n## decode: one token (GEMV), weights streamed from DRAM, kernels interleaved")
        print("(median call; % bw against the median of the bandwidth probes interleaved with "
              "them; best: fastest call against the best probe)")
        print(f"| {'kernel':<16} | {'shape':>11} | {'MB':>6} | {'ms':>6} | {'GB/s':>5} | {'% bw':>4} "
              f"| {'best GB/s':>9} | {'best %':>6} |")
        print(f"|{'-' * 18}|{'-' * 12}:|{'-' * 7}:|{'-' * 7}:|{'-' * 6}:|{'-' * 5}:|{'-' * 10}:|{'-' * 7}:|")
        per_kernel = {}
        for shape in shapes:
            cases = decode_cases(shape, rng, groups) + [bandwidth_case()]
            nbytes = {name: b for name, b, _, _ in cases}
            times = interleaved([(name, fn, a) for name, _, fn, a in cases], args.reps)
            bw = nbytes["bandwidth"] / times.pop("bandwidth")
            bw_med, bw_best = np.median(bw) / GB, bw.max() / GB
            for name, t in times.items():
                gbs, best = nbytes[name] / np.median(t) / GB, nbytes[name] / t.min() / GB
                per_kernel.setdefault(name, {})[shape] = np.median(t)
                print(f"| {name:<16} | {f'{shape[0]}x{shape[1]}':>11} | {nbytes[name] / 1e6:6.1f} | "
                      f"{np.median(t) * 1e3:6.2f} | {gbs:5.1f} | {100 * gbs / bw_med:4.0f} | "
                      f"{best:9.1f} | {100 * best / bw_best:6.0f} |")
            print(f"| (read bandwidth) | {'1 GiB':>11} | | | {bw_med:5.1f} | | {bw_best:9.1f} | |")
            del cases
        if not args.quick:
            print("\n## Phi-3-mini, projections only: 32 x (qkv + o + gate_up + down) + lm_head")
            print("(lm_head 32064x3072 timed as gate_up x 32064/16384; int4 rows with an int4 lm_head)")
            for name, t in per_kernel.items():
                layer = t[(9216, 3072)] + t[(3072, 3072)] + t[(16384, 3072)] + t[(3072, 8192)]
                token = 32 * layer + t[(16384, 3072)] * 32064 / 16384
                print(f"| {name:<16} | {token * 1e3:6.1f} ms/token | <= {1 / token:5.1f} tok/s |")

    if "prefill" not in skip:
        for tokens in (int(t) for t in args.tokens.split(",")):
            print(f"\n## prefill: T = {tokens} tokens (GEMM), GFLOP/s (2 T out in / time), interleaved")
            names = None
            for shape in shapes:
                cases = prefill_cases(shape, rng, tokens)
                times = interleaved([(name, fn, [()]) for name, fn in cases], max(5, args.reps // 4))
                flops = 2.0 * tokens * shape[0] * shape[1]
                if names is None:
                    names = list(times)
                    print("(median, best in brackets)")
                    print("| shape | " + " | ".join(names) + " |")
                    print("|---|" + "---:|" * len(names))
                print(f"| {shape[0]}x{shape[1]} | " + " | ".join(
                    f"{flops / np.median(t) / GB:.0f} ({flops / t.min() / GB:.0f})" for t in times.values()) + " |")

    if "crossover" not in skip:
        print(f"\n## int4 g32, 16384x3072, T tokens: T GEMVs or one GEMM ({cpu.int8_gemm_path()}), ms")
        print("| T | T x GEMV | GEMM |\n|---:|---:|---:|")
        for t, t_gemv, t_gemm in crossover((16384, 3072), rng, max(5, args.reps // 3)):
            print(f"| {t} | {t_gemv * 1e3:.2f} | {t_gemm * 1e3:.2f} |")

    if not args.no_compile:
        (imp0, first0), (imp1, first1) = compile_times()
        print("\n## compile: first calls of every kernel in a fresh process")
        print(f"cold cache: import {imp0:.2f} s, first calls {first0:.2f} s; "
              f"warm cache (second process): import {imp1:.2f} s, first calls {first1:.2f} s")


if __name__ == "__main__":
    main()
