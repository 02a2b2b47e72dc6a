"""Live differential tests for PhiMoE: random small Phi-3.5-MoE configs, minislm vs transformers.

Hypothesis draws experts (2-8, always top-2), heads and kv heads, head dim,
layers, attention and lm_head biases, the router's eps, sliding window, tied
embeddings, and RoPE (default, or LongRoPE with short/long mscale).

transformers 5 never switches PhiMoE to LongRoPE's long factors (4.57.1 and
Microsoft's code do, once the sequence passes original_max_position_embeddings).
So logits are compared with plain transformers 5 only below the original length;
past it, with transformers 5 patched to switch as the model was designed
(`phimoe_longrope_as_designed`), and one test shows the difference explicitly.
"""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import minislm
from conftest import (
    ATOL_FP32_LOGITS,
    FIXTURES,
    assert_cached_last_token_matches,
    assert_greedy_matches,
    import_reference,
    save_random_model,
)
from minislm.trace import Recorder
from minislm.verify import phimoe_longrope_as_designed

torch, transformers = import_reference()
from transformers.models.phimoe.modeling_phimoe import sparsemixer as transformers_sparsemixer  # noqa: E402

# Routing is a step function of the router logits, which differ by ~1e-6 between BLAS
# and torch. Inputs that put a decision closer than this to its threshold are skipped:
# there, float32 itself cannot say which expert wins (it is not a minislm property).
ROUTING_MARGIN = 1e-5


