"""The sampler: each filter on a hand-checked example, then seeds and distributions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.errors import MinislmError
from minislm.sampling import (
    Sampler,
    SamplingSettings,
    is_sampled,
    log_probabilities,
    min_p_filter,
    probabilities,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)

# probabilities 0.5, 0.3, 0.15, 0.05
LOGITS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


def kept(logits):
    return set(np.flatnonzero(np.isfinite(logits)).tolist())


def test_greedy_is_argmax_whatever_the_seed():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    for seed in range(5):
        assert Sampler(SamplingSettings(temperature=0.0), seed=seed)(logits) == int(np.argmax(logits))


def test_top_k_keeps_the_k_best():
    assert kept(top_k_filter(LOGITS, 1)) == {0}
    assert kept(top_k_filter(LOGITS, 3)) == {0, 1, 2}
    assert kept(top_k_filter(LOGITS, 10)) == {0, 1, 2, 3}


@pytest.mark.parametrize("p, expected", [(0.4, {0}), (0.5, {0}), (0.7, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(LOGITS, p)) == expected


def test_min_p_is_relative_to_the_best_token():
    # 0.3 / 0.5 = 0.6, 0.15 / 0.5 = 0.3, 0.05 / 0.5 = 0.1
    assert kept(min_p_filter(LOGITS, 0.5)) == {0, 1}
    assert kept(min_p_filter(LOGITS, 0.2)) == {0, 1, 2}
    assert kept(min_p_filter(LOGITS, 0.05)) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 2.0, -2.0])
    out = repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0]


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.random.default_rng(1).normal(size=50)
    settings = SamplingSettings(temperature=1.0)

    def draws(seed):
        sampler = Sampler(settings, seed=seed)
        return [sampler(logits) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_sampling_follows_the_softmax_distribution():
    sampler = Sampler(SamplingSettings(temperature=1.0), seed=0)
    n = 20000
    counts = np.bincount([sampler(LOGITS) for _ in range(n)], minlength=4) / n
    # binomial standard error at n=20000 is <= 0.0036; 0.015 is > 4 sigma
    assert np.abs(counts - probabilities(LOGITS)).max() < 0.015


def test_temperature_sharpens_and_flattens():
    n = 5000
    cold = Sampler(SamplingSettings(temperature=0.3), seed=0)
    hot = Sampler(SamplingSettings(temperature=3.0), seed=0)
    cold_top = np.mean([cold(LOGITS) == 0 for _ in range(n)])
    hot_top = np.mean([hot(LOGITS) == 0 for _ in range(n)])
    assert cold_top > 0.8 > 0.5 > hot_top


def test_ids_beyond_the_tokenizer_are_never_sampled():
    logits = np.zeros(10)
    logits[8:] = 50.0  # padded embedding rows with huge logits
    for temperature in (0.0, 1.0):
        sampler = Sampler(SamplingSettings(temperature=temperature), seed=0, allowed_ids=8)
        assert all(sampler(logits) < 8 for _ in range(200))


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1), dict(temperature=float("inf")), dict(temperature=float("nan")),
        dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")), dict(top_k=-1), dict(top_k=2.5),
        dict(min_p=2.0), dict(repetition_penalty=0.0), dict(repetition_penalty=float("inf")),
        dict(temperature="0.7"), dict(top_k=True),
    ],
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingSettings(**bad)


def test_top_k_zero_means_off_as_in_transformers():
    logits = np.arange(10, dtype=np.float32)
    off, none = Sampler(SamplingSettings(temperature=1.0, top_k=0), seed=3), Sampler(SamplingSettings(temperature=1.0), seed=3)
    assert [off(logits) for _ in range(50)] == [none(logits) for _ in range(50)]


@pytest.mark.parametrize("seed", [-2, 1.5, "7"])
def test_invalid_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        Sampler(SamplingSettings(), seed=seed)


def test_seed_minus_one_means_a_random_seed_as_in_llama_cpp():
    logits = np.zeros(1000, dtype=np.float32)  # uniform: two random runs of 20 draws differ
    runs = {tuple(Sampler(SamplingSettings(temperature=1.0), seed=-1)(logits) for _ in range(20)) for _ in range(2)}
    assert len(runs) == 2


def test_cli_flags_fall_back_to_generation_config_like_transformers():
    """Unset flags take generation_config.json's values when it sets do_sample; explicit
    flags win; without do_sample decoding is greedy (repetition_penalty applies anyway)."""
    from argparse import Namespace
    from dataclasses import replace

    import minislm
    from minislm.commands import sampler_for
    from conftest import FIXTURES

    model = minislm.load(FIXTURES / "gqa")
    unset = Namespace(temp=None, top_k=None, top_p=None, min_p=None, repeat_penalty=None, seed=0)
    assert sampler_for(unset, model).settings == SamplingSettings(temperature=0.0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)

    model.generation_config = replace(model.generation_config, do_sample=True, temperature=0.7, top_k=5, repetition_penalty=1.1)
    s = sampler_for(unset, model).settings
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (0.7, 5, 1.0, 1.1)
    s = sampler_for(Namespace(**{**vars(unset), "temp": 0.0, "top_k": 0}), model).settings
    assert (s.temperature, s.top_k) == (0.0, None)

    model.generation_config = replace(model.generation_config, do_sample=False)
    s = sampler_for(unset, model).settings
    assert (s.temperature, s.top_k, s.repetition_penalty) == (0.0, None, 1.1)


# ---------------------------------------------------------------- floating point at the edges


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-300])
def test_a_temperature_that_underflows_acts_as_greedy(temperature):
    """logits / 1e-310 are infinities, and inf - inf is NaN: such a temperature is the
    coldest there is, so it returns the argmax (1e-300 still divides finitely, into a
    distribution with all its mass on the argmax)."""
    logits = 5 * np.random.default_rng(0).normal(size=100)
    logits[90:] = 50.0  # padding rows past the tokenizer, more likely than any real id
    for seed in range(20):
        sampler = Sampler(SamplingSettings(temperature=temperature, top_p=0.9), seed=seed, allowed_ids=90)
        assert sampler(logits) == int(np.argmax(logits[:90]))


def test_nan_logits_are_refused_greedy_or_sampled():
    logits = np.zeros(10)
    logits[3] = np.nan  # np.argmax would pick it, and the softmax would be NaN everywhere
    for temperature in (0.0, 1.0):
        with pytest.raises(MinislmError, match="NaN"):
            Sampler(SamplingSettings(temperature=temperature), seed=0)(logits)


def test_a_repetition_penalty_that_overflows_yields_no_nan():
    """Dividing a positive logit by 1e-310 gives +inf; several +inf logits have no softmax,
    so the first of them is the greedy choice. Multiplying negative ones by 1e308 gives
    -inf for all: their order from before the penalty decides."""
    logits = np.array([1.0, 2.0, -1.0, 0.5])
    tiny = Sampler(SamplingSettings(temperature=1.0, repetition_penalty=1e-310), seed=0)
    assert tiny(logits, previous_ids=[3, 0]) == 0
    huge = Sampler(SamplingSettings(temperature=1.0, repetition_penalty=1e308), seed=0)
    assert huge(-np.abs(logits), previous_ids=[0, 1, 2, 3]) == 3


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(st.floats(allow_nan=False), min_size=1, max_size=12),
    allowed=st.integers(1, 12),
    temperature=st.one_of(st.just(0.0), st.floats(5e-324, 1e300)),
    penalty=st.one_of(st.none(), st.floats(5e-324, 1e308)),
    top_k=st.integers(0, 5), top_p=st.floats(1e-9, 1.0), min_p=st.floats(0.0, 1.0), seed=st.integers(0, 100),
    previous=st.lists(st.integers(0, 11), max_size=4),
)
def test_the_sampler_returns_an_allowed_id_that_had_a_chance_or_refuses(logits, allowed, temperature, penalty,
                                                                     top_k, top_p, min_p, seed, previous):
    """Whatever the numbers (infinities, huge and subnormal values, extreme settings):
    an id below allowed_ids whose logit was not -inf, with probability > 0 in the last
    stage, every stage's probabilities finite, summing to 1 and 0 past allowed_ids; or,
    when no allowed id has one, a one-line error."""
    logits = np.array(logits)
    previous = [i for i in previous if i < logits.size]
    sampler = Sampler(SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=penalty), seed=seed, allowed_ids=allowed)
    if not (logits[:allowed] > -np.inf).any():
        with pytest.raises(MinislmError, match="nothing to sample"):
            sampler(logits, previous)
        return
    token = sampler(logits, previous)
    assert 0 <= token < min(allowed, logits.size) and logits[token] > -np.inf
    stages = sampler.stages(logits, previous)
    with np.errstate(over="ignore"):
        for stage in stages:
            p = probabilities(stage.logits)
            assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-9 and not p[allowed:].any(), stage.name
        assert probabilities(stages[-1].logits)[sampler.choose(stages)] > 0


def test_the_library_and_the_cli_sample_no_padding_at_a_tiny_temperature(capsys):
    """Model.generate and `minislm generate` at temperature 1e-310 give the greedy text; before,
    NaN probabilities made them pick the shipped model's last padding id, 4159, forever."""
    import minislm
    from minislm.cli import main
    from minislm.load import BUNDLED_MODEL
    from minislm.runtime import allowed_ids

    model = minislm.load(BUNDLED_MODEL)
    ids = model.tokenizer.encode("ROMEO:")
    cold = [list(model.generate(ids, 12, temperature=1e-310, seed=seed)) for seed in (0, 1)]
    assert cold[0] == cold[1] == list(model.generate(ids, 12))
    assert max(cold[0]) < allowed_ids(model)
    texts = []
    for temp in ("1e-310", "0"):
        assert main(["generate", "--no-chat-template", "-n", "12", "--temp", temp, "--seed", "5", "ROMEO:"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


# ---------------------------------------------------------------- the per-stage view


def names(stages):
    return [stage.name for stage in stages]


def test_stages_come_in_transformers_order_each_one_its_processor_applied():
    """repetition penalty, temperature, top-k, top-p, min-p: each stage is the previous
    one with its processor applied (the functions checked by hand above)."""
    logits = np.log(np.array([0.4, 0.25, 0.2, 0.1, 0.05]))
    settings = SamplingSettings(temperature=0.5, top_k=4, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    stages = Sampler(settings, seed=0).stages(logits, previous_ids=[1, 1, 3])
    assert names(stages) == ["logits", "repetition_penalty", "temperature", "top_k", "top_p", "min_p"]
    expected = logits
    for stage, step in zip(stages, [lambda x: x, lambda x: repetition_penalty(x, [1, 3], 1.3), lambda x: x / 0.5,
                                    lambda x: top_k_filter(x, 4), lambda x: top_p_filter(x, 0.9),
                                    lambda x: min_p_filter(x, 0.05)]):
        expected = step(expected)
        np.testing.assert_array_equal(stage.logits, expected)
        assert stage.logits.dtype == np.float64 and stage.logits.shape == (5,)


@pytest.mark.parametrize(
    "settings, expected",
    [
        (SamplingSettings(temperature=0.0), ["logits"]),
        (SamplingSettings(temperature=0.0, repetition_penalty=1.2, top_k=3), ["logits", "repetition_penalty"]),
        (SamplingSettings(temperature=1.0), ["logits", "temperature"]),  # 1.0 is still sampling
        (SamplingSettings(temperature=1e-310, top_p=0.5), ["logits"]),  # underflows: greedy
        (SamplingSettings(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0), ["logits", "temperature"]),
    ],
)
def test_a_processor_that_is_off_adds_no_stage_and_greedy_ends_before_temperature(settings, expected):
    stages = Sampler(settings, seed=0).stages(LOGITS, previous_ids=[0])
    assert names(stages) == expected
    assert is_sampled(stages) == ("temperature" in expected)


def test_the_call_is_a_draw_from_the_last_stage_or_its_argmax():
    """Same seed: __call__ and choose(stages(...)) give the same ids, draw for draw; greedy
    settings give the argmax of the last stage (here after the penalty moved it)."""
    logits = np.random.default_rng(2).normal(size=40)
    settings = SamplingSettings(temperature=0.8, top_k=10, top_p=0.95)
    a, b = Sampler(settings, seed=11), Sampler(settings, seed=11)
    assert [a(logits, [3]) for _ in range(50)] == [b.choose(b.stages(logits, [3])) for _ in range(50)]
    penalized = Sampler(SamplingSettings(temperature=0.0, repetition_penalty=50.0), seed=0)
    best = int(np.argmax(logits))
    stages = penalized.stages(logits, previous_ids=[best])
    assert penalized(logits, [best]) == int(np.argmax(stages[-1].logits)) != best


def test_draws_follow_the_last_stages_distribution():
    settings = SamplingSettings(temperature=0.7, top_p=0.8)
    sampler = Sampler(settings, seed=0)
    p = probabilities(sampler.stages(LOGITS)[-1].logits)
    n = 20000
    counts = np.bincount([sampler(LOGITS) for _ in range(n)], minlength=4) / n
    assert np.abs(counts - p).max() < 0.015  # > 4 binomial standard errors at n = 20000


def test_the_grammar_mask_is_a_stage_before_the_processors_and_is_obeyed():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    mask = np.array([False, True, False, True])
    sampler = Sampler(SamplingSettings(temperature=1.0, repetition_penalty=1.1), seed=0)
    stages = sampler.stages(logits, [1], grammar_mask=mask)
    assert names(stages) == ["logits", "grammar", "repetition_penalty", "temperature"]
    assert kept(stages[1].logits) == {1, 3}
    assert {sampler(logits, [1], grammar_mask=mask) for _ in range(300)} == {1, 3}
    assert Sampler(SamplingSettings(), seed=0)(logits, grammar_mask=mask) == 1
    with pytest.raises(MinislmError, match="JSON schema allows no token"):
        sampler(logits, grammar_mask=np.zeros(4, bool))


def test_log_probabilities_are_the_log_of_probabilities_without_underflow():
    logits = np.array([0.0, -800.0, -np.inf, 3.0])
    logp = log_probabilities(logits)
    assert logp[2] == -np.inf and np.isfinite(logp[[0, 1, 3]]).all()  # exp(-800) underflows; its log does not
    np.testing.assert_allclose(np.exp(logp), probabilities(logits), rtol=1e-12, atol=0)
    assert probabilities(np.array([1.0, np.inf, np.inf])).tolist() == [0.0, 0.5, 0.5]


def test_the_stages_match_transformers_logits_processors():
    """transformers' own processors, in the order its generate() builds them, give the
    last stage's logits (the reference for the order and for each filter's edge rules)."""
    from conftest import import_reference

    torch, transformers = import_reference()
    from transformers.generation import logits_process as lp

    rng = np.random.default_rng(5)
    for trial in range(20):
        logits = rng.normal(scale=3, size=64)
        previous = rng.integers(0, 64, size=10)
        settings = SamplingSettings(temperature=float(rng.uniform(0.3, 1.5)), top_k=int(rng.integers(0, 20)),
                                    top_p=float(rng.uniform(0.3, 1.0)), min_p=float(rng.uniform(0, 0.2)),
                                    repetition_penalty=float(rng.uniform(1.0, 1.5)))
        processors = [lp.RepetitionPenaltyLogitsProcessor(settings.repetition_penalty),
                      lp.TemperatureLogitsWarper(settings.temperature)]
        if settings.top_k:
            processors.append(lp.TopKLogitsWarper(settings.top_k))
        processors += [lp.TopPLogitsWarper(settings.top_p), lp.MinPLogitsWarper(settings.min_p)]
        scores = torch.tensor(logits[None], dtype=torch.float64)
        input_ids = torch.tensor(previous[None])
        for processor in processors:
            scores = processor(input_ids, scores)
        ours = Sampler(settings, seed=0).stages(logits, previous)[-1].logits
        np.testing.assert_array_equal(np.isfinite(ours), torch.isfinite(scores[0]).numpy(), err_msg=f"trial {trial}")
        kept_ids = np.isfinite(ours)
        # float64 both sides; the order of operations differs only in the division
        np.testing.assert_allclose(ours[kept_ids], scores[0].numpy()[kept_ids], rtol=1e-12)
