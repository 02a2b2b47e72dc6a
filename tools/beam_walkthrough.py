"""Beam search step by step on the shipped model, next to greedy decoding.

    python tools/beam_walkthrough.py --prompt "Good morrow," --num-beams 3 --max-tokens 6

For each step: every beam (its text so far, its score = the sum of its tokens'
log-probabilities), the beam of the previous step it extends, and what its KV cache
went through (handed over from its parent, or copied: how many positions). Then the
hypotheses kept, and greedy's continuation with its own score, for comparison.
The repetition penalty is off (1.0) unless --repeat-penalty says otherwise, so that
both searches rank the same log-probabilities. docs/architecture.md shows one run.
"""

import argparse

import numpy as np

import minislm
from minislm.beam import BeamStats, beam_search
from minislm.load import BUNDLED_MODEL


def log_prob_of(model, prompt: list[int], ids: list[int]) -> float:
    """Sum of log-softmax(logits) of `ids` after `prompt`, from one full forward."""
    logits = model.logits(prompt + ids)[len(prompt) - 1 : -1].astype(np.float64)  # (n, V): the logits before each id
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(log_probs[np.arange(len(ids)), ids].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--prompt", default="Good morrow,")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--repeat-penalty", type=float, default=1.0)
    args = parser.parse_args()
    model = minislm.load(args.model)
    tok = model.tokenizer
    prompt = tok.encode(args.prompt)
    stop_ids = model.generation_config.eos_token_ids
    caches = {}  # id(cache) -> a letter, in order of first use

    def text(ids) -> str:
        """The vocabulary pieces, so that each token is visible (▁ is a space)."""
        return repr("".join(tok.token_piece(i) for i in ids))

    def show(length, beams, finished):
        print(f"step {length}:")
        for i, beam in enumerate(beams):
            name = caches.setdefault(id(beam.cache), "abcdefghijklmnop"[len(caches)])
            how = f"copied {beam.copied} position{'s' * (beam.copied > 1)}" if beam.copied else "handed over"
            print(f"  beam {i}  {float(beam.score):8.3f}  {text(beam.ids):34s} extends beam {beam.parent}, "
                  f"cache {name} ({how}, holds {beam.cache.length})")
        for h in finished:
            print(f"  kept      {h.score:8.3f}  {text(h.ids)}")

    print(f"prompt {args.prompt!r}: {len(prompt)} tokens, prefilled once into cache a")
    stats = BeamStats()
    best = beam_search(model, prompt, args.max_tokens, args.num_beams, stop_ids, length_penalty=1.0,
                       repetition_penalty=args.repeat_penalty, stats=stats, on_step=show)[0]
    print(f"beam search ({args.num_beams} beams): {text(best.ids)}, log-prob {log_prob_of(model, prompt, list(best.ids)):.3f}"
          f" ({stats.forwards} one-token forwards, {stats.copied_positions} cache positions copied, stop: {stats.stop_reason})")
    greedy = list(model.generate(prompt, args.max_tokens, repetition_penalty=args.repeat_penalty))
    print(f"greedy:                {text(greedy)}, log-prob {log_prob_of(model, prompt, greedy):.3f}")


if __name__ == "__main__":
    main()
