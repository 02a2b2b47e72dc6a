"""Prefill tok/s of a few Phi-3-mini-shaped layers on every kernel path, next to transformers.

    python tools/prefill_paths.py [--layers 4] [--threads 1] [--tokens 128,512] [--rounds 5]

What `python -m minislm bench` measures for the whole model, cut to a few layers so
that every path fits in one process and one run: a random checkpoint with
Phi-3-mini-4k's exact shapes (hidden 3072, 32 heads, ffn 8192, vocab 32064) but
`--layers` decoder layers is written once under --cache-dir; then each engine
prefills random prompts, in interleaved rounds (every engine once per round) so
that a busy machine slows all of them alike, and the median per engine is printed.

minislm engines force one kernel path per matmul (`w.matmul(x, path=...)`, through
a thin wrapper around each packed weight): int4 g32 and bf16 on "amx" (Intel AMX
tiles), "vnni" (vpdpbusd), "avx512" (bf16 widened in registers) and "portable" where this
CPU has them, int4 g128 on the fastest of them, fp32 through BLAS.
transformers runs bf16 (oneDNN, AMX where present), as the bench does.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minislm  # noqa: E402
from minislm.bench.random_checkpoint import PHI3_MINI_4K, write_random_checkpoint  # noqa: E402
from minislm.generate import generate_tokens  # noqa: E402,F401
from minislm.kernels import cpu, set_threads  # noqa: E402


class OnPath:
    """A packed weight whose matmul always takes `path` (the rest passes through)."""

    def __init__(self, weight, path):
        self.weight, self.path = weight, path
        self.shape, self.nbytes = weight.shape, weight.nbytes

    def matmul(self, x):
        return self.weight.matmul(x, path=self.path)

    def rows(self, ids):
        return self.weight.rows(ids)


def checkpoint(cache: Path, layers: int) -> Path:
    folder = cache / f"phi3-mini-{layers}-layers-f16"
    if not (folder / "model.safetensors").is_file():
        config = dict(PHI3_MINI_4K, num_hidden_layers=layers)
        write_random_checkpoint(folder, config, "F16")
    return folder


def minislm_engines(folder: Path):
    engines = {"minislm fp32 (BLAS)": minislm.load(folder)}
    paths = (["portable"] + (["avx512"] if cpu.has_avx512() else [])
             + (["amx"] if cpu.has_amx_bf16() else []))
    bf16 = minislm.load(folder, quant="bf16")
    for path in paths:
        engines[f"minislm bf16 {path}"] = on_path(bf16, path)
    paths = ["portable"] + (["vnni"] if cpu.has_vnni() else []) + (["amx"] if cpu.has_amx_int8() else [])
    for group in (32, 128):
        int4 = minislm.load(folder, quant="int4", group_size=group)
        for path in paths if group == 32 else paths[-1:]:
            engines[f"minislm int4 g{group} {path}"] = on_path(int4, path)
    return engines


def on_path(model, path):
    import copy

    clone = copy.copy(model)
    clone.weights = {name: OnPath(w, path) if hasattr(w, "matmul") and not isinstance(w, np.ndarray) else w
                     for name, w in model.weights.items()}
    return clone


def transformers_prefill(folder: Path, threads: int):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()

    @torch.inference_mode()
    def prefill(ids):
        model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    return prefill


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache-dir", default="/tmp/minislm-prefill-cache")
    ap.add_argument("--json", help="write the medians here")
    args = ap.parse_args()
    set_threads(args.threads)
    folder = checkpoint(Path(args.cache_dir), args.layers)
    prefills = {}
    for name, model in minislm_engines(folder).items():
        prefills[name] = lambda ids, model=model: model.lm_head(model.forward(ids, model.new_cache(len(ids)))[-1:])
    hf = transformers_prefill(folder, args.threads)
    if hf is not None:
        prefills["transformers bf16"] = hf
    rng = np.random.default_rng(0)
    results = {}
    print(f"# {cpu.kernel_paths()}, {args.layers} Phi-3-mini layers, {args.threads} threads, medians of "
          f"{args.rounds} interleaved rounds")
    for n in (int(t) for t in args.tokens.split(",")):
        ids = rng.integers(0, PHI3_MINI_4K["vocab_size"], n).tolist()
        for fn in prefills.values():
            fn(ids[:20])   # warm-up: compile, allocate
        times = {name: [] for name in prefills}
        for _ in range(args.rounds):
            for name, fn in prefills.items():
                start = time.perf_counter()
                fn(ids)
                times[name].append(time.perf_counter() - start)
        results[n] = {name: n / float(np.median(t)) for name, t in times.items()}
    names = list(prefills)
    print("| engine | " + " | ".join(f"prefill tok/s @{n}" for n in results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[n][name]:.1f}" for n in results) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({str(n): r for n, r in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
