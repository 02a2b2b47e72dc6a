"""What speculative decoding buys on Phi-3-mini's shapes, measured (docs/performance.md).

    python tools/bench_speculative.py --model DIR [--threads 2] [--tokens 48] [--repeats 3]

DIR: an int4 Phi-3-mini-shaped folder. `python -m minislm bench` writes a random
Phi-3-mini checkpoint into its --cache-dir (bench-cache/phi3-mini-4k-f16); quantize
it once with `python -m minislm quantize --model bench-cache/phi3-mini-4k-f16 --out
DIR` (random weights: speed depends on the shapes, not the values). Prints, each
figure as the median of --repeats interleaved runs with their spread:

1. the cost of a verify forward of k = 4 guesses (5 tokens) against one decode step,
   at a 128-token context (goal: <= 1.3x);
2. greedy generation with an oracle draft that replays the target's own greedy
   continuation (every guess accepted: the machinery's upper bound) against plain
   decoding (goal: >= 2.5x);
3. tokens/s against acceptance: the oracle with a share of its guesses made wrong;
4. prompt lookup's measured acceptance on the shipped model with a copy-heavy prompt
   (--shipped), and what it does to tokens/s there.
"""

import argparse
import statistics
import time

import numpy as np

import minislm
from minislm.generate import GenerationStats
from minislm.kernels import set_threads
from minislm.load import BUNDLED_MODEL
from minislm.runtime import generate_ids, make_drafter, make_sampler, sampling_settings
from minislm.sampling import SamplingSettings
from minislm.speculative import Draft

COPY_PROMPT = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n"
    "That thou her maid art far more fair than she.\n"
)


class Replay:
    """An oracle draft: the target's own greedy continuation, each guess made wrong with
    probability `wrong` (then every later guess of that step is useless too)."""

    name = "oracle"

    def __init__(self, continuation, prompt_len, wrong=0.0, seed=0):
        self.continuation, self.prompt_len, self.wrong = continuation, prompt_len, wrong
        self.rng = np.random.default_rng(seed)

    def propose(self, history, k, grammar=None):
        done = len(history) - self.prompt_len
        guesses = list(self.continuation[done : done + k])
        guesses = [g if self.rng.random() >= self.wrong else (g + 1) % 32000 for g in guesses]
        return Draft(guesses, [None] * len(guesses))


def spread(values) -> str:
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def verify_cost(model, repeats: int, context: int = 128, k: int = 4):
    """ms of one decode step and of one verify forward of k guesses, interleaved."""
    ids = np.random.default_rng(0).integers(0, 32000, size=context + k + 1)
    cache = model.new_cache(context + k + 2)
    model.forward(ids[:context], cache)
    decode, verify = [], []
    for _ in range(repeats * 5):
        for n, out in ((1, decode), (k + 1, verify)):
            start = time.perf_counter()
            model.lm_head(model.forward(ids[context : context + n], cache))
            out.append(1e3 * (time.perf_counter() - start))
            cache.truncate(context)
    return decode, verify


def generation_rate(model, ids, tokens, drafter=None, num_draft=4, settings=None):
    """(decode tokens/s, stats) of one greedy generation."""
    settings = settings or SamplingSettings(temperature=0.0)
    stats = GenerationStats()
    out = list(generate_ids(model, ids, tokens, make_sampler(model, settings, 0), stats=stats, drafter=drafter,
                            num_draft=num_draft))
    return stats.decode_tokens_per_second, stats, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an int4 Phi-3-mini-shaped folder (see above)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per run (default 48)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shipped", action="store_true", help="also measure prompt lookup on the shipped model")
    args = p.parse_args()
    set_threads(args.threads)
    model = minislm.load(args.model)
    print(f"{args.model}: {model.weights_format.describe()}, {args.threads} threads")

    decode, verify = verify_cost(model, args.repeats)
    ratios = [v / d for d, v in zip(decode, verify)]
    print(f"1. decode step {spread(decode)} ms | verify k=4 {spread(verify)} ms | ratio {spread(ratios)} (goal <= 1.3)")

    ids = list(np.random.default_rng(1).integers(0, 32000, size=128))
    plain_rates, oracle_rates, by_share = [], [], {}
    for r in range(args.repeats):
        rate, _, continuation = generation_rate(model, ids, args.tokens)
        plain_rates.append(rate)
        rate, stats, out = generation_rate(model, ids, args.tokens, Replay(continuation, len(ids)))
        assert out == continuation, "the oracle changed the greedy tokens"
        oracle_rates.append(rate)
        for wrong in (0.75, 0.5, 0.25):
            rate, stats, _ = generation_rate(model, ids, args.tokens, Replay(continuation, len(ids), wrong, seed=r))
            by_share.setdefault(wrong, []).append((rate, stats.accepted_tokens / max(stats.drafted_tokens, 1)))
    speedups = [o / p for p, o in zip(plain_rates, oracle_rates)]
    print(f"2. plain {spread(plain_rates)} tok/s | oracle draft k=4 {spread(oracle_rates)} tok/s | "
          f"speed-up {spread(speedups)}x (goal >= 2.5)")
    print("3. tokens/s against acceptance (oracle with wrong guesses, k=4):")
    print(f"   acceptance 100 %: {spread(oracle_rates)} tok/s")
    for wrong, runs in sorted(by_share.items()):
        rates, shares = [r for r, _ in runs], [100 * s for _, s in runs]
        print(f"   acceptance {statistics.median(shares):5.1f} %: {spread(rates)} tok/s")
    print(f"   acceptance   0 %: plain decoding, {spread(plain_rates)} tok/s")

    if args.shipped:
        shipped = minislm.load(BUNDLED_MODEL)
        prompt = shipped.tokenizer.encode(COPY_PROMPT + COPY_PROMPT[:60])
        print(f"4. prompt lookup on the shipped model ({BUNDLED_MODEL.name}), copy-heavy prompt of {len(prompt)} tokens:")
        for penalty in (1.0, None):
            settings = sampling_settings(shipped, repetition_penalty=penalty)
            rows = []
            for _ in range(args.repeats):
                plain, _, a = generation_rate(shipped, prompt, 64, settings=settings)
                sampler = make_sampler(shipped, settings, 0)
                lookup, stats, b = generation_rate(shipped, prompt, 64, make_drafter(shipped, sampler, 512, "lookup"),
                                                   settings=settings)
                assert a == b
                rows.append((plain, lookup, 100 * stats.accepted_tokens / max(stats.drafted_tokens, 1),
                             stats.accepted_tokens, stats.drafted_tokens))
            label = f"repetition penalty {settings.repetition_penalty:g}"
            print(f"   {label}: accepted {rows[0][3]} of {rows[0][4]} guesses ({rows[0][2]:.0f} %); "
                  f"plain {spread([r[0] for r in rows])} tok/s, lookup {spread([r[1] for r in rows])} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
