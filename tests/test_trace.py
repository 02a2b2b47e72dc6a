"""The recorder: it changes nothing, it records what the spine computed, and it stays bounded.

The recorded values are checked against computations written here from the weights
alone (q and k from the matrices with RoPE written as a complex rotation), against
the definition of attention probabilities, and against `sparsemixer`.
"""

import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from minislm.load import BUNDLED_MODEL
from minislm.moe import sparsemixer
from minislm.trace import LAYER_STEPS, STEPS, Recorder, RecordingTooLarge

# Recorded q/k vs the same math written independently in float64: float32 rounding of
# unit-scale activations through one matmul and one rotation.
ATOL_INDEPENDENT_QK = 1e-4


@pytest.fixture(scope="module")
def shipped():
    return minislm.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def moe_model():
    return minislm.load(FIXTURES / "moe_longrope")


def prompt(model, n=40):
    return np.random.default_rng(0).integers(5, model.config.vocab_size, n)


@pytest.mark.parametrize("which", ["shipped", "moe_model"])
def test_recording_leaves_logits_bit_identical(which, request):
    model = request.getfixturevalue(which)
    ids = prompt(model)
    plain = model.logits(ids)
    trace = Recorder()
    recorded = model.logits(ids, trace)
    assert np.array_equal(plain, recorded)
    assert np.array_equal(trace.get("logits"), plain)


def test_every_step_is_recorded_in_forward_order(shipped):
    trace = Recorder()
    shipped.logits(prompt(shipped, 9), trace)
    names = [(s.name, s.layer) for s in trace.steps]
    dense_steps = [n for n in LAYER_STEPS if n not in ("router_logits", "experts", "expert_weights")]
    expected = [("embed", None)]
    for layer in range(shipped.config.num_hidden_layers):
        expected += [(n, layer) for n in dense_steps]
    expected += [("final_norm", None), ("logits", None)]
    assert names == expected
    assert [n for n in STEPS if n in dict(names)] == list(dict.fromkeys(n for n, _ in names))


def test_recorded_q_and_k_equal_an_independent_computation(shipped):
    """Layer 0: RMSNorm of the embedding rows, the q and k rows of qkv_proj, and RoPE as
    a complex rotation of the pairs (i, i + d/2) by position * theta^(-2i/d)."""
    config, w = shipped.config, shipped.weights
    ids = prompt(shipped, 17)
    trace = Recorder(names=("q", "k"), layers=[0])
    shipped.logits(ids, trace)

    x = np.asarray(w["model.embed_tokens.weight"], dtype=np.float64)[ids]
    x = x / np.sqrt((x**2).mean(-1, keepdims=True) + config.rms_norm_eps) * w["model.layers.0.input_layernorm.weight"]
    qkv = x @ np.asarray(w["model.layers.0.self_attn.qkv_proj.weight"], dtype=np.float64).T
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = qkv[:, : H * hd].reshape(len(ids), H, hd).transpose(1, 0, 2)
    k = qkv[:, H * hd : (H + KV) * hd].reshape(len(ids), KV, hd).transpose(1, 0, 2)

    half = hd // 2
    angle = np.arange(len(ids))[:, None] * config.rope.theta ** (-np.arange(half) * 2.0 / hd)  # (T, hd/2)

    def rotate(t):
        z = (t[..., :half] + 1j * t[..., half:]) * np.exp(1j * angle)
        return np.concatenate([z.real, z.imag], axis=-1)

    assert np.abs(trace.get("q", 0) - rotate(q)).max() <= ATOL_INDEPENDENT_QK
    assert np.abs(trace.get("k", 0) - rotate(k)).max() <= ATOL_INDEPENDENT_QK


def test_attention_probabilities_are_causal_distributions(shipped):
    T = 23
    trace = Recorder(names=("attn_probs",), layers=[2], heads=[0, 5])
    shipped.logits(prompt(shipped, T), trace)
    probs = trace.get("attn_probs", 2)
    assert probs.shape == (2, T, T)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert (probs[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()  # no peeking ahead
    assert [s.layer for s in trace.steps] == [2]


def test_decode_step_records_probabilities_over_the_whole_cache(shipped):
    ids = prompt(shipped, 12)
    cache = shipped.new_cache(13)
    shipped.forward(ids, cache)
    trace = Recorder(names=("attn_probs",), layers=[0])
    shipped.forward(ids[:1], cache, trace)
    probs = trace.get("attn_probs", 0)
    assert probs.shape == (shipped.config.num_attention_heads, 1, 13)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert trace.steps[0].positions.tolist() == [12]


def test_recorded_routing_is_sparsemixers_choice(moe_model):
    trace = Recorder(names=("router_logits", "experts", "expert_weights"))
    moe_model.logits(prompt(moe_model, 30), trace)
    for layer in range(moe_model.config.num_hidden_layers):
        experts, weights = sparsemixer(trace.get("router_logits", layer), moe_model.config.router_jitter_noise)
        assert np.array_equal(trace.get("experts", layer), experts)
        assert np.array_equal(trace.get("expert_weights", layer), weights)


def test_recording_past_the_budget_is_refused_before_it_is_computed(shipped):
    T = 64
    probs_bytes = 4 * shipped.config.num_attention_heads * T * T
    trace = Recorder(names=("attn_probs",), max_bytes=probs_bytes * 2 + 1)
    with pytest.raises(RecordingTooLarge, match="record fewer layers, heads or steps"):
        shipped.logits(prompt(shipped, T), trace)
    assert trace.nbytes <= trace.max_bytes
    assert len(trace.steps) == 2  # layers 0 and 1 fitted, layer 2 was refused


def test_asking_for_a_head_that_does_not_exist_is_one_clear_error(shipped):
    with pytest.raises(RecordingTooLarge, match="8 query heads"):
        shipped.logits(prompt(shipped, 4), Recorder(names=("attn_probs",), heads=[8]))


def test_unknown_step_names_are_refused():
    with pytest.raises(ValueError, match="unknown step names"):
        Recorder(names=("qq",))
