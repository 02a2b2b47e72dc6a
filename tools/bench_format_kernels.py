"""Decode-shaped GEMV speed of other formats' weights in minislm's kernels, next to its own int4.

    python tools/bench_format_kernels.py [--rows 8192] [--cols 3072] [--repeats 30] [--threads N]

One Phi-3-mini-shaped matrix (gate_up's 8192 x 3072 halves by default) in each GGUF
type, handed to the kernels exactly as the loader does (minislm/formats/kernel_weights.py:
K-quants to KQuantWeight; also widened into Int4Weight/Int8Weight tiles, as before
KQuantWeight existed), and minislm's own Int4Weight on the same shape. Prints ms per token (one GEMV, the
median of interleaved repeats), the bytes each weight reads, and bytes/s, which is
what decoding is bound by: Q8_0 reads 8.5 bits per weight where int4 reads ~4.5, so
equal bytes/s means the same share of the memory bandwidth, not the same tok/s.
Needs the group-wise kernels (Int4Weight.from_codes).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    from minislm.formats import kernel_weights

    if not kernel_weights.available():
        print("this install has no group-wise kernels (Int4Weight.from_codes); nothing to measure", file=sys.stderr)
        return 2
    import gguf

    from minislm import kernels
    from minislm.formats.gguf_blocks import unpack_rows, unpack_superblocks
    from test_formats_kernels import sane_blocks

    if args.threads:
        kernels.set_threads(args.threads)
    rows, cols = args.rows, args.cols
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
    weights = {"minislm int4 (G32)": kernels.Int4Weight(w, group_size=32)}
    for kind in ("Q4_0", "Q8_0"):
        data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
        weights[kind] = kernel_weights.to_kernel_weight(unpack_rows(kind, data))
    for kind in ("Q4_K", "Q5_K", "Q6_K"):   # as the loader keeps them, and widened into int4/int8 tiles
        blocks = sane_blocks(kind, rows, cols, seed=1)
        weights[kind] = kernel_weights.to_kernel_weight(unpack_superblocks(kind, blocks))
        weights[f"{kind} in int{4 if kind == 'Q4_K' else 8} tiles"] = kernel_weights.to_kernel_weight(unpack_rows(kind, blocks))
    x = rng.standard_normal((1, cols)).astype(np.float32)
    for weight in weights.values():  # compile and warm up
        weight.matmul(x)
    times = {name: [] for name in weights}
    for _ in range(args.repeats):
        for name, weight in weights.items():  # interleaved, so drift hits every row alike
            start = time.perf_counter()
            weight.matmul(x)
            times[name].append(time.perf_counter() - start)
    print(f"{rows} x {cols}, T = 1, threads = {kernels.get_threads()}, median of {args.repeats}")
    print("| weight | ms | bytes | GB/s |")
    print("|---|---|---|---|")
    for name, weight in weights.items():
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {ms:.3f} | {weight.nbytes / 1e6:.1f} MB | {weight.nbytes / ms / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
