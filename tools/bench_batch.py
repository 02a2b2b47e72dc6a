"""Batched decoding in `minislm serve`, measured with real HTTP clients.

    python tools/bench_batch.py --source bench-cache/phi3-mini-4k-f16     # Phi-3-mini int4 g128, 2 threads
    python tools/bench_batch.py --small --rounds 2                        # the shipped model: a dry run
    python tools/bench_batch.py --source ... --steps --threads 1          # the model alone, no HTTP

Issue 22's goals, on Phi-3-mini int4 shapes at 2 threads: with 4 concurrent
streaming clients, the aggregate decode rate is at least 3x one client's alone, and
no client waits more than 1.5x its time alone between two tokens.

`--source` is the random Phi-3-mini-shaped checkpoint `python -m minislm bench`
writes into its --cache-dir (phi3-mini-4k-f16). The first run quantizes it once with
`minislm quantize --group-size 128` (the bench's fastest int4 row) into --cache-dir,
and copies Phi-3's tokenizer (tests/fixtures/phi3-tokenizer) beside it, since the
server needs one; later runs load that folder memory-mapped.

One server process (`python -m minislm serve --threads T --max-batch C`) serves
alternating rounds, so both sides see the same machine:

* alone: one client streams a greedy completion of `--max-tokens` tokens after a
  prompt of `--prompt-tokens` random ids;
* together: `--clients` clients do the same at once, each with its own prompt.

Every client notes the arrival time of each server-sent event that carries text
(one per token, but for the rare token whose text is held back, such as a UTF-8
byte: its text comes with the next one). Alone, the decode rate is (events - 1) over
the time from the first to the last event, and the time between tokens is the
median gap. Together, only the window in which every client is decoding counts (from
the last client's first token to the first client's last): the aggregate rate is all
the events inside it over its length, and each client's time between tokens is its
median gap inside it. The largest gap anywhere (prefill chunks of a client that is
joining land between the others' tokens) is reported too. Medians over rounds, with
their spread, and the load average around each round: the machine may be shared.

`--steps` times the model instead, in this process: one `Model.decode_step` of 1, 2,
3 and 4 sequences (32 cached tokens each), interleaved, and the 2-sequence step once
more with the packed kernels' two-GEMV rule of before (`GEMV_MAX_TOKENS = 2`).
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_serve import Server  # a `minislm serve` process on a free port

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "phi3-tokenizer"
SERVED_FOLDER = "phi3-mini-4k-int4-g128-serve"


def int4_folder(source: Path, cache_dir: Path) -> Path:
    """The int4 g128 folder of `source`, with Phi-3's tokenizer, made once."""
    folder = cache_dir / SERVED_FOLDER
    if not (folder / "tokenizer.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "minislm", "quantize", "--model", str(source), "--group-size", "128",
                        "--out", str(folder)], check=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER / name, folder / name)
    return folder


