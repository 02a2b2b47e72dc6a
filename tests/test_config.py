"""config.json parsing: both layouts, LongRoPE's attention factor, refusals."""

import math

import pytest

from minislm.bench.random_checkpoint import PHI3_MINI_4K
from minislm.config import parse_config
from minislm.errors import MinislmError

# the shape of microsoft/Phi-3-mini-128k-instruct's config.json: the 4k model's, plus LongRoPE
PHI3_MINI_128K_HUB = dict(
    PHI3_MINI_4K,
    max_position_embeddings=131072,
    rope_scaling={"type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
    sliding_window=262144,
)


def test_hub_layout_with_su_is_longrope():
    config = parse_config(PHI3_MINI_128K_HUB)
    assert config.rope.kind == "longrope" and config.head_dim == 96 and config.rope.rotary_dim == 96
    # sqrt(1 + ln(32) / ln(4096)) = 1.19024..., applied to short prompts too
    assert config.rope.short_scale == config.rope.long_scale == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert config.rope.short_scale == pytest.approx(1.19024, abs=1e-5)


def test_transformers5_layout_reads_the_same():
    raw = dict(PHI3_MINI_128K_HUB)
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = {"rope_type": "longrope", "rope_theta": raw.pop("rope_theta"), **{k: scaling[k] for k in ("short_factor", "long_factor")}}
    assert parse_config(raw) == parse_config(PHI3_MINI_128K_HUB)


def test_phi4_mini_partial_rotary_and_gqa():
    raw = dict(PHI3_MINI_128K_HUB, num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75, tie_word_embeddings=True, vocab_size=200064)
    raw["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}
    config = parse_config(raw)
    assert config.head_dim == 128 and config.rope.rotary_dim == 96 and config.tie_word_embeddings


def test_explicit_attention_factor_wins():
    raw = dict(PHI3_MINI_128K_HUB)
    raw["rope_scaling"] = dict(raw["rope_scaling"], attention_factor=1.5)
    assert parse_config(raw).rope.short_scale == 1.5


def test_default_rope_has_unit_scale():
    raw = {k: v for k, v in PHI3_MINI_128K_HUB.items() if k != "rope_scaling"}
    config = parse_config(raw)
    assert config.rope.kind == "default" and config.rope.short_scale == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "not supported"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 5}, "multiple"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0] * 48}}, "short_factor"),
        ({"partial_rotary_factor": 0.01}, "partial_rotary_factor"),
        ({"hidden_size": None}, "hidden_size"),
        ({"sliding_window": -1}, "sliding_window"),
    ],
)
def test_refusals_name_the_problem(change, message):
    with pytest.raises(MinislmError, match=message.replace("(", r"\(")):
        parse_config(dict(PHI3_MINI_128K_HUB, **change))
