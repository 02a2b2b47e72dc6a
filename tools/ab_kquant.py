"""A K-quant GGUF decoded two ways in one process: at the file's size, and widened into tiles.

    python tools/ab_kquant.py FILE.gguf [--rounds 12] [--tokens 8] [--threads 2] [--quiet-below 10]

The same blocks become two models: the loader's (`KQuantWeight`, kernels/kquant.py:
the file's super-blocks, 4.6-6.6 bits a weight) and the way minislm read K-quants
before it (`SuperBlockCodes.as_grouped()` into Int4Weight/Int8Weight tiles: a
float32 scale and offset per sub-block, Q5_K/Q6_K codes in bytes). Decode steps
alternate between the two, so a host whose memory bandwidth drifts (the Zen 4 VM's
moved between 33 and 62 GB/s within minutes) hurts both alike; separate bench runs
of the two cannot be compared that closely. Prints, for each: the bytes a step
reads, the best and median ms per token (a whole decode step: every GEMV plus the
attention, norms, RoPE and SwiGLU), and the same for the GEMVs alone, per kind.
On a shared Linux machine `--quiet-below P` starts each round only when the CPU
pressure (/proc/pressure/cpu, the share of the last 10 s in which some task waited
for a core) is below P %, and keeps only the rounds it still was after.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a GGUF file with K-quant tensors (Q4_K_M, Q5_K_M, ...)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=8, help="decode steps per round and model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quiet-below", type=float, help="wait for CPU pressure below this %% (Linux PSI)")
    args = parser.parse_args()

    import minislm
    from minislm.formats import kernel_weights
    from minislm.formats.gguf import open_gguf, weight_plan
    from minislm.formats.grouped import SuperBlockCodes
    from minislm.kernels import KQuantWeight, set_threads
    from minislm.runtime import Model

    set_threads(args.threads)
    kquant = minislm.load(args.model)
    widened = dict(kquant.weights)
    for name, planned in weight_plan(open_gguf(args.model)).items():
        if len(planned.shape) == 2 and isinstance(kquant.weights.get(name), KQuantWeight):
            stored = planned.make()
            if isinstance(stored, SuperBlockCodes):
                widened[name] = kernel_weights.to_kernel_weight(stored.as_grouped(), name)
    models = {"file's size (KQuantWeight)": kquant,
              "widened (int4/int8 tiles)": Model(kquant.config, widened, kv_cache=kquant.kv_cache)}

    def matrices(model, kind=None):
        """The model's matrices a decode step multiplies (not the embedding, which it
        looks up), or those whose file type is `kind`."""
        return [model.weights[n] for n, w in kquant.weights.items() if getattr(w, "ndim", 2) == 2
                and "embed" not in n and kind in (None, getattr(w, "kind", None))]

    kinds = sorted({w.kind for w in matrices(kquant) if isinstance(w, KQuantWeight)})
    caches, steps = {}, {k: [] for k in models}
    gemvs = {(k, kind): [] for k in models for kind in [None, *kinds]}
    inputs = {k: np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)
              for k in {w.shape[1] for w in matrices(kquant)}}
    for name, model in models.items():   # warm-up: compile, first touch, a 128-token cache
        caches[name] = model.new_cache(128 + args.rounds * args.tokens + 1)
        model.lm_head(model.forward(np.arange(3, 131), caches[name])[-1:])
    kept = 0
    for r in range(args.rounds):
        wait_for_quiet(args.quiet_below)
        timed = {}
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            model = models[name]
            start = time.perf_counter()
            for i in range(args.tokens):
                model.lm_head(model.forward(np.array([5 + i]), caches[name]))
            timed[name, "step"] = (time.perf_counter() - start) / args.tokens
            for kind in [None, *kinds]:
                start = time.perf_counter()
                for w in matrices(model, kind):
                    w.matmul(inputs[w.shape[1]])
                timed[name, kind] = time.perf_counter() - start
        if args.quiet_below is not None and cpu_pressure() >= args.quiet_below:
            continue  # someone else ran meanwhile: the round measured them too
        kept += 1
        for (name, what), seconds in timed.items():
            (steps[name] if what == "step" else gemvs[name, what]).append(seconds)
    if not kept:
        print("no round stayed quiet; nothing to report", file=sys.stderr)
        return 1
    print(f"{args.model.name}, {args.threads} threads, {kept} of {args.rounds} alternating rounds of {args.tokens} tokens"
          + (f" (kept: CPU pressure below {args.quiet_below} % before and after)" if args.quiet_below is not None else ""))
    print("| weights | GB of matrices | decode ms/token best / median | tok/s best | GEMVs ms best / median | GEMVs GB/s best |")
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        nbytes = sum(w.nbytes for w in matrices(model))
        s, g = steps[name], gemvs[name, None]
        print(f"| {name} | {nbytes / 1e9:.3f} | {min(s) * 1e3:.1f} / {statistics.median(s) * 1e3:.1f} | "
              f"{1 / min(s):.2f} | {min(g) * 1e3:.1f} / {statistics.median(g) * 1e3:.1f} | {nbytes / min(g) / 1e9:.1f} |")
    print("\nThe GEMVs of each file type alone:\n")
    print("| file type | weights | GB | ms best / median | GB/s best |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        for name, model in models.items():
            nbytes = sum(w.nbytes for w in matrices(model, kind))
            g = gemvs[name, kind]
            print(f"| {kind} | {name} | {nbytes / 1e9:.3f} | {min(g) * 1e3:.1f} / {statistics.median(g) * 1e3:.1f} | "
                  f"{nbytes / min(g) / 1e9:.1f} |")
    return 0


def cpu_pressure() -> float:
    """Linux's CPU pressure, avg10: % of the last 10 s some runnable task waited for a core."""
    with open("/proc/pressure/cpu") as f:
        return float(f.readline().split()[1].split("=")[1])


def wait_for_quiet(below: float | None, longest_s: float = 900) -> None:
    start = time.monotonic()
    while below is not None and cpu_pressure() >= below and time.monotonic() - start < longest_s:
        time.sleep(2)


if __name__ == "__main__":
    raise SystemExit(main())