def stream(server: Server, prompt: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion: the arrival time of each text event, and the
    token count the server reports."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    connection = http.client.HTTPConnection(server.host, server.port, timeout=3600)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    times, tokens = [], 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            times.append(time.perf_counter())
    connection.close()
    return {"start": start, "times": times, "tokens": tokens}


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    """Random ids among the vocabulary's ordinary pieces (past Phi-3's 259 control and
    byte tokens, below its special ones), a different prompt per client."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(300, 32000) for _ in range(length)] for _ in range(count)]


def run_clients(server: Server, batch: list[list[int]], max_tokens: int) -> list[dict]:
    results = [None] * len(batch)

    def client(i):
        results[i] = stream(server, batch[i], max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def gaps(times: list[float], lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
    return [b - a for a, b in zip(times, times[1:]) if lo <= a and b <= hi]


def alone_round(server: Server, prompt: list[int], max_tokens: int) -> dict:
    result = run_clients(server, [prompt], max_tokens)[0]
    t = result["times"]
    return {"tok_s": (len(t) - 1) / (t[-1] - t[0]), "gap_s": statistics.median(gaps(t)), "max_gap_s": max(gaps(t)),
            "tokens": result["tokens"], "events": len(t)}


def together_round(server: Server, batch: list[list[int]], max_tokens: int) -> dict:
    results = run_clients(server, batch, max_tokens)
    lo = max(r["times"][0] for r in results)  # every client has its first token
    hi = min(r["times"][-1] for r in results)  # no client has finished
    if hi <= lo:
        raise SystemExit("the clients never decoded all at once: raise --max-tokens")
    inside = sum(sum(lo < x <= hi for x in r["times"]) for r in results)
    per_client = [statistics.median(gaps(r["times"], lo, hi)) for r in results]
    return {"tok_s": inside / (hi - lo), "window_s": hi - lo, "gap_s": per_client,
            "max_gap_s": max(max(gaps(r["times"])) for r in results), "tokens": [r["tokens"] for r in results]}


def time_steps(model_path: str, threads: int, rounds: int) -> None:
    """Decode steps of B sequences, in-process, interleaved over B."""
    import numpy as np

    import minislm
    from minislm.kernels import packed, set_threads

    set_threads(threads)
    model = minislm.load(model_path)
    rng = np.random.default_rng(0)
    caches = [model.new_cache(256) for _ in range(4)]
    for cache in caches:
        model.forward(rng.integers(300, min(32000, model.config.vocab_size), 32), cache)
    cases = [(1, 1), (2, 1), (3, 1), (4, 1), (2, 2)]  # (sequences, GEMV_MAX_TOKENS)
    rule = packed.GEMV_MAX_TOKENS

    def step(n, gemv_max):
        packed.GEMV_MAX_TOKENS = gemv_max
        ids = rng.integers(300, min(32000, model.config.vocab_size), n)
        start = time.perf_counter()
        model.decode_step(ids, caches[:n])
        return time.perf_counter() - start

    try:
        for case in cases:
            step(*case)  # compile
        times = {case: [] for case in cases}
        for r in range(rounds):
            for case in cases[:: 1 if r % 2 else -1]:
                times[case].append(step(*case))
    finally:
        packed.GEMV_MAX_TOKENS = rule
    alone = statistics.median(times[(1, 1)])
    for (n, gemv_max), values in times.items():
        label = f"{n} sequences" + (" as 2 GEMVs" if gemv_max == 2 else "")
        print(f"{label:>24}: {spread([v * 1e3 for v in values], '{:.0f}')} ms a step, "
              f"{n * alone / statistics.median(values):.2f}x the tokens/s of one alone")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} (rounds {', '.join(fmt.format(v) for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="the bench's random Phi-3-mini checkpoint (phi3-mini-4k-f16)")
    parser.add_argument("--cache-dir", default="bench-cache", help="where the int4 folder is made and kept")
    parser.add_argument("--model", help="serve this folder as it is instead (default: --source's int4 folder)")
    parser.add_argument("--small", action="store_true", help="the shipped model, for a quick dry run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the rounds here")
    parser.add_argument("--steps", action="store_true", help="time Model.decode_step in-process instead of HTTP")
    args = parser.parse_args()

    if args.small:
        model = None
    elif args.model:
        model = args.model
    elif args.source:
        model = str(int4_folder(Path(args.source), Path(args.cache_dir)))
    else:
        parser.error("give --source (the bench's phi3-mini-4k-f16), --model or --small")
    if args.steps:
        print(f"load average {os.getloadavg()[0]:.1f}")
        time_steps(model or str(ROOT / "minislm" / "assets" / "shakespeare"), args.threads, args.rounds)
        print(f"load average {os.getloadavg()[0]:.1f}")
        return
    vocab = 4000 if args.small else 32000
    server = Server(model, args.threads, ["--max-batch", str(args.clients)])
    try:
        warm = prompts(args.clients, args.prompt_tokens, 0)
        run_clients(server, [[t % vocab for t in p] for p in warm], 4)  # compiles, faults the weights in
        rounds = []
        for r in range(args.rounds):
            batch = [[t % vocab for t in p] for p in prompts(args.clients, args.prompt_tokens, r + 1)]
            load_before = os.getloadavg()[0]
            alone = alone_round(server, batch[0], args.max_tokens)
            together = together_round(server, batch, args.max_tokens)
            rounds.append({"alone": alone, "together": together, "load": [load_before, os.getloadavg()[0]]})
            print(f"round {r + 1}: alone {alone['tok_s']:.2f} tok/s, gap {alone['gap_s'] * 1e3:.0f} ms | "
                  f"{args.clients} together {together['tok_s']:.2f} tok/s, gaps "
                  f"{', '.join(f'{g * 1e3:.0f}' for g in together['gap_s'])} ms (window {together['window_s']:.1f} s, "
                  f"largest gap {together['max_gap_s'] * 1e3:.0f} ms) | load {load_before:.1f}-{os.getloadavg()[0]:.1f}",
                  flush=True)
    finally:
        server.process.terminate()

    ratio = [r["together"]["tok_s"] / r["alone"]["tok_s"] for r in rounds]
    worst_gap = [max(r["together"]["gap_s"]) / r["alone"]["gap_s"] for r in rounds]
    print(f"\nmodel: {model or 'the shipped model'}, {args.threads} threads, {args.clients} clients, "
          f"prompts {args.prompt_tokens} tokens, {args.max_tokens} new tokens, greedy")
    print(f"one client alone:       {spread([r['alone']['tok_s'] for r in rounds])} tok/s decode")
    print(f"{args.clients} clients together:    {spread([r['together']['tok_s'] for r in rounds])} tok/s decode, all together")
    print(f"together / alone:       {spread(ratio)}x   goal >= 3x: {'met' if statistics.median(ratio) >= 3 else 'not met'}")
    print(f"slowest client's gap:   {spread(worst_gap)}x its gap alone   goal <= 1.5x: "
          f"{'met' if statistics.median(worst_gap) <= 1.5 else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
