"""Why llama.cpp decodes below the memory roofline: threads, weight repacking, formats.

    python tools/probe_llama_cpp.py --cache-dir bench-cache        # the bench's GGUFs
    python tools/probe_llama_cpp.py --cache-dir bench-cache --types Q4_0 --threads 1

For each GGUF the bench made (F16, Q8_0, Q4_0 of the Phi-3-mini-shaped checkpoint),
each thread count and with llama.cpp's extra buffer types on (the default: Q4_0 and
Q8_0 weights repacked into interleaved blocks for its AVX-512 kernels, "REPACK" in
its system info) and off, this decodes `--tokens` greedy tokens after a 16-token
prompt, in a fresh process each (llama.cpp keeps global state), and prints decode
tok/s, the weight bytes a step reads (the GGUF's tensors, one embedding row), and
the GB/s that makes, next to a read-bandwidth probe with the same threads
(minislm.bench.bandwidth). A format that streams far below the bandwidth with one
thread is compute-bound in its dot-product kernel; one that doubles with two
threads was not waiting on memory either.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minislm.bench.bandwidth import measure_bandwidth  # noqa: E402
from minislm.bench.gguf_export import gguf_path  # noqa: E402

CHECKPOINT = "phi3-mini-4k-f16"

RUN = r"""
import json, sys, time
import numpy as np
import gguf, llama_cpp
path, threads, extra, tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=64, n_threads=threads, n_threads_batch=threads,
                      use_extra_bufts=extra, verbose=False)
n_vocab = llm.n_vocab()
def logits():
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
llm.eval(list(range(100, 116)))
token, times = int(np.argmax(logits())), []
for _ in range(tokens):
    start = time.perf_counter()
    llm.eval([token])
    times.append(time.perf_counter() - start)
    token = int(np.argmax(logits()))
reader = gguf.GGUFReader(path)
sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
read = sum(sizes.values()) - sizes["token_embd.weight"] * (1 - 1 / n_vocab)
print(json.dumps({"tok_s": 1 / float(np.median(times[2:])), "bytes": read}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default="bench-cache")
    parser.add_argument("--types", default="F16,Q8_0,Q4_0")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args()
    checkpoint = Path(args.cache_dir) / CHECKPOINT
    print("| GGUF | threads | repack | decode tok/s | GB read/token | GB/s | read bandwidth GB/s | % |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        bandwidth = measure_bandwidth(gib=1.0, threads=threads)["gbs"]
        for kind in args.types.split(","):
            path = gguf_path(checkpoint, kind)
            if not path.is_file():
                print(f"| {kind} | {threads} | | missing: run `python -m minislm bench` first | | | | |")
                continue
            for extra in ("1", "0") if kind != "F16" else ("1",):
                done = subprocess.run([sys.executable, "-c", RUN, str(path), str(threads), extra, str(args.tokens)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"| {kind} | {threads} | {extra} | failed: {done.stderr.strip().splitlines()[-1:]} | | | | |")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                gbs = r["tok_s"] * r["bytes"] / 1e9
                print(f"| {kind} | {threads} | {'on' if extra == '1' else 'off'} | {r['tok_s']:.2f} | "
                      f"{r['bytes'] / 1e9:.3f} | {gbs:.1f} | {bandwidth:.1f} | {100 * gbs / bandwidth:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
