"""Time to the first token of a model folder, in a fresh process: import, load, the
first forward of a short prompt, a second one, and the peak RSS against the bytes
of the weights.

    python tools/first_token.py bench-cache/phi3-mini-4k-f16-int4-g128        # a `minislm quantize` folder
    python tools/first_token.py bench-cache/phi3-mini-4k-f16-int4-g128 --runs 3

Each run is its own process, so the first one may include Numba compiling the
kernels for this folder's arrays (read-only memory maps are a type of their own to
Numba) and later ones read them from Numba's cache: run it twice and read both.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = r"""
import json, resource, sys, time
t0 = time.perf_counter()
def vm_hwm():  # this process's own peak RSS (ru_maxrss would carry the parent's across exec)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
import numpy as np
import minislm
t1 = time.perf_counter()
model = minislm.load(sys.argv[1])
t2 = time.perf_counter()
model.logits(np.arange(1, int(sys.argv[2]) + 1))
t3 = time.perf_counter()
model.logits(np.arange(1, int(sys.argv[2]) + 1))
t4 = time.perf_counter()
weights = sum(int(w.nbytes) for w in model.weights.values())
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_forward_s": t3 - t2, "second_forward_s": t4 - t3,
                  "peak_rss_bytes": vm_hwm(), "weight_bytes": weights}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model folder (e.g. what `minislm quantize` wrote)")
    parser.add_argument("--runs", type=int, default=2, help="fresh processes, one after another (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="prompt length (default 8, as the bench's row)")
    args = parser.parse_args()
    for run in range(1, args.runs + 1):
        done = subprocess.run([sys.executable, "-c", RUN, args.model, str(args.prompt_tokens)],
                              capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed", file=sys.stderr)
            return 1
        r = json.loads(done.stdout.strip().splitlines()[-1])
        first = r["load_s"] + r["first_forward_s"]
        print(f"run {run}: import {r['import_s']:.2f} s, load {r['load_s']:.2f} s, first {args.prompt_tokens}-token "
              f"forward {r['first_forward_s']:.2f} s (first token {first:.2f} s after import), second forward "
              f"{r['second_forward_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB = "
              f"{r['peak_rss_bytes'] / r['weight_bytes']:.2f}x the {r['weight_bytes'] / 1e9:.2f} GB of weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
