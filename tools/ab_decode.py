"""Decode speed of two git revisions, measured interleaved: is B slower than A?

    python tools/ab_decode.py                          # A = a8cb364 (before the recorder), B = HEAD, shipped model
    python tools/ab_decode.py --a main --b lens --runs 7 --tokens 200
    python tools/ab_decode.py --cache-dir bench-cache --quant bf16 --tokens 32   # + the bench's Phi-3-mini-shaped checkpoint

Each revision is checked out with `git worktree` into a temporary folder and run
in its own Python subprocess (PYTHONPATH = that folder, so `import minislm`
reads that revision's code; the worker prints the files it imported, and this
script checks they lie in the worktree). Runs alternate A, B, B, A, A, B, ... so
a machine that slows down or speeds up during the measurement hurts both sides
alike; each side first runs once unmeasured, which fills its Numba cache. A run
loads the model, decodes a few tokens to warm up, then `--tokens` greedy tokens
after a fixed prompt of random ids, with no stop ids, and reports minislm's own
decode figure (GenerationStats.decode_tokens_per_second: forwards after the first
generated token). The medians are compared; single runs on a shared machine
differ by up to 30 %, so look at the spread too.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_CHECKPOINT = "phi3-mini-4k-f16"  # what `python -m minislm bench` writes into its --cache-dir

WORKER = r"""
import json, sys
import numpy as np
root, model_path, quant, n_tokens, prompt_len, threads = sys.argv[1:7]
import minislm
import minislm.kernels
from minislm.generate import GenerationStats, generate_tokens
from minislm.sampling import Sampler, SamplingSettings
if int(threads):
    minislm.kernels.set_threads(int(threads))
model = minislm.load(model_path, quant=None if quant == "none" else quant)
vocab = min(model.config.vocab_size, 4000)
prompt = np.random.default_rng(0).integers(3, vocab, int(prompt_len))
greedy = Sampler(SamplingSettings(temperature=0.0))
list(generate_tokens(model, prompt, 4, greedy))  # warm-up: first calls, caches, page faults
stats = GenerationStats()
tokens = list(generate_tokens(model, prompt, int(n_tokens), greedy, stop_ids=(), stats=stats))
print(json.dumps({
    "tok_s": stats.decode_tokens_per_second, "generated": len(tokens),
    "minislm": minislm.__file__, "kernels": minislm.kernels.__file__,
}))
"""


def checkout(revision: str, folder: Path) -> Path:
    """A detached worktree of `revision`, with minislm/kernels pointing at its kernels/
    (an installed minislm maps the top-level kernels/ folder to minislm.kernels)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(folder), revision], check=True)
    link = folder / "minislm" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    return folder


def remove(folder: Path) -> None:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], check=False)


def measure(tree: Path, model: str, quant: str, tokens: int, prompt_len: int, threads: int) -> float:
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(tree), model, quant, str(tokens), str(prompt_len), str(threads)],
        cwd=tree, env=worker_env(tree), capture_output=True, text=True, timeout=3600,
    )
    if result.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("minislm", "kernels"):
        if not Path(report[name]).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the worker for {tree} imported {name} from {report[name]}, not from its worktree")
    if report["generated"] != tokens:
        raise SystemExit(f"the worker for {tree} generated {report['generated']} tokens, not {tokens}")
    return report["tok_s"]


def worker_env(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def compare(trees: dict, models: dict, args) -> dict:
    """Interleaved runs of every revision, revision `label` on `models[label]`:
    {label: [tok/s, ...]}."""
    labels = list(trees)
    results = {label: [] for label in labels}
    for label in labels:  # unmeasured: compiles and caches each side's Numba kernels
        measure(trees[label], models[label], args.quant, 8, args.prompt_tokens, args.threads)
    for run in range(args.runs):
        order = labels if run % 2 == 0 else labels[::-1]
        for label in order:
            tok_s = measure(trees[label], models[label], args.quant, args.tokens, args.prompt_tokens, args.threads)
            results[label].append(tok_s)
            print(f"  run {run + 1}/{args.runs} {label}: {tok_s:8.2f} tok/s", file=sys.stderr)
    return results


def report(model: str, revisions: dict, results: dict) -> dict:
    (a, b) = results
    med = {label: statistics.median(values) for label, values in results.items()}
    print(f"\n{model}")
    for label, values in results.items():
        print(f"  {label} ({revisions[label]}): median {med[label]:.2f} tok/s, "
              f"min {min(values):.2f}, max {max(values):.2f}, runs {', '.join(f'{v:.1f}' for v in values)}")
    change = med[b] / med[a] - 1
    print(f"  B / A = {med[b] / med[a]:.3f} ({change:+.1%})")
    return {"model": model, "revisions": revisions, "runs": results, "median": med, "b_over_a": med[b] / med[a]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="a8cb364", help="revision A (default a8cb364, the commit before the recorder)")
    parser.add_argument("--b", default="HEAD", help="revision B (default HEAD)")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per revision (default 5)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--model", help="model folder (default: the shipped model of each revision)")
    parser.add_argument("--cache-dir", help=f"also the bench's checkpoint, {BENCH_CHECKPOINT}/ in this folder")
    parser.add_argument("--quant", default="none", choices=["none", "bf16", "int4"], help="load with --quant (default none)")
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (default: all cores)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.runs < 1 or args.tokens < 2:
        parser.error("--runs must be >= 1 and --tokens >= 2")
    models = [args.model] if args.model else [None]
    if args.cache_dir:
        bench = Path(args.cache_dir) / BENCH_CHECKPOINT
        if not (bench / "config.json").is_file():
            parser.error(f"{bench} has no config.json: run `python -m minislm bench --cache-dir {args.cache_dir}` once")
        models.append(str(bench.resolve()))

    revisions = {"A": args.a, "B": args.b}
    for label, rev in revisions.items():  # resolve now: HEAD means this checkout's HEAD
        revisions[label] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                                          capture_output=True, text=True).stdout.strip()
    results = []
    with tempfile.TemporaryDirectory(prefix="ab-decode-") as tmp:
        trees = {label: checkout(rev, Path(tmp) / label) for label, rev in revisions.items()}
        try:
            for model in models:
                # no --model: each revision's own shipped model (the same file unless a revision changed it)
                paths = {label: model or str(tree / "minislm" / "assets" / "shakespeare") for label, tree in trees.items()}
                shown = model or "the shipped model (minislm/assets/shakespeare)"
                print(f"{shown}: {args.runs} interleaved runs per revision, {args.tokens} tokens each", file=sys.stderr)
                results.append(report(shown, revisions, compare(trees, paths, args)))
        finally:
            for tree in trees.values():
                remove(tree)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
