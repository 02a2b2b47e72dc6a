"""Loading cost of two git revisions, measured interleaved: wall time, CPU time, peak RSS.

    python tools/ab_load.py --cache-dir bench-cache                    # A = main, B = HEAD, int4 g128 and bf16
    python tools/ab_load.py --cache-dir bench-cache --quants int4 --runs 3 --threads 1

Each revision is checked out with `git worktree` into a temporary folder (as in
tools/ab_decode.py) and every load runs in a fresh Python subprocess that imports
that revision's code: it reads the checkpoint once through the page cache (as the
bench does, so no load waits on the disk), then times `minislm.load(...)` of the
bench's Phi-3-mini-shaped f16 checkpoint and reports wall seconds, the CPU seconds
of the process (user + system, all threads), and its peak RSS (VmHWM, which
counts the checkpoint's mapped pages it kept resident). Numba compiles once per
side in an unmeasured run first. Runs alternate A, B, B, A, ...; on a shared
machine compare CPU seconds and RSS first, wall seconds with care.
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
sys.path.insert(0, str(ROOT / "tools"))

from ab_decode import BENCH_CHECKPOINT, checkout, remove, worker_env  # noqa: E402

WORKER = r"""
import json, resource, sys, time
def vm_hwm():  # this process's own peak RSS (ru_maxrss would carry the parent's across exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
root, model_path, quant, threads = sys.argv[1:5]
buffer = bytearray(64 << 20)
from pathlib import Path
for path in sorted(Path(model_path).glob("*.safetensors")):
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
del buffer
import minislm, minislm.kernels
minislm.kernels.set_threads(int(threads))
options = {"quant": "bf16"} if quant == "bf16" else {"quant": "int4", "group_size": int(quant.split("g")[1])}
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
model = minislm.load(model_path, **options)
wall = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "wall_s": wall,
    "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    "peak_rss_bytes": vm_hwm(),
    "weight_bytes": sum(w.nbytes for w in model.weights.values()),
    "minislm": minislm.__file__, "kernels": minislm.kernels.__file__,
}))
"""


def measure(tree: Path, model: str, quant: str, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, str(tree), model, quant, str(threads)],
                          cwd=tree, env=worker_env(tree), capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("minislm", "kernels"):
        if not Path(result[name]).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the worker for {tree} imported {name} from {result[name]}, not from its worktree")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", default="main")
    parser.add_argument("--b", default="HEAD")
    parser.add_argument("--cache-dir", default="bench-cache")
    parser.add_argument("--quants", default="int4-g128,bf16", help="int4-g32/g64/g128, bf16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = str(Path(args.cache_dir) / BENCH_CHECKPOINT)
    if not (Path(model) / "model.safetensors").is_file():
        raise SystemExit(f"{model}: no checkpoint; run `python -m minislm bench --cache-dir {args.cache_dir}` once")
    revisions = {"A": args.a, "B": args.b}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {label: checkout(rev, Path(tmp) / label) for label, rev in revisions.items()}
        try:
            for quant in args.quants.split(","):
                results = {label: [] for label in trees}
                for label in trees:
                    measure(trees[label], model, quant, args.threads)  # compile, unmeasured
                for run in range(args.runs):
                    for label in (list(trees) if run % 2 == 0 else list(trees)[::-1]):
                        r = measure(trees[label], model, quant, args.threads)
                        results[label].append(r)
                        print(f"  {quant} run {run + 1}/{args.runs} {label}: {r['wall_s']:.1f} s wall, "
                              f"{r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr)
                print(f"\n{quant}, {args.threads} threads (median of {args.runs}):")
                for label, rs in results.items():
                    med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_bytes")}
                    print(f"  {label} ({revisions[label]}): {med['wall_s']:.1f} s wall, {med['cpu_s']:.1f} s CPU, "
                          f"peak RSS {med['peak_rss_bytes'] / 1e9:.2f} GB = "
                          f"{med['peak_rss_bytes'] / rs[0]['weight_bytes']:.2f}x the {rs[0]['weight_bytes'] / 1e9:.2f} GB "
                          f"of weights", flush=True)
        finally:
            for tree in trees.values():
                remove(tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
