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
import dataclasses
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import minislm
import minislm.runtime
import minislm.model
from minislm.load import BUNDLED_MODEL
from minislm.generate import generate_tokens
from minislm.perplexity import log_softmax, score_text
from minislm.runtime import make_sampler, sampling_settings
from minislm.sampling import Sampler, SamplingSettings, probabilities
from minislm.trace import Recorder
from minislm.watch import session

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


# ---------------------------------------------------------------- the broken twins


def apply_rope_adjacent(x, cos, sin):
    """model.apply_rope with llama2.c's pairs (2i, 2i+1) instead of (i, i + d/2)."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    c, s = cos[:, : d // 2], sin[:, : d // 2]  # frequency i turns pair i
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
    out = np.empty_like(x_rot)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return np.concatenate([out, x_pass], axis=-1)


def attention_mask_without_causality(q_positions, n_keys, sliding_window):
    """model.attention_mask that lets every query read every key."""
    return np.ones((len(q_positions), n_keys), dtype=bool)


def reuse_cached_prefix_keeping_stale(cache, ids, image_features=None):
    """runtime.reuse_cached_prefix without its `cache.truncate(keep)`."""
    return min(cache.shared_prefix(ids, image_features), len(ids) - 1)


def mixtral_top2(scores, jitter_eps):
    """moe.sparsemixer replaced by Mixtral's router: the two best experts, softmax over their scores."""
    experts = np.argsort(-scores, axis=-1, kind="stable")[:, :2]  # (T, 2)
    top = np.take_along_axis(scores, experts, axis=-1)
    weights = np.exp(top - top[:, :1])
    return experts, (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


@contextmanager
def knocked_out(model, layer: int):
    """Layer `layer` adds nothing to the residual stream: its o_proj and down_proj are zero."""
    weights = model.weights
    ablated = dict(weights)
    for name in (f"model.layers.{layer}.self_attn.o_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight"):
        ablated[name] = np.zeros_like(weights[name])
    model.weights = ablated
    try:
        yield
    finally:
        model.weights = weights


# ---------------------------------------------------------------- the exercises


def rope_pairs():
    """Pair RoPE's dimensions as (2i, 2i+1), llama2.c's convention, instead of (i, i + d/2)."""
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
    """Keep cached tokens the next prompt does not share (reuse_cached_prefix without its truncate)."""
    model = shipped()
    a = model.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")
    b = model.tokenizer.encode("JULIET: O Romeo, Romeo, wherefore art thou Romeo?")
    cache = model.new_cache(len(a) + len(b))
    model.forward(a, cache)
    keep = reuse_cached_prefix_keeping_stale(cache, b)  # the two share <s> only
    stale = model.lm_head(model.forward(b[keep:], cache))  # after all of ROMEO's line, at positions 17..
    fresh = model.logits(b)[keep:]
    new = b[keep:]
    nll = lambda logits: -float(log_softmax(logits[:-1])[np.arange(len(new) - 1), new[1:]].mean())  # noqa: E731
    print(f"  JULIET's line shares {keep} token (<s>) with the cache; its other {len(new)} tokens go after all "
          f"{cache.length - len(new)} cached ones instead of after the first")
    print(f"  max |logit difference| over those {len(new)} positions: {np.abs(stale - fresh).max():.2f}")
    print(f"  top-1 prediction differs at {(stale.argmax(-1) != fresh.argmax(-1)).sum()} of {len(new)} positions")
    print(f"  nats per token of JULIET's line: fresh cache {nll(fresh):.3f}, stale cache {nll(stale):.3f}")


def top2_softmax():
    """Route PhiMoE with Mixtral's top-2 softmax instead of sparsemixer (the `moe` fixture, eps 0.01)."""
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
    for i in range(model.config.num_hidden_layers):
        with knocked_out(model, i):
            print(f"  without layer {i}: {score_text(model, text).nats_per_char:.3f} nats/char")


# ---------------------------------------------------------------- generation, as the explorer shows it
#
# These three change no code: a setting, the KV cache's dtype, a line of config.json.
# Each measures what `python -m minislm explore` shows for it, with the explorer's own
# session (minislm/watch/session.py): the sampling panel's stages, the cache's error
# per position, the lens's measures, the attention of each new query.


def top_p_survivors():
    """How many ids top-p 0.9 keeps as the temperature rises (the explorer's sampling panel)."""
    model = shipped()
    for prompt in ("ROMEO:", "ROMEO: But soft, what light through yonder window"):
        ids = model.tokenizer.encode(prompt)
        logits = model.logits(ids)[-1]
        counts = []
        for temp in (0.5, 0.8, 1.0, 1.5):
            settings = sampling_settings(model, temperature=temp, top_p=0.9)
            stages = {s.name: s for s in make_sampler(model, settings, 0).stages(logits, ids)}
            top = probabilities(stages["temperature"].logits).max()
            counts.append(f"T {temp}: {np.count_nonzero(stages['top_p'].logits > -np.inf):>4} ids (top one {top:.2f})")
        print(f"  after {prompt[-20:]!r:<24} " + ", ".join(counts))


def explore_greedy(model, prompt: str, n: int):
    """The explorer's session after `prompt` and n greedy steps (the shipped model's settings)."""
    run = session.start(model, model.tokenizer.encode(prompt), *session.settings_from(model, {}))
    for _ in range(n):
        session.step(run)
    return run


def int8_cache_lens():
    """Keep the KV cache in int8 instead of float32 and look at the lens (the explorer's cache and lens panels)."""
    prompt, n = "ROMEO: But soft, what light", 40
    runs = {dtype: explore_greedy(minislm.load(BUNDLED_MODEL, kv_cache=dtype), prompt, n) for dtype in ("float32", "int8")}
    a, b = runs["float32"], runs["int8"]
    start = a.prompt_length
    same = first_difference(a.ids[start:].tolist(), b.ids[start:].tolist())
    print(f"  greedy tokens after {prompt!r}: the first {same} of {n} agree")
    for dtype, run in runs.items():
        error = run.kv_error[: run.cache.length]
        print(f"  {dtype:<7}: {run.cache.bytes_per_position} bytes a position; the largest error of a stored key "
              f"{error[:, 0].max():.3g}, of a value {error[:, 1].max():.3g}")
    shared = start + same  # positions whose inputs are the same ids in both runs
    cells = (a.lens["top_ids"][:, :shared] == b.lens["top_ids"][:, :shared]).mean()
    kl = np.abs(a.lens["kl_to_final"][:, :shared] - b.lens["kl_to_final"][:, :shared])
    print(f"  the lens over the {shared} positions both runs share: the same top token in {cells:.1%} of "
          f"(layer, position) cells; |change of KL to the final| {kl.mean():.4f} nats on average, at most {kl.max():.3f}")


def sliding_window():
    """Give the shipped model a sliding window of 16 keys and watch where each new query looks."""
    window, prompt, n = 16, "ROMEO:", 40
    model = shipped()
    plain = explore_greedy(model, prompt, n)
    model.config = dataclasses.replace(model.config, sliding_window=window)  # config.json's "sliding_window": 16
    run = explore_greedy(model, prompt, n)
    L = model.config.num_hidden_layers
    first_key, sink = [], {True: [], False: []}
    queries = np.arange(run.prompt_length, run.cache.length)  # each decode step's query
    maps = np.stack([session.attention_rows(run, layer, queries) for layer in range(L)])  # (L, H, n, S)
    for n, q in enumerate(queries):
        rows = maps[:, :, n, : q + 1]  # (L, H, keys)
        oldest = max(0, q - window + 1)
        sink[oldest == 0].append(rows[:, :, 0].mean())
        first_key.append(rows[:, :, oldest].mean())
    visible = np.array([max(0, q - window + 1) == 0 for q in range(run.prompt_length, run.cache.length)])
    first_key = np.array(first_key)
    print(f"  {L} layers, window {window}: queries at positions {run.prompt_length}..{window - 1} still see <s>, "
          f"later ones do not")
    print(f"  attention on <s> while it is in the window: {np.mean(sink[True]):.2f} of each query's probability")
    print(f"  attention on the oldest key in the window after <s> left: {first_key[~visible].mean():.2f} "
          f"(on any other key: {1 / window:.2f} if spread evenly)")
    same = first_difference(plain.ids.tolist(), run.ids.tolist())
    print(f"  greedy tokens: the same as without a window up to position {same} (<s> leaves at position {window})")
    print(f"    with the window: {model.tokenizer.decode(run.ids[run.prompt_length:].tolist())[:70]!r}")


# ---------------------------------------------------------------- the hand edits of docs/exercises.md
#
# An exercise that changes code shows the change as a ```diff block: `--- path`, then
# lines kept (" "), removed ("-") and added ("+"). tests/test_exercises.py applies each
# to a copy of the package, runs one forward pass through the edited code (`probe`), and
# checks it gives what this script's broken twin gives: the figures above are then the
# figures of the edit a reader makes.


@dataclass(frozen=True)
class HandEdit:
    exercise: str  # the name this script gives it, e.g. "no-causal-mask"
    path: str  # relative to the repository, e.g. "minislm/model.py"
    before: str
    after: str


def hand_edits(markdown: str) -> list[HandEdit]:
    """Every ```diff block of docs/exercises.md, with the exercise whose section holds it
    (named by the section's `python tools/exercises.py NAME`)."""
    edits = []
    for section in re.split(r"\n## ", markdown)[1:]:
        name = re.search(r"python tools/exercises\.py ([\w-]+)", section)
        for block in re.findall(r"```diff\n(.*?)```", section, re.S):
            lines = block.splitlines()
            if not name or not lines[0].startswith("--- "):
                raise ValueError(f"docs/exercises.md: a diff block without its exercise or `--- path`: {block[:60]!r}")
            body = [line for line in lines[1:] if not line.startswith("+++ ")]
            before = [line[1:] for line in body if line[:1] in (" ", "-")]
            after = [line[1:] for line in body if line[:1] in (" ", "+")]
            edits.append(HandEdit(name.group(1), lines[0][4:].strip(), "\n".join(before) + "\n", "\n".join(after) + "\n"))
    return edits


def edited_copy(edit: HandEdit, dest: Path) -> Path:
    """dest/minislm: a copy of the package with `edit` applied, importable with dest first
    on sys.path. The shipped model and kernels/ are linked, not copied: no exercise edits
    them, and the kernels then find the Numba cache they already have."""
    package = dest / "minislm"
    shutil.copytree(ROOT / "minislm", package, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (package / "assets").symlink_to(ROOT / "minislm" / "assets")
    (package / "kernels").symlink_to(ROOT / "kernels")
    target = dest / edit.path
    source = target.read_text(encoding="utf-8")
    if source.count(edit.before) != 1:
        raise ValueError(f"{edit.exercise}: the lines to change occur {source.count(edit.before)} times "
                         f"in {edit.path}, not once:\n{edit.before}")
    target.write_text(source.replace(edit.before, edit.after), encoding="utf-8")
    return package


PROBE_LAYER = 2  # the layer exercise 8 skips


def probe_model(exercise: str):
    return minislm.load(MOE_FIXTURE) if exercise == "top2-softmax" else shipped()


def probe(exercise: str, model) -> np.ndarray:
    """Logits of one forward pass through the code `exercise` edits: the PhiMoE fixture's
    reference ids for the router, a second prompt after a first for the cache reuse,
    ROMEO's line otherwise."""
    if exercise == "top2-softmax":
        return model.logits(load_file(MOE_FIXTURE / "reference.safetensors")["case.seq.input_ids"])
    a = model.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")
    if exercise != "stale-cache":
        return model.logits(a)
    b = model.tokenizer.encode("JULIET: O Romeo, Romeo, wherefore art thou Romeo?")
    cache = model.new_cache(len(a) + len(b))
    model.forward(a, cache)
    keep = minislm.runtime.reuse_cached_prefix(cache, b)
    return model.lm_head(model.forward(b[keep:], cache))


def broken_twin(exercise: str, model):
    """This script's version of the exercise's edit, as a context manager."""
    if exercise == "knock-out-a-layer":
        return knocked_out(model, PROBE_LAYER)
    module, name, twin = {
        "rope-pairs": (minislm.model, "apply_rope", apply_rope_adjacent),
        "no-causal-mask": (minislm.model, "attention_mask", attention_mask_without_causality),
        "stale-cache": (minislm.runtime, "reuse_cached_prefix", reuse_cached_prefix_keeping_stale),
        "top2-softmax": (minislm.model, "sparsemixer", mixtral_top2),
    }[exercise]
    return replaced(module, name, twin)


EXERCISES: list[tuple[str, Callable]] = [
    ("rope-pairs", rope_pairs),
    ("no-causal-mask", no_causal_mask),
    ("stale-cache", stale_cache),
    ("top2-softmax", top2_softmax),
    ("no-bos", no_bos),
    ("temperature", temperature),
    ("int4-groups", int4_groups),
    ("knock-out-a-layer", knock_out_a_layer),
    ("top-p-survivors", top_p_survivors),
    ("int8-cache-lens", int8_cache_lens),
    ("sliding-window", sliding_window),
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
