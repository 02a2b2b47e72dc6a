"""The generation loop: stop ids, max tokens, context limits, stop strings, cache reuse."""

import numpy as np
import pytest
from safetensors.numpy import load_file

import minislm
from minislm.runtime import generate_ids, make_sampler, reuse_cached_prefix
from minislm.errors import MinislmError
from minislm.generate import GenerationStats, generate_text, generate_tokens, split_at_stop
from minislm.sampling import Sampler, SamplingSettings
from conftest import FIXTURES

GREEDY = SamplingSettings(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return minislm.load(FIXTURES / "mha")


def run(model, prompt, max_new, stop_ids=(), stats=None, settings=GREEDY, seed=None):
    return list(generate_tokens(model, prompt, max_new, Sampler(settings, seed=seed), stop_ids, stats=stats))


def test_generation_stops_after_a_generation_config_stop_id(model):
    """The mha fixture's greedy continuation (from transformers) ends early on a stop id
    listed only in generation_config.json, not config.json's eos."""
    reference = load_file(FIXTURES / "mha" / "reference.safetensors")
    expected = reference["greedy.tokens"].tolist()
    assert len(expected) < 20 and expected[-1] in model.generation_config.eos_token_ids
    assert expected[-1] not in model.config.eos_token_ids
    stats = GenerationStats()
    tokens = run(model, reference["greedy.prompt"], 20, model.generation_config.eos_token_ids, stats)
    assert tokens == expected and stats.stop_reason == "eos"


def test_max_tokens_is_exact_without_stop_ids(model):
    stats = GenerationStats()
    assert len(run(model, [1, 50, 60], 17, stop_ids=(), stats=stats)) == 17
    assert stats.stop_reason == "length" and stats.generated_tokens == 17 and stats.prompt_tokens == 3
    assert run(model, [1, 50, 60], 0) == []


def test_generation_ends_when_the_context_is_full(model):
    context = model.config.max_position_embeddings
    prompt = np.arange(context - 3) % 300
    stats = GenerationStats()
    tokens = run(model, prompt, 50, stats=stats)
    assert len(prompt) + len(tokens) == context and stats.stop_reason == "context"


def test_a_prompt_that_fills_the_context_is_refused(model):
    """Checked at the boundary (runtime.generate_ids), before any forward."""
    context = model.config.max_position_embeddings
    with pytest.raises(MinislmError, match="context"):
        generate_ids(model, np.arange(context) % 300, 5, make_sampler(model, GREEDY, None))


def test_same_seed_same_tokens(model):
    sampled = SamplingSettings(temperature=1.0, top_k=50)
    first = run(model, [1, 40, 41], 30, settings=sampled, seed=3)
    assert first == run(model, [1, 40, 41], 30, settings=sampled, seed=3)
    assert first != run(model, [1, 40, 41], 30, settings=sampled, seed=4)


def test_stop_string_ends_the_text_and_is_not_printed(model):
    ids = model.tokenizer.encode("say hello STOP and more", add_bos=False)
    stats = GenerationStats()
    pieces = list(generate_text(model.tokenizer, (i for i in ids), ["STOP"], stats))
    assert "".join(pieces) == "say hello "
    assert stats.stop_reason == "stop string"
    assert not any("S" in p for p in pieces)  # never half a stop string on screen


def test_text_that_only_resembles_a_stop_string_is_printed_in_full(model):
    ids = model.tokenizer.encode("a STONE STOP", add_bos=False)
    assert "".join(generate_text(model.tokenizer, (i for i in ids), ["STOP!"])) == "a STONE STOP"


@pytest.mark.parametrize(
    "text, stops, expected",
    [("abc", ["x"], ("abc", "", False)), ("abcST", ["STOP"], ("abc", "ST", False)), ("abSTOPcd", ["STOP", "cd"], ("ab", "", True))],
)
def test_split_at_stop(text, stops, expected):
    assert split_at_stop(text, stops) == expected


def test_chat_cache_reuse_gives_the_same_tokens_as_a_fresh_cache(model):
    """Turn 2 reuses turn 1's cache for the shared prefix; the reply must be what a
    fresh forward over the whole conversation gives."""
    tok = model.tokenizer
    messages = [{"role": "user", "content": "hello there"}]
    turn1 = tok.encode_chat(messages)
    cache = model.new_cache(128)
    reply = list(generate_tokens(model, turn1, 6, Sampler(GREEDY), (), cache=cache))
    messages += [{"role": "assistant", "content": tok.decode(reply)}, {"role": "user", "content": "again"}]
    turn2 = tok.encode_chat(messages)
    keep = reuse_cached_prefix(cache, turn2)
    assert keep >= len(turn1) and cache.length == keep  # at least all of turn 1 is reused
    reused = list(generate_tokens(model, turn2[keep:], 8, Sampler(GREEDY), (), cache=cache, history=turn2[:keep]))
    assert reused == run(model, turn2, 8)
