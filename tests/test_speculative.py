"""Speculative decoding (minislm/speculative.py): the same greedy tokens as plain
decoding, the same distribution when sampling, and a cache left as plain decoding
leaves it.

The reference for the distribution is the target model itself, enumerated exactly:
every continuation's probability is the product of its tokens' probabilities under
the sampler's last stage, each from a full forward of the text before it. The
sampled continuations, over many seeds, must match those probabilities (chi-square).
"""

import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from minislm.errors import MinislmError
from minislm.generate import GenerationStats
from minislm.kernels import Int8Weight
from minislm.load import BUNDLED_MODEL
from minislm.runtime import Model, allowed_ids, generate_ids, make_drafter, make_sampler, sampling_settings
from minislm.sampling import Sampler, SamplingSettings, probabilities
from minislm.speculative import PromptLookup, lookup, verify

PROMPTS = [
    "ROMEO:\n",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "KING:\nWhat say you? What say you? What say you? What",
]


def noisy_copy(path, scale: float, seed: int = 0) -> Model:
    """The same checkpoint with noise added to every matrix: a draft model with the
    target's tokenizer that disagrees with it often (and a different one per seed)."""
    model = minislm.load(path)
    rng = np.random.default_rng(seed)
    for name, w in model.weights.items():
        if isinstance(w, np.ndarray) and w.ndim == 2:
            model.weights[name] = (w + rng.normal(scale=scale * w.std(), size=w.shape)).astype(np.float32)
    return model


def int8_model(model: Model) -> Model:
    """Every matrix of a float32 model as Int8Weight (Q8_0's rule): the packed int8 path."""
    weights = {k: Int8Weight(w) if isinstance(w, np.ndarray) and w.ndim == 2 else w for k, w in model.weights.items()}
    return Model(model.config, weights, kv_cache="float32", tokenizer=model.tokenizer,
                 generation_config=model.generation_config, path=model.path)


@pytest.fixture(scope="module")
def packed():
    """The shipped model on both packed paths, whose kernels return the same bits for
    one row and many, and a draft model that disagrees with it often."""
    int4 = minislm.load(BUNDLED_MODEL, quant="int4")
    return {"int4": int4, "int8": int8_model(minislm.load(BUNDLED_MODEL)),
            "draft": noisy_copy(BUNDLED_MODEL, 0.3)}


def run(model, ids, max_new, drafter=None, num_draft=4, cache=None, settings=None, seed=None, extra=()):
    """(tokens, stats, cache) of one generation through the policy; `drafter` is
    make_drafter's (speculate, draft_model), `extra` more ids for prompt lookup."""
    settings = settings or sampling_settings(model)
    cache = cache if cache is not None else model.new_cache(min(model.config.max_position_embeddings, len(ids) + max_new))
    stats = GenerationStats()
    sampler = make_sampler(model, settings, seed)
    if drafter is not None:
        drafter = make_drafter(model, sampler, cache.capacity, *drafter, extra=extra)
    tokens = list(generate_ids(model, ids, max_new, sampler, cache=cache, stats=stats, drafter=drafter,
                               num_draft=num_draft))
    return tokens, stats, cache


@pytest.mark.parametrize("path", ["int4", "int8"])
@pytest.mark.parametrize("guesser", ["lookup", "draft model"])
def test_greedy_is_token_identical_to_plain_greedy_on_the_packed_paths(packed, path, guesser):
    """Same tokens, same stop reason, and the same cache afterwards, bit for bit: the
    rollback leaves exactly the positions plain decoding fills. 1, 4 and 7 guesses a step."""
    model = packed[path]
    drafter = ("lookup", None) if guesser == "lookup" else (None, packed["draft"])
    drafted = accepted = 0
    for text, num_draft in zip(PROMPTS, (1, 4, 7)):
        ids = model.tokenizer.encode(text)
        plain, plain_stats, plain_cache = run(model, ids, 60)
        spec, stats, cache = run(model, ids, 60, drafter, num_draft)
        assert spec == plain, text
        assert stats.stop_reason == plain_stats.stop_reason and stats.generated_tokens == len(plain)
        assert cache.length == plain_cache.length
        np.testing.assert_array_equal(cache.keys[:, :, : cache.length], plain_cache.keys[:, :, : cache.length])
        np.testing.assert_array_equal(cache.values[:, :, : cache.length], plain_cache.values[:, :, : cache.length])
        drafted, accepted = drafted + stats.drafted_tokens, accepted + stats.accepted_tokens
    assert 0 < accepted < drafted  # both the accept and the reject paths ran


