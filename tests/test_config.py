"""config.json parsing: both layouts, LongRoPE's attention factor, refusals."""

import math

import pytest

from minislm.bench.random_checkpoint import PHI3_MINI_4K, PHI35_MOE  # the hub configs' shapes
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


def test_phimoe_hub_layout():
    config = parse_config(PHI35_MOE)
    assert (config.num_local_experts, config.num_experts_per_tok, config.router_jitter_noise) == (16, 2, 0.01)
    assert config.attention_bias and config.lm_head_bias and config.head_dim == 128
    # mscale replaces the derived attention factor (which would be 1.19 here)
    assert config.rope.short_scale == config.rope.long_scale == 1.243163121016122


def test_phimoe_transformers5_layout_reads_the_same():
    raw = dict(PHI35_MOE)
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = dict(scaling, rope_type="longrope", rope_theta=raw.pop("rope_theta"))
    del raw["rope_parameters"]["type"]
    assert parse_config(raw) == parse_config(PHI35_MOE)


def test_phimoe_defaults_follow_phimoe_config():
    """Without rope_theta PhimoeConfig uses 1e6 (Phi3Config 1e4); without a router eps, 0.01."""
    raw = {k: v for k, v in PHI35_MOE.items() if k not in ("rope_theta", "rope_scaling", "router_jitter_noise")}
    config = parse_config(raw)
    assert config.rope.theta == 1e6 and config.rope.kind == "default" and config.router_jitter_noise == 0.01


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts_per_tok": 17}, r"num_experts_per_tok \(17\) is larger than num_local_experts \(16\)"),
        ({"num_experts_per_tok": 4}, "exactly 2"),
        ({"num_local_experts": 1, "num_experts_per_tok": 1}, "at least 2"),
        ({"router_jitter_noise": -0.1}, "router_jitter_noise"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.0] * 64}}, "short_mscale"),
    ],
)
def test_phimoe_refusals_name_the_problem(change, message):
    with pytest.raises(MinislmError, match=message):
        parse_config(dict(PHI35_MOE, **change))
