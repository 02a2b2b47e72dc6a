"""The decode roofline: how fast this machine streams memory into the cores.

A decode step reads every weight once, so tokens/s can never exceed
bandwidth / bytes read per token. That makes the probe a promise: no engine
may stream faster than it. A single method cannot keep that promise: on one
day a plain parallel sum read 35 GB/s while minislm's int4 GEMV (software
prefetch, several loads in flight) read 38 GB/s (issue 21). So the probe reads
one array with several methods, each at several thread counts up to the
bench's, and keeps the best:

    sum         a Numba `prange` float32 sum (`fastmath=True` is not optional:
                without it LLVM keeps the float sum in order, cannot vectorise
                it, and the loop reports the adder, not the memory)
    xor         64-byte vector loads, four cache lines a step, XOR-ed into four
                accumulators (integer: no float latency chain), one 256 KiB
                block per work item
    xor+pf N    the same with a software prefetch N bytes ahead of every line,
                what the packed GEMVs and the attention kernel do
    gemv        OpenBLAS's float32 GEMV over the array seen as a matrix

Fewer threads sometimes stream better than more (each core's share of the
memory controller), so every thread count up to the bench's counts: the
result is what the engine's threads could at best read. The spread across
methods and thread counts is kept in the result, and the bench runs the probe
beside every engine row (run.py), so the day's drift shows too.
"""

import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64  # bytes in a cache line
STEP = 4 * LINE  # bytes per step of `xor_lines`: four lines, one accumulator each
BLOCK = 1 << 18  # bytes per work item of `read_blocks`
PREFETCH_AHEAD = (1024, 4096)  # bytes; the kernels use 4 KB (kernels/attention.py)
GEMV_COLUMNS = 4096


@njit(parallel=True, fastmath=True, cache=True)
def stream_sum(a):
    total = np.float32(0.0)
    for i in prange(a.size):
        total += a[i]
    return total


@intrinsic
def xor_lines(typingctx, array, start, stop, ahead):
    """XOR of the 64-bit words of bytes [start, stop) of `array`'s data (a multiple of
    STEP long), read as four streams of <8 x i64>, with a prefetch `ahead` bytes
    ahead of every line when ahead > 0 (a hint: never a fault, even past the end)."""
    sig = types.uint64(array, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        i8, i32, v8 = ir.IntType(8), ir.IntType(32), ir.VectorType(ir.IntType(64), 8)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        base = builder.bitcast(data, i8.as_pointer())
        start, stop, ahead = args[1], args[2], args[3]
        intp = start.type
        accs = [cgutils.alloca_once_value(builder, ir.Constant(v8, [0] * 8)) for _ in range(4)]
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")
        wanted = builder.icmp_signed(">", ahead, ir.Constant(intp, 0))
        steps = builder.sdiv(builder.sub(stop, start), ir.Constant(intp, STEP))
        with cgutils.for_range(builder, steps) as loop:
            offset = builder.add(start, builder.mul(loop.index, ir.Constant(intp, STEP)))
            for j, acc in enumerate(accs):
                at = builder.add(offset, ir.Constant(intp, j * LINE))
                with builder.if_then(wanted, likely=True):
                    builder.call(prefetch, [builder.gep(base, [builder.add(at, ahead)]), ir.Constant(i32, 0),
                                            ir.Constant(i32, 3), ir.Constant(i32, 1)])
                words = builder.load(builder.bitcast(builder.gep(base, [at]), v8.as_pointer()), align=8)
                builder.store(builder.xor(builder.load(acc), words), acc)
        both = [builder.xor(builder.load(accs[0]), builder.load(accs[1])),
                builder.xor(builder.load(accs[2]), builder.load(accs[3]))]
        total = builder.xor(*both)
        out = builder.extract_element(total, ir.Constant(i32, 0))
        for i in range(1, 8):
            out = builder.xor(out, builder.extract_element(total, ir.Constant(i32, i)))
        return out

    return sig, codegen


@njit(parallel=True, cache=True)
def read_blocks(a, ahead):
    """XOR of every 64-bit word of a's whole BLOCKs (a's bytes past the last whole
    block are not read): one block per work item."""
    n = a.nbytes // BLOCK
    partial = np.zeros(n, np.uint64)
    for b in prange(n):
        partial[b] = xor_lines(a, b * BLOCK, (b + 1) * BLOCK, ahead)
    out = np.uint64(0)
    for b in range(n):
        out ^= partial[b]
    return out


def thread_counts(threads: int) -> list[int]:
    """1, 2, 4, ... below `threads`, then `threads` itself."""
    counts, n = [], 1
    while n < threads:
        counts.append(n)
        n *= 2
    return counts + [threads]


def methods(a: np.ndarray) -> dict:
    """{name: (bytes one call reads, the call)} for one array of float32 ones."""
    blocks = a.nbytes // BLOCK * BLOCK
    matrix = a[: a.size // GEMV_COLUMNS * GEMV_COLUMNS].reshape(-1, GEMV_COLUMNS)
    vector = np.ones(GEMV_COLUMNS, np.float32)
    found = {"sum": (a.nbytes, lambda: stream_sum(a)), "xor": (blocks, lambda: read_blocks(a, 0))}
    for ahead in PREFETCH_AHEAD:
        found[f"xor+pf {ahead // 1024} KB"] = (blocks, lambda ahead=ahead: read_blocks(a, ahead))
    found["gemv"] = (matrix.nbytes, lambda: matrix @ vector)
    return found


def measure_bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 3) -> dict:
    """Best read bandwidth in GB/s (1e9 bytes/s) over the methods and thread counts
    above, each run `repeats` times after an untimed first call (compiling, or
    loading from Numba's cache)."""
    import numba
    from threadpoolctl import threadpool_limits

    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)  # written, so every page is really mapped
    runs = []
    for n in thread_counts(threads):
        numba.set_num_threads(n)
        with threadpool_limits(n, user_api="blas"):
            for name, (nbytes, call) in methods(a).items():
                call()
                rates = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call()
                    rates.append(nbytes / (time.perf_counter() - start) / 1e9)
                runs.append({"method": name, "threads": n, "gbs": max(rates),
                             "runs_gbs": [round(r, 2) for r in rates]})
    numba.set_num_threads(threads)
    best = max(runs, key=lambda r: r["gbs"])
    at_all = [r["gbs"] for r in runs if r["threads"] == threads]
    return {
        "gbs": best["gbs"],
        "method": best["method"],
        "method_threads": best["threads"],
        "spread_gbs": [min(r["gbs"] for r in runs), best["gbs"]],
        "at_threads_gbs": [min(at_all), max(at_all)],
        "methods": runs,
        "array_gib": gib,
        "threads": threads,
        "threading_layer": numba.threading_layer(),
    }
