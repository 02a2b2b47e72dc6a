"""How fast `minislm explore` answers: every interaction on the shipped model, and what a
"next token" costs beyond one decode step on a Phi-3-mini-shaped int4 model.

    python tools/explore_speed.py                          # both parts
    python tools/explore_speed.py --parts shipped --rounds 20
    python tools/explore_speed.py --parts mini --cache-dir bench-cache

Goals (issue 24): on the shipped model every interaction answers in < 200 ms; on
Phi-3-mini-shaped int4 a "next token" costs one decode step plus < 100 ms.

shipped: an explorer in a thread of this process on a free port, driven over HTTP as
the page drives it (a fresh connection a request, JSON in and out): the page itself,
a prompt, one "next token", a slider moved (the sampling panel again), another layer's
attention, the arithmetic view. Timed end to end, client side, at a short sequence
(the prompt below) and again after stepping to near the page's 128-token limit, where
every view is largest. Best, median and worst of --rounds each (an interaction meets
the goal when its worst does; on a busy machine the best is the closest to a quiet one).

mini: the random checkpoint with Phi-3-mini's exact shapes that `python -m minislm
bench` writes into --cache-dir (phi3-mini-4k-f16/), loaded as int4 at load (group 32,
the output layer int8), with the shipped model's tokenizer beside it (its ids are all
below Phi-3-mini's vocabulary size; the weights are random, so the text means nothing
and the speed is the real model's). Rounds alternate a plain decode step, the forward
and lm_head `generate` runs per token on a cache of the same length, with one "next
token" request to the explorer; the difference of the medians is the explorer's cost.
The plain step runs on the explorer's own model thread (`ExploreServer.worker`), as its
requests do: Numba's thread pool belongs to the thread that starts it, and a second
pool spinning beside the first would slow whichever ran second.
"""

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import minislm
from minislm.load import BUNDLED_MODEL
from minislm.watch.explore import ExploreServer
from minislm.watch.session import MAX_EXPLORE_TOKENS

PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."  # 31 tokens


