"""bf16 GEMMs on the encoders' and the decoder's prefill shapes: GFLOP/s of every way
minislm can multiply bf16 weights, next to float32 BLAS and torch's bf16 linear.

    python tools/bench_bf16_gemm.py [--threads 2] [--rounds 5] [--shapes encoders,prefill]

Rows: T tokens x (in -> out), the shapes the encoders and the decoder multiply:
  encoders  the Conformer's 125 frames of a 10 s recording (1024 wide, 3072 / 1536
            feed-forward, 2048 GLU); SigLIP's 3 views x 1024 patches (1152 wide,
            4304 MLP); CLIP's 2 views x 577 positions (1024 wide, 4096 MLP)
  prefill   Phi-3-mini / Phi-4-mini prompts of 128 and 512 tokens: qkv 3072 -> 9216,
            gate_up 3072 -> 16384, down 8192 -> 3072
Columns (each a function of the same bf16 weights and the same float32 activations):
  bf16 x bf16   `Bf16Weight(w, activations="bf16")`: the activations rounded to bf16,
                `vdpbf16ps` (kernels/bf16pairs.py) where the CPU has AVX512-BF16
  bf16 (FMA)    `Bf16Weight(w)` on path "avx512": float32 activations, the weights
                widened in registers, two float32 FMAs per 32 weights (kernels/bf16dot.py)
  BLAS fp32     np.matmul on the weights widened to float32 beforehand (the portable
                path without its widening; what the float32 model runs)
  torch bf16    torch.nn.functional.linear on bf16 tensors (oneDNN; what transformers
                runs in bf16); needs torch, else left out
Rounds are interleaved (every column once per round) and the best round is kept. On one
thread the clock is the thread's CPU time (`time.thread_time`), which a busy machine
does not inflate; on more threads it is the wall clock, so say how loaded the machine was.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minislm.kernels import Bf16Weight, cpu, kernel_paths, set_threads  # noqa: E402
from minislm.kernels import reference as ref  # noqa: E402

SHAPES = {  # (tokens, in, out)
    "encoders": [(125, 1024, 1024), (125, 1024, 3072), (125, 1536, 1024), (125, 1024, 2048),
                 (3072, 1152, 1152), (3072, 1152, 4304), (3072, 4304, 1152),
                 (1154, 1024, 1024), (1154, 1024, 4096), (1154, 4096, 1024)],
    "prefill": [(t, i, o) for t in (128, 512) for i, o in ((3072, 9216), (3072, 16384), (8192, 3072))],
}


def columns(tokens, n_in, n_out, rng):
    """{name: function of no arguments} for one shape."""
    w = Bf16Weight((rng.standard_normal((n_out, n_in)) / n_in**0.5).astype(np.float32))
    rounded = w.with_activations("bf16")
    wide = ref.bf16_to_f32(w.bits)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    out = {"bf16 x bf16": lambda: rounded.matmul(x)}
    if cpu.has_avx512():
        out["bf16 (FMA)"] = lambda: w.matmul(x, path="avx512")
    out["BLAS fp32"] = lambda: x @ wide.T
    try:
        import torch
    except ImportError:
        return out
    tw = torch.from_numpy(w.bits.view(np.int16)).view(torch.bfloat16)
    tx = torch.from_numpy(x).to(torch.bfloat16)
    out["torch bf16"] = lambda: torch.nn.functional.linear(tx, tw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="encoders,prefill", help="comma-separated: encoders, prefill")
    args = ap.parse_args()
    set_threads(args.threads)
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{kernel_paths()}\nthreads {args.threads}, clock {clock.__name__}, best of {args.rounds} interleaved rounds, "
          f"load average {load} at the start")
    rng = np.random.default_rng(0)
    for group in args.shapes.split(","):
        print(f"\n{group}: GFLOP/s")
        header = None
        for tokens, n_in, n_out in SHAPES[group]:
            cases = columns(tokens, n_in, n_out, rng)
            if header is None:
                header = list(cases)
                print(f"{'T':>5s} {'in -> out':>13s}  " + "  ".join(f"{n:>12s}" for n in header) + "  bf16 x bf16 / BLAS, / torch")
            for run in cases.values():
                run()   # compile, warm up
            best = {name: np.inf for name in cases}
            for _ in range(args.rounds):
                for name, run in cases.items():
                    start = clock()
                    run()
                    best[name] = min(best[name], clock() - start)
            rate = {name: 2 * tokens * n_in * n_out / best[name] / 1e9 for name in cases}
            ratios = f"{rate['bf16 x bf16'] / rate['BLAS fp32']:5.2f}x"
            if "torch bf16" in rate:
                ratios += f", {rate['bf16 x bf16'] / rate['torch bf16']:5.2f}x"
            print(f"{tokens:5d} {n_in:5d} -> {n_out:5d}  " + "  ".join(f"{rate.get(n, float('nan')):12.1f}" for n in header)
                  + f"  {ratios}", flush=True)


if __name__ == "__main__":
    main()