@st.composite
def phimoe_configs(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    config = dict(
        vocab_size=draw(st.integers(40, 200)),
        hidden_size=heads * head_dim,
        intermediate_size=draw(st.sampled_from([16, 32, 48])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=draw(st.integers(2, 8)),
        num_experts_per_tok=2,
        attention_bias=draw(st.booleans()),
        lm_head_bias=draw(st.booleans()),
        router_jitter_noise=draw(st.sampled_from([0.0, 0.01, 0.1, 0.5])),
        sliding_window=draw(st.none() | st.integers(1, 24)),
        tie_word_embeddings=draw(st.booleans()),
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    theta = draw(st.sampled_from([10000.0, 1e6]))
    if draw(st.booleans()):  # LongRoPE with PhiMoE's two multipliers
        original = draw(st.integers(16, 40))
        factors = st.lists(st.floats(1.0, 8.0), min_size=head_dim // 2, max_size=head_dim // 2)
        config.update(
            max_position_embeddings=original * 4,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": theta,
                "short_factor": draw(factors),
                "long_factor": draw(factors),
                "short_mscale": draw(st.floats(1.0, 1.5)),
                "long_mscale": draw(st.floats(1.0, 1.5)),
                "original_max_position_embeddings": original,
            },
        )
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return config


def original_length(config: dict) -> int:
    """Where LongRoPE would switch factor sets (no switch for default RoPE)."""
    return config["rope_parameters"].get("original_max_position_embeddings", config["max_position_embeddings"])


def build_phimoe(config: dict, folder: Path, seed: int):
    model = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**config))
    return save_random_model(model, folder, seed)


def routing_margin(router_logits, jitter_eps: float) -> float:
    """How close these router logits are to changing a sparsemixer decision: the
    relative gap between the two best candidates of a round, or between an expert's
    closeness (best - s) / max(|s|, best) and the 2*eps threshold."""
    margin = np.inf
    for scores in router_logits:  # (T, E) per layer
        s = scores.double().numpy()
        candidates = s.copy()
        for _ in range(2):
            order = np.sort(candidates, axis=-1)
            top, runner_up = order[:, -1:], order[:, -2:-1]
            margin = min(margin, np.min((top - runner_up) / np.maximum(np.abs(top), 1.0)))
            with np.errstate(invalid="ignore", divide="ignore"):
                gap = (top - s) / np.maximum(np.abs(s), top)
            gap[~np.isfinite(candidates) | (candidates == top)] = np.nan  # chosen now or before
            if np.isfinite(gap).any():
                margin = min(margin, np.nanmin(np.abs(gap - 2 * jitter_eps)))
            candidates[np.arange(len(s)), candidates.argmax(-1)] = -np.inf
    return margin


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(config=phimoe_configs(), seq_len=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_random_phimoe_configs_match_transformers(config, seq_len, seed):
    """Logits, argmax, routing and a cached decode step vs plain transformers 5, below
    LongRoPE's original length (where every transformers version agrees)."""
    seq_len = min(seq_len, original_length(config))
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_phimoe(config, Path(tmp), seed)
        ours = minislm.load(tmp)
        ids = np.random.default_rng(seed).integers(0, config["vocab_size"], seq_len)
        with torch.no_grad():
            out = reference(torch.from_numpy(ids)[None], output_router_logits=True)
        assume(routing_margin(out.router_logits, config["router_jitter_noise"]) > ROUTING_MARGIN)
        expected = out.logits[0].numpy()

        trace = Recorder(names=("experts", "expert_weights"))
        got = ours.lm_head(ours.forward(ids, ours.new_cache(seq_len), trace))
        assert np.abs(got - expected).max() <= ATOL_FP32_LOGITS
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        routing = zip(trace.per_layer("experts"), trace.per_layer("expert_weights"))
        for (experts, weights), router_logits in zip(routing, out.router_logits):
            ref_weights, ref_experts = transformers_sparsemixer(
                router_logits, jitter_eps=config["router_jitter_noise"], training=False
            )
            assert np.array_equal(experts, ref_experts.numpy())
            assert np.abs(weights - ref_weights.numpy()).max() <= 1e-5
        assert_cached_last_token_matches(ours, ids, expected[-1], ATOL_FP32_LOGITS)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=phimoe_configs(), prompt_len=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_random_phimoe_greedy_matches_transformers(config, prompt_len, seed):
    """12 greedy tokens through minislm's KV cache equal transformers' full forwards.
    With LongRoPE the run may cross the original length, so the reference switches
    factor sets as the model was designed."""
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_phimoe(config, Path(tmp), seed)
        phimoe_longrope_as_designed(reference)
        ours = minislm.load(tmp)
        prompt = np.random.default_rng(seed).integers(0, config["vocab_size"], prompt_len)
        assert_greedy_matches(ours, reference, prompt, 12)


def test_transformers5_keeps_phimoe_on_short_factors_past_the_original_length():
    """The version difference, shown on the moe_longrope fixture (original length 64):
    plain transformers 5 agrees with minislm below 64 tokens and not above, where it
    uses long_mscale with the *short* factors; switched as designed, it agrees above too."""
    folder = FIXTURES / "moe_longrope"
    reference = load_file(folder / "reference.safetensors")
    ours = minislm.load(folder)
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    designed = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert phimoe_longrope_as_designed(designed)

    def logits(model, ids):
        with torch.no_grad():
            return model(torch.from_numpy(ids)[None]).logits[0].numpy()

    below, above = reference["case.below.input_ids"], reference["case.above.input_ids"]
    assert len(below) <= ours.config.rope.original_max_position_embeddings < len(above)
    assert np.abs(ours.logits(below) - logits(plain, below)).max() <= ATOL_FP32_LOGITS
    assert np.abs(ours.logits(above) - logits(designed, above)).max() <= ATOL_FP32_LOGITS
    assert np.abs(ours.logits(above) - logits(plain, above)).max() > 0.1  # measured: 5.5


def test_transformers5_fused_expert_layout_loads_the_same(tmp_path):
    """save_pretrained(save_original_format=False) writes transformers 5's own layout
    (mlp.router, 3-D mlp.experts.gate_up_proj / down_proj); minislm reads it as the
    hub layout, with the same logits, and without copying the expert matrices."""
    config = dict(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=3, attention_bias=True, max_position_embeddings=64,
    )
    model = build_phimoe(config, tmp_path / "hub", seed=1)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "fused" / "model.safetensors")
    hub, fused = minislm.load(tmp_path / "hub"), minislm.load(tmp_path / "fused")
    ids = np.arange(1, 30) % 64
    assert np.array_equal(hub.logits(ids), fused.logits(ids))
    w1 = fused.weights["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    assert w1.shape == (24, 16) and not w1.flags.owndata