def test_greedy_identity_holds_at_the_context_limit_and_at_an_end_of_sequence(packed):
    """A prompt that leaves 5 positions: speculation must stop at the context exactly
    where plain decoding stops; and a cache shared across turns (a chat) stays usable."""
    model = packed["int4"]
    context = model.config.max_position_embeddings
    ids = (model.tokenizer.encode(PROMPTS[2]) * 100)[: context - 5]
    plain, plain_stats, _ = run(model, ids, 50)
    spec, stats, _ = run(model, ids, 50, ("lookup", None), 4)
    assert spec == plain and stats.stop_reason == plain_stats.stop_reason == "context"

    cache_a, cache_b = model.new_cache(200), model.new_cache(200)
    history = model.tokenizer.encode(PROMPTS[0])
    for turn in ("What?\n", "Speak again.\n"):
        new = model.tokenizer.encode(turn, add_bos=False)
        a, _, _ = run(model, history + new if cache_a.length == 0 else new, 30, cache=cache_a)
        b, _, _ = run(model, history + new if cache_b.length == 0 else new, 30, ("lookup", None), 3, cache=cache_b)
        assert a == b and cache_a.length == cache_b.length
        history = history + new + a


def test_prompt_lookup_guesses_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2], k=3, max_ngram=3) == [3, 7, 8]  # latest "1 2"
    assert lookup([4, 5, 6, 4, 5], k=5, max_ngram=3) == [6, 4, 5]  # runs up to the text's end
    assert lookup([1, 2, 3], k=2, max_ngram=3) == []  # nothing earlier matches
    assert lookup([7, 1, 2, 9, 8, 7], k=2, max_ngram=3) == [1, 2]  # falls back to one token
    assert PromptLookup(extra=[5, 6, 7]).propose([1, 5], 2).tokens == [6, 7]  # a prediction is searched too


# ---------------------------------------------------------------- the distribution


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square value exceeded with probability ~1e-4 (z = 3.719 standard normal),
    by Wilson and Hilferty's cube-root approximation (within 1 % for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    """(statistic, degrees of freedom) over cells expected >= 5 times; the rest pooled."""
    big = [key for key, p in expected.items() if p * n >= 5]
    observed = [counts.get(key, 0) for key in big]
    wanted = [expected[key] * n for key in big]
    rest_observed, rest_wanted = n - sum(observed), n - sum(wanted)
    if rest_wanted >= 5:
        observed.append(rest_observed)
        wanted.append(rest_wanted)
    observed, wanted = np.array(observed, float), np.array(wanted)
    return float(((observed - wanted) ** 2 / wanted).sum()), len(wanted) - 1


def test_the_rejection_rule_leaves_the_target_distribution():
    """verify() alone, on made-up p and q, each enumerated: the token it returns is
    distributed as p whatever q is, for a drafted guess and a one-hot (lookup) guess."""
    p = np.array([0.4, 0.3, 0.2, 0.1, 0.0])
    q = np.array([0.05, 0.05, 0.3, 0.3, 0.3])  # disagrees: most guesses get rejected
    sampler = Sampler(SamplingSettings(temperature=1.0), seed=0)
    guesses = np.random.default_rng(1)
    with np.errstate(divide="ignore"):
        stages = sampler.stages(np.log(p))
    n = 20000
    for kind in ("drawn from q", "one-hot at 3"):
        counts = np.zeros(5)
        rejected = 0
        for _ in range(n):
            guess, q_used = (int(guesses.choice(5, p=q)), q) if kind == "drawn from q" else (3, None)
            accepted, token = verify(sampler, stages, guess, q_used)
            counts[token] += 1
            rejected += not accepted
        assert counts[4] == 0  # p = 0: never, even when guessed
        statistic, df = chi_square(dict(enumerate(counts)), dict(enumerate(p)), n)
        assert statistic < chi_square_critical(df), (kind, counts / n)
        assert rejected > n / 4, kind


