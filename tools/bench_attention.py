"""How fast the attention kernel reads the KV cache in a decode step, against the roofline.

    python tools/bench_attention.py                    # Phi-3-mini shapes, 2 threads
    python tools/bench_attention.py --threads 1 --contexts 512,2047

A decode step runs `attend_cached` once per layer, one query per head, over every
position the sliding window lets it see. This times exactly that over a cache of
Phi-3-mini's shape (32 layers x 32 kv heads x 96, window 2047) in each cache dtype,
the 32 layers in turn as the model does (so each layer's keys come from memory,
not from the last-level cache), and reports the cache bytes read per second next
to the machine's read bandwidth measured in the same run (minislm.bench.bandwidth,
before and after). Best and median of `--reps` steps: on a shared machine the
best is the kernel's, the median also the neighbours'.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minislm.bench.bandwidth import measure_bandwidth  # noqa: E402
from minislm.cache import DTYPES  # noqa: E402
from minislm.kernels.reference import quantize_cache_int8  # noqa: E402
from minislm.kernels import set_threads  # noqa: E402
from minislm.kernels.attention import attend_cached  # noqa: E402
from minislm.model import attention_mask  # noqa: E402

LAYERS, HEADS, HEAD_DIM, WINDOW = 32, 32, 96, 2047


def cache_layers(rng, dtype, positions):
    """One (keys, values, key_scales, value_scales) per layer, random, in `dtype`."""
    layers = []
    for _ in range(LAYERS):
        k = rng.standard_normal((HEADS, positions, HEAD_DIM), dtype=np.float32)
        v = rng.standard_normal((HEADS, positions, HEAD_DIM), dtype=np.float32)
        if dtype == "int8":
            (k, ks), (v, vs) = quantize_cache_int8(k), quantize_cache_int8(v)
            layers.append((k, v, ks, vs))
        else:
            layers.append((k.astype(DTYPES[dtype]), v.astype(DTYPES[dtype]), None, None))
    return layers


def step_seconds(layers, q, allowed, reps):
    """(best, median) seconds of a step; the first step (compiling) is not counted."""
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        for keys, values, ks, vs in layers:
            attend_cached(q, keys, values, ks, vs, allowed, HEAD_DIM**-0.5)
        times.append(time.perf_counter() - start)
    return float(np.min(times[1:])), float(np.median(times[1:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default="128,1024,2047,4096")
    parser.add_argument("--dtypes", default="float32,float16,int8")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    before = measure_bandwidth(gib=1.0, threads=args.threads)["gbs"]
    print(f"read bandwidth before: {before:.1f} GB/s ({args.threads} threads)")
    print("| cache | context | positions read | MB read/step | ms/step best (median) | GB/s best | % of bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for context in (int(c) for c in args.contexts.split(",")):
            seen = min(context, WINDOW)
            layers = cache_layers(rng, dtype, context)
            q = rng.standard_normal((HEADS, 1, HEAD_DIM), dtype=np.float32)
            allowed = attention_mask(np.array([context - 1]), context, WINDOW)
            seconds, median = step_seconds(layers, q, allowed, args.reps)
            per_head = 2 * HEAD_DIM * np.dtype(DTYPES[dtype]).itemsize + (8 if dtype == "int8" else 0)
            nbytes = LAYERS * HEADS * seen * per_head
            print(f"| {dtype} | {context} | {seen} | {nbytes / 1e6:.0f} | {seconds * 1e3:.2f} ({median * 1e3:.2f}) | "
                  f"{nbytes / seconds / 1e9:.1f} | {100 * nbytes / seconds / 1e9 / before:.0f} |", flush=True)
            del layers
    after = measure_bandwidth(gib=1.0, threads=args.threads)["gbs"]
    print(f"read bandwidth after: {after:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
