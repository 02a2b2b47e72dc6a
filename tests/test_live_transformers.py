"""Live differential tests: random small Phi-3 configs, minislm vs transformers.

Hypothesis draws the architecture (heads, kv heads, head dim, layers, RoPE
variant, partial rotary, sliding window, tied embeddings) and the input; we
build the model with transformers, save it as a checkpoint, load it with
minislm, and compare logits, cached decoding and greedy tokens.
"""

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minislm
from conftest import (
    ATOL_FP32_LOGITS,
    FIXTURES,
    assert_cached_last_token_matches,
    assert_greedy_matches,
    import_reference,
    save_random_model,
)

torch, transformers = import_reference()


@st.composite
def phi3_configs(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 12, 16]))
    partial = draw(st.sampled_from([1.0, 0.5, 0.75]))
    if int(head_dim * partial) % 2:
        partial = 1.0
    config = dict(
        vocab_size=draw(st.integers(40, 200)),
        hidden_size=heads * head_dim,
        intermediate_size=draw(st.sampled_from([16, 48, 64])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        partial_rotary_factor=partial,
        rope_theta=draw(st.sampled_from([10000.0, 500.0, 250000.0])),
        sliding_window=draw(st.none() | st.integers(1, 24)),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if draw(st.booleans()):  # LongRoPE, with sequences on both sides of the switch
        original = draw(st.integers(8, 32))
        n = int(head_dim * partial) // 2
        factors = st.lists(st.floats(1.0, 8.0), min_size=n, max_size=n)
        config.update(
            original_max_position_embeddings=original,
            max_position_embeddings=original * 4,
            rope_scaling={"type": "longrope", "short_factor": draw(factors), "long_factor": draw(factors)},
        )
    return config


def build_checkpoint(config: dict, folder: Path, seed: int):
    """A transformers Phi3ForCausalLM with large random weights, saved as safetensors."""
    return save_random_model(transformers.Phi3ForCausalLM(transformers.Phi3Config(**config)), folder, seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=phi3_configs(), seq_len=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_random_configs_match_transformers(config, seq_len, seed):
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_checkpoint(config, Path(tmp), seed)
        ours = minislm.load(tmp)
        # Model.logits refuses ids past the context (transformers would run them)
        seq_len = min(seq_len, config["max_position_embeddings"])
        ids = np.random.default_rng(seed).integers(0, config["vocab_size"], seq_len)
        with torch.no_grad():
            expected = reference(torch.from_numpy(ids)[None]).logits[0].numpy()
        got = ours.logits(ids)
        assert np.abs(got - expected).max() <= ATOL_FP32_LOGITS
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        assert_cached_last_token_matches(ours, ids, expected[-1], ATOL_FP32_LOGITS)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=phi3_configs(), prompt_len=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_random_configs_greedy_matches_transformers(config, prompt_len, seed):
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_checkpoint(config, Path(tmp), seed)
        ours = minislm.load(tmp)
        prompt = np.random.default_rng(seed).integers(0, config["vocab_size"], prompt_len)
        assert_greedy_matches(ours, reference, prompt, 12)  # LongRoPE draws have contexts from 32


def test_transformers5_and_hub_config_layouts_agree():
    """The same LongRoPE model described in both config.json layouts loads to the same
    minislm config, and transformers reads our hub-style rewrite the same way too."""
    raw = json.loads((FIXTURES / "longrope" / "config.json").read_text())
    assert "rope_scaling" in raw  # the fixture is hub style
    from minislm.config import parse_config

    t5 = dict(raw)
    scaling = t5.pop("rope_scaling")
    t5["rope_parameters"] = {
        "rope_type": "longrope",
        "rope_theta": t5.pop("rope_theta"),
        "short_factor": scaling["short_factor"],
        "long_factor": scaling["long_factor"],
        "original_max_position_embeddings": t5["original_max_position_embeddings"],
    }
    assert parse_config(t5) == parse_config(raw)
    ref_hub = transformers.Phi3Config(**{k: v for k, v in raw.items() if k != "architectures"})
    ref_t5 = transformers.Phi3Config(**{k: v for k, v in t5.items() if k != "architectures"})
    for key in ("rope_theta", "short_factor", "long_factor", "original_max_position_embeddings"):
        assert ref_hub.rope_parameters[key] == ref_t5.rope_parameters[key]
