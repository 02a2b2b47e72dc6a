"""Break it and watch: the exercises of docs/exercises.md, each run and measured.

    python tools/exercises.py                 # all of them
    python tools/exercises.py rope-pairs      # one (names: --list)

Each exercise changes one thing — a function of minislm.model swapped for a broken
twin for the duration of a `with` block, a weight zeroed, a setting changed — and
prints the figure that shows the damage, next to the same figure unbroken. Nothing
here changes minislm itself: the spine stays the plain recipe, and the breakage
lives only in this script.

Everything runs on the shipped model (or the PhiMoE fixture) and the held-out
Macbeth excerpt in tests/data, offline, in about a minute.
"""

import argparse
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import minislm
import minislm.model
from minislm.load import BUNDLED_MODEL
from minislm.generate import generate_tokens
from minislm.perplexity import log_softmax, score_text
from minislm.sampling import Sampler, SamplingSettings
from minislm.trace import Recorder

ROOT = Path(__file__).resolve().parent.parent
EXCERPT = ROOT / "tests" / "data" / "shakespeare_heldout.txt"
MOE_FIXTURE = ROOT / "tests" / "fixtures" / "moe"


@contextmanager
def replaced(module, name: str, replacement):
    """`module.name` is `replacement` inside the block (the spine looks functions up
    in its module at call time, so this is all a one-line edit of model.py does)."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def shipped():
    return minislm.load(BUNDLED_MODEL)


def excerpt() -> str:
    return EXCERPT.read_text(encoding="utf-8")


def greedy(model, prompt: str, n: int) -> list[int]:
    """n greedy tokens with the shipped model's repetition penalty (1.2), no stop ids."""
    sampler = Sampler(SamplingSettings(temperature=0.0, repetition_penalty=1.2))
    return list(generate_tokens(model, model.tokenizer.encode(prompt), n, sampler, stop_ids=()))


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def show(model, ids) -> str:
    return repr(model.tokenizer.decode(ids)[:70])


# ---------------------------------------------------------------- the exercises