class Client:
    def __init__(self, server: ExploreServer):
        self.host, self.port = server.server_address[:2]

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[float, dict | bytes]:
        """(milliseconds, the parsed answer) of one request on a fresh connection."""
        start = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        connection.request(method, path, None if body is None else json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        ms = 1000 * (time.perf_counter() - start)
        if response.status != 200:
            raise SystemExit(f"{method} {path}: {response.status} {data[:300]!r}")
        return ms, json.loads(data) if response.getheader("Content-Type") == "application/json" else data


def serving(model, threads=None):
    server = ExploreServer(model, log=lambda line: None, threads=threads)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def summary(name: str, times: list[float], goal: float | None = None) -> str:
    """Best, median and worst: on a busy machine the best is the closest to a quiet one."""
    worst = max(times)
    verdict = "" if goal is None else ("  ok" if worst < goal else f"  OVER {goal:.0f} ms")
    return (f"  {name:<38} best {min(times):7.1f}   median {statistics.median(times):7.1f}   "
            f"worst {worst:7.1f} ms{verdict}")


def interactions(client: Client, rounds: int, layers: int, goal: float) -> list[str]:
    """Each interaction `rounds` times at the sequence the explorer holds now."""
    times = {name: [] for name in ("the page", "a slider moved", "another layer's attention", "the arithmetic view")}
    for r in range(rounds):
        times["the page"].append(client.call("GET", "/")[0])
        times["a slider moved"].append(client.call("POST", "/api/sampling", {"settings": {"temperature": 0.5 + r % 5 / 10,
                                                                                       "top_p": 0.9}})[0])
        times["another layer's attention"].append(client.call("POST", "/api/attention", {"layer": r % layers})[0])
        times["the arithmetic view"].append(client.call("POST", "/api/arithmetic", {"layer": r % layers, "head": r % 4})[0])
    return [summary(name, t, goal) for name, t in times.items()]


def shipped_part(args) -> None:
    model = minislm.load(BUNDLED_MODEL)
    server = serving(model, args.threads)
    client = Client(server)
    layers = model.config.num_hidden_layers
    client.call("POST", "/api/prompt", {"text": PROMPT})  # warm: Numba's kernels, the tokenizer
    prompts, steps = [], []
    for _ in range(args.rounds):
        prompts.append(client.call("POST", "/api/prompt", {"text": PROMPT})[0])
    tokens = len(client.call("POST", "/api/prompt", {"text": PROMPT})[1]["tokens"])
    for _ in range(args.rounds):
        steps.append(client.call("POST", "/api/step", {"n": 1})[0])
    now = tokens + args.rounds
    print(f"shipped model, {now} tokens (a {tokens}-token prompt, then {args.rounds} steps):")
    print(summary(f"a prompt ({tokens} tokens)", prompts, args.goal_ms))
    print(summary("next token", steps, args.goal_ms))
    for line in interactions(client, args.rounds, layers, args.goal_ms):
        print(line)
    long_steps = []
    while now < MAX_EXPLORE_TOKENS - args.rounds - 1:
        n = min(32, MAX_EXPLORE_TOKENS - args.rounds - 1 - now)
        _, state = client.call("POST", "/api/step", {"n": n, "settings": {"temperature": 0.8, "seed": 1}})
        now = len(state["tokens"])
    for _ in range(args.rounds):
        long_steps.append(client.call("POST", "/api/step", {"n": 1, "settings": {"temperature": 0.8, "seed": 1}})[0])
    print(f"shipped model, near the page's limit ({now + args.rounds} of {MAX_EXPLORE_TOKENS} tokens):")
    print(summary("next token", long_steps, args.goal_ms))
    for line in interactions(client, args.rounds, layers, args.goal_ms):
        print(line)
    long_text = " ".join([PROMPT] * 4)  # 121 tokens
    _, state = client.call("POST", "/api/prompt", {"text": long_text})
    long_prompts = [client.call("POST", "/api/prompt", {"text": long_text})[0] for _ in range(args.rounds)]
    print(summary(f"a prompt of {len(state['tokens'])} tokens", long_prompts, args.goal_ms))
    server.shutdown()


def mini_folder(cache_dir: Path, into: Path) -> Path:
    """The bench's Phi-3-mini-shaped checkpoint, linked, with the shipped tokenizer beside it."""
    source = cache_dir / "phi3-mini-4k-f16"
    if not (source / "model.safetensors").is_file():
        raise SystemExit(f"--cache-dir {cache_dir}: no {source.name}/model.safetensors; "
                         f"run `python -m minislm bench --cache-dir {cache_dir}` once to write it")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        os.symlink((source / name).resolve(), into / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, into / name)
    return into


def mini_part(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if args.mini_model:
            model = minislm.load(args.mini_model)
        else:
            model = minislm.load(mini_folder(Path(args.cache_dir).expanduser(), Path(tmp)), quant="int4")
        print(f"Phi-3-mini-shaped int4 ({model.weights_format.describe()}), loaded in {time.perf_counter() - start:.0f} s")
        server = serving(model, args.threads)
        client = Client(server)
        _, state = client.call("POST", "/api/prompt", {"text": PROMPT})
        ids = [t["id"] for t in state["tokens"]]
        cache = model.new_cache(MAX_EXPLORE_TOKENS)

        def plain_step() -> float:
            """What generate runs per token, on a cache of the explorer's length, on the explorer's thread."""
            if cache.length == 0:
                model.forward(np.array(ids), cache)
            begin = time.perf_counter()
            model.lm_head(model.forward(np.array([7]), cache)[-1:])
            return 1000 * (time.perf_counter() - begin)

        plain, explored, forwards = [], [], []
        for n in range(args.rounds + args.warmup):
            if n == args.warmup:  # the first rounds fault the weights' pages in; they are not kept
                plain, explored, forwards = [], [], []
            plain.append(server.worker.submit(plain_step).result())
            ms, state = client.call("POST", "/api/step", {"n": 1})
            explored.append(ms)
            forwards.append(state["forward_ms"])
        extra = statistics.median(explored) - statistics.median(plain)
        best = min(explored) - min(plain)
        print(f"  {args.rounds} rounds from {len(ids) + args.warmup} to {len(state['tokens'])} tokens, interleaved:")
        print(summary("a plain decode step", plain))
        print(summary("the explorer's forward (in its step)", forwards))
        print(summary("next token (the whole request)", explored))
        print(f"  next token costs one decode step + {extra:.0f} ms by the medians, + {best:.0f} ms by the best rounds "
              f"(goal < {args.mini_goal_ms:.0f} ms): " + ("ok" if extra < args.mini_goal_ms else "OVER"))
        server.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="shipped,mini", help="shipped, mini, or both (default)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cache-dir", default="bench-cache", help="where `python -m minislm bench` keeps its checkpoint")
    parser.add_argument("--mini-model", help="an int4 folder of that checkpoint (`minislm quantize` of it, with a "
                        "tokenizer) to load instead of quantizing at load")
    parser.add_argument("--warmup", type=int, default=3, help="mini: rounds run first and not counted")
    parser.add_argument("--threads", type=int, help="the explorer's --threads (default: all cores)")
    parser.add_argument("--goal-ms", type=float, default=200.0)
    parser.add_argument("--mini-goal-ms", type=float, default=100.0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start"
          + (f"; {args.threads} threads" if args.threads else ""))
    parts = {"shipped", "mini"} if args.parts == "both" else set(args.parts.split(","))
    if not parts <= {"shipped", "mini"}:
        parser.error(f"--parts: shipped, mini, shipped,mini or both, got {args.parts!r}")
    if "shipped" in parts:
        shipped_part(args)
    if "mini" in parts:
        mini_part(args)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