def exact_continuations(model, prompt, settings, max_new, stops) -> dict:
    """Every continuation of up to `max_new` tokens (ending early at a stop id) with its
    exact probability under the target: products of last-stage probabilities, each from a
    full forward (no cache, no speculation)."""
    sampler = Sampler(settings, allowed_ids=allowed_ids(model))
    out = {}

    def walk(prefix, probability):
        if len(prefix) == max_new or (prefix and prefix[-1] in stops):
            out[tuple(prefix)] = probability
            return
        seq = list(prompt) + prefix
        p = probabilities(sampler.stages(model.logits(seq)[-1], seq)[-1].logits)
        for token in np.flatnonzero(p):
            walk(prefix + [int(token)], probability * p[token])

    walk([], 1.0)
    return out


@pytest.mark.parametrize("guesser", ["draft model", "lookup"])
def test_sampled_continuations_follow_the_targets_exact_distribution(guesser):
    """4 tokens with top-k 3 and a repetition penalty, over 3000 seeds, against the
    enumerated probabilities of the at most 81 continuations (chi-square, p = 1e-4).
    The draft model is the target with noise; prompt lookup looks in 40 of the
    target's own continuations (a `prediction`), so its guesses are often plausible
    but often wrong. Both must be rejected often for the test to mean something."""
    target = minislm.load(FIXTURES / "gqa")
    draft = noisy_copy(FIXTURES / "gqa", 0.1, seed=3)
    settings = SamplingSettings(temperature=1.0, top_k=3, repetition_penalty=1.3)
    prompt = [5, 17, 42]
    extra = [t for seed in range(40) for t in run(target, prompt, 6, settings=settings, seed=10_000 + seed)[0]]
    stops = set(target.generation_config.eos_token_ids)
    expected = exact_continuations(target, prompt, settings, 4, stops)
    assert abs(sum(expected.values()) - 1) < 1e-9
    counts, drafted, accepted = {}, 0, 0
    n = 3000
    for seed in range(n):
        tokens, stats, _ = run(target, prompt, 4, ("lookup", None) if guesser == "lookup" else (None, draft), 2,
                               settings=settings, seed=seed, extra=extra if guesser == "lookup" else ())
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
        drafted, accepted = drafted + stats.drafted_tokens, accepted + stats.accepted_tokens
    assert set(counts) <= set(expected)
    statistic, df = chi_square(counts, expected, n)
    assert df >= 10 and statistic < chi_square_critical(df), (statistic, df)
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)


# ---------------------------------------------------------------- refusals


def test_a_draft_model_with_another_vocabulary_is_refused():
    target = minislm.load(BUNDLED_MODEL)
    other = minislm.load(FIXTURES / "gqa")
    with pytest.raises(MinislmError, match="draft model .*vocabulary|tokenizer differs"):
        target.generate([1, 2, 3], 5, draft_model=other)


def test_speculation_arguments_are_checked_when_called():
    model = minislm.load(FIXTURES / "gqa")
    with pytest.raises(ValueError, match="speculate='ngram'"):
        model.generate([1, 2], 5, speculate="ngram")
    with pytest.raises(ValueError, match="num_draft"):
        model.generate([1, 2], 5, speculate="lookup", num_draft=0)
    with pytest.raises(ValueError, match="choose one"):
        model.generate([1, 2], 5, speculate="lookup", draft_model=model)
    with pytest.raises(ValueError, match="not beam search"):
        model.generate([1, 2], 5, num_beams=2, speculate="lookup")