def rope_pairs():
    """Pair RoPE's dimensions as (2i, 2i+1), llama2.c's convention, instead of (i, i + d/2)."""

    def apply_rope_adjacent(x, cos, sin):
        d = cos.shape[-1]
        x_rot, x_pass = x[..., :d], x[..., d:]
        c, s = cos[:, : d // 2], sin[:, : d // 2]  # frequency i turns pair i
        even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
        out = np.empty_like(x_rot)
        out[..., 0::2] = even * c - odd * s
        out[..., 1::2] = even * s + odd * c
        return np.concatenate([out, x_pass], axis=-1)

    model, text = shipped(), excerpt()
    base = score_text(model, text).nats_per_char
    right = greedy(model, "ROMEO:", 40)
    with replaced(minislm.model, "apply_rope", apply_rope_adjacent):
        broken = score_text(model, text).nats_per_char
        wrong = greedy(model, "ROMEO:", 40)
    print(f"  nats/char on the held-out excerpt: {base:.3f} rotate-half -> {broken:.3f} adjacent pairs")
    print(f"  greedy after 'ROMEO:': the first {first_difference(right, wrong)} of 40 tokens agree")
    print(f"    rotate-half:    {show(model, right)}")
    print(f"    adjacent pairs: {show(model, wrong)}")


def no_causal_mask():
    """Let every position attend to every other, the future included."""

    def attention_mask_without_causality(q_positions, n_keys, sliding_window):
        return np.ones((len(q_positions), n_keys), dtype=bool)

    model, text = shipped(), excerpt()
    ids = model.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")

    def run():
        trace = Recorder(names=("resid_post",), layers=[0])
        return score_text(model, text).nats_per_char, model.logits(ids, trace), trace.get("resid_post", 0)

    base_nll, base_logits, base_layer0 = run()
    with replaced(minislm.model, "attention_mask", attention_mask_without_causality):
        broken_nll, broken_logits, broken_layer0 = run()
    change = np.abs(broken_logits - base_logits).max(axis=-1)  # (T,)
    print(f"  nats/char on the held-out excerpt: {base_nll:.3f} causal -> {broken_nll:.3f} unmasked")
    print(f"  max |logit change| at position 0: {change[0]:.2f}; at the last position ({len(ids) - 1}): {change[-1]:.2f}")
    print(f"  the last position's stream after layer 0 changes by {np.abs(broken_layer0[-1] - base_layer0[-1]).max():.2g}: "
          "nothing comes after it, but from layer 1 on it reads keys and values of positions that peeked ahead")


def stale_cache():
    """Forget to empty the KV cache between two prompts (the chat REPL's /clear without truncate)."""
    model = shipped()
    a = model.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")
    b = model.tokenizer.encode("JULIET: O Romeo, Romeo, wherefore art thou Romeo?")
    fresh = model.logits(b)
    cache = model.new_cache(len(a) + len(b))
    model.forward(a, cache)
    stale = model.lm_head(model.forward(b, cache))  # b after a's keys and values, at positions 17..
    nll = lambda logits: -float(log_softmax(logits[:-1])[np.arange(len(b) - 1), b[1:]].mean())  # noqa: E731
    print(f"  max |logit difference| over JULIET's {len(b)} positions: {np.abs(stale - fresh).max():.2f}")
    print(f"  top-1 prediction differs at {(stale.argmax(-1) != fresh.argmax(-1)).sum()} of {len(b)} positions")
    print(f"  nats per token of JULIET's line: fresh cache {nll(fresh):.3f}, stale cache {nll(stale):.3f}")


def top2_softmax():
    """Route PhiMoE with Mixtral's top-2 softmax instead of sparsemixer (the `moe` fixture, eps 0.01)."""

    def mixtral_top2(scores, jitter_eps):
        experts = np.argsort(-scores, axis=-1, kind="stable")[:, :2]  # (T, 2)
        top = np.take_along_axis(scores, experts, axis=-1)
        weights = np.exp(top - top[:, :1])
        return experts, (weights / weights.sum(-1, keepdims=True)).astype(np.float32)

    model = minislm.load(MOE_FIXTURE)
    reference = load_file(MOE_FIXTURE / "reference.safetensors")  # transformers' own outputs
    ids, expected = reference["case.seq.input_ids"], reference["case.seq.logits"]

    def run():
        trace = Recorder(names=("experts", "expert_weights"))
        logits = model.logits(ids, trace)
        return logits, np.stack(trace.per_layer("experts")), np.stack(trace.per_layer("expert_weights"))

    logits, experts, weights = run()
    with replaced(minislm.model, "sparsemixer", mixtral_top2):
        broken, broken_experts, broken_weights = run()
    same = (broken_experts == experts).all(-1).mean(-1)  # (L,) share of tokens with the same two experts
    print(f"  max |logit - transformers'|: sparsemixer {np.abs(logits - expected).max():.1e}, "
          f"top-2 softmax {np.abs(broken - expected).max():.2f}")
    print(f"  tokens routed to the same two experts, per layer: {', '.join(f'{x:.0%}' for x in same)} "
          "(layer 0 sees the same input; later layers see the changed output of the one before)")
    print(f"  weights: sparsemixer's sum to {weights.sum(-1).mean():.2f} on average (not normalised), "
          f"top-2 softmax's to {broken_weights.sum(-1).mean():.2f}")
    print(f"  argmax agrees with transformers at {(broken.argmax(-1) == expected.argmax(-1)).mean():.0%} of positions "
          f"(sparsemixer: {(logits.argmax(-1) == expected.argmax(-1)).mean():.0%})")


def no_bos():
    """Drop the <s> token the tokenizer config asks for in front of every text."""
    model = shipped()
    lines = [line for line in excerpt().splitlines() if len(line.split()) >= 6][:80]
    nll = {True: 0.0, False: 0.0}
    sink = {True: [], False: []}
    count = 0
    for line in lines:
        ids = model.tokenizer.encode(line, add_bos=False)
        for bos in (True, False):
            trace = Recorder(names=("attn_probs",))
            logits = model.logits(([model.tokenizer.bos_id] if bos else []) + ids, trace)
            # the same predictions either way: text token k >= 1 from the positions before it
            nll[bos] -= log_softmax(logits[int(bos) : -1])[np.arange(len(ids) - 1), ids[1:]].sum()
            probs = np.stack(trace.per_layer("attn_probs"))  # (L, H, T, T)
            sink[bos].append(probs[:, :, 4:, 0].mean())  # attention on position 0 from position 4 on
        count += len(ids) - 1
    print(f"  nats per token over {count} tokens of {len(lines)} lines: with BOS {nll[True] / count:.3f}, "
          f"without {nll[False] / count:.3f}")
    print(f"  attention mass on position 0 (mean over layers, heads, positions >= 4): with BOS {np.mean(sink[True]):.2f} "
          f"(on <s>), without {np.mean(sink[False]):.2f} (on the first word)")


def temperature():
    """Sample at temperature 0 (greedy) and at 1.5."""
    model = shipped()
    known = set(re.findall(r"[a-z']+", excerpt().lower()))
    for temp, seeds in ((0.0, [0]), (0.8, [0, 1, 2]), (1.5, [0, 1, 2])):
        scores, shares = [], []
        for seed in seeds:
            sampler = Sampler(SamplingSettings(temperature=temp, repetition_penalty=1.2), seed=seed)
            tokens = list(generate_tokens(model, model.tokenizer.encode("ROMEO:"), 200, sampler, stop_ids=()))
            text = model.tokenizer.decode(tokens)
            words = re.findall(r"[a-z']+", text.lower())
            scores.append(score_text(model, text).nats_per_char)
            shares.append(np.mean([w in known for w in words]))
        print(f"  temperature {temp}: the model's own nats/char of its 200 tokens {np.mean(scores):.2f}; "
              f"words a held-out play also uses {np.mean(shares):.0%}  (seeds {seeds})")
        print(f"    {text[:90]!r}")


def int4_groups():
    """Quantize the weights to int4 with 32, 64 or 128 weights per scale."""
    text = excerpt()
    base = score_text(shipped(), text).nats_per_char
    print(f"  float32: {base:.4f} nats/char")
    for group in (32, 64, 128):
        model = minislm.load(BUNDLED_MODEL, quant="int4", group_size=group)
        value = score_text(model, text).nats_per_char
        print(f"  int4 group {group:>3}: {value:.4f} nats/char ({value / base - 1:+.1%})")


def knock_out_a_layer():
    """Zero one layer's o_proj and down_proj: its attention and MLP then add nothing to the stream."""
    model, text = shipped(), excerpt()
    base = score_text(model, text).nats_per_char
    print(f"  all layers: {base:.3f} nats/char")
    weights = model.weights
    for i in range(model.config.num_hidden_layers):
        ablated = dict(weights)
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            ablated[name] = np.zeros_like(weights[name])
        model.weights = ablated
        print(f"  without layer {i}: {score_text(model, text).nats_per_char:.3f} nats/char")
    model.weights = weights


EXERCISES: list[tuple[str, Callable]] = [
    ("rope-pairs", rope_pairs),
    ("no-causal-mask", no_causal_mask),
    ("stale-cache", stale_cache),
    ("top2-softmax", top2_softmax),
    ("no-bos", no_bos),
    ("temperature", temperature),
    ("int4-groups", int4_groups),
    ("knock-out-a-layer", knock_out_a_layer),
]


def main() -> int:
    names = [name for name, _ in EXERCISES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"exercises to run (default: all): {', '.join(names)}")
    parser.add_argument("--list", action="store_true", help="list the exercises and exit")
    args = parser.parse_args()
    if args.list:
        for name, run in EXERCISES:
            print(f"{name:<18} {run.__doc__.splitlines()[0]}")
        return 0
    unknown = set(args.names) - set(names)
    if unknown:
        parser.error(f"unknown exercises {sorted(unknown)}; known: {', '.join(names)}")
    for name, run in EXERCISES:
        if not args.names or name in args.names:
            print(f"{name}: {run.__doc__.splitlines()[0]}")
            run()
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
