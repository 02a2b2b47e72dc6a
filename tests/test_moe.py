"""PhiMoE's mixture of experts: the sparsemixer router against a reference written
from the math (and against transformers' own function), the dispatch against a dense
twin, and decode reading only the experts it chose."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import minislm
from conftest import FIXTURES, import_reference
from minislm.bench.weight_reads import decode_reads, total_bytes
from minislm.generate import generate_tokens
from minislm.model import expert_mlp, moe
from minislm.moe import expert_prefix, group_by_expert, routing_per_token, sparsemixer
from minislm.sampling import Sampler, SamplingSettings
from minislm.trace import Recorder

# Routing weights are softmax values in float32; the reference sums its exponentials
# in another order, which moves them by a few float32 ulps of 1.0.
ATOL_ROUTING_WEIGHT = 1e-6
# The dense twin adds the same float32 products in the same expert order.
ATOL_FP32_ACTIVATIONS = 1e-6


def sparsemixer_reference(scores: np.ndarray, jitter_eps: float):
    """sparsemixer at inference, token by token and expert by expert, from the math:

    round r picks the best expert not yet chosen; an expert j (also not yet chosen)
    stays in the running when (best - s_j) / max(|s_j|, best) <= 2*eps (0/0 counts as
    close); the pick's weight is its softmax over those still running. Arithmetic in
    float32 scalars, as the vectorised code does, so that thresholds compare alike.
    """
    T, E = scores.shape
    experts = np.zeros((T, 2), dtype=np.int64)
    weights = np.zeros((T, 2), dtype=np.float32)
    threshold = np.float32(2 * jitter_eps)
    for t in range(T):
        s = [np.float32(v) for v in scores[t]]
        chosen = []
        for r in range(2):
            running = [j for j in range(E) if j not in chosen]
            best = running[0]
            for j in running:  # strictly greater: the first of equal maxima wins
                if s[j] > s[best]:
                    best = j
            top = s[best]
            kept = []
            for j in running:
                denominator = max(abs(s[j]), top)
                gap = (top - s[j]) / denominator if denominator != 0 else np.float32(0)
                if not gap > threshold:
                    kept.append(j)
            total = sum(np.exp(np.float64(s[j] - top)) for j in kept)
            experts[t, r], weights[t, r] = best, 1.0 / total
            chosen.append(best)
    return experts, weights


# Scores with many exact ties and zeros (from a small set), or spread-out floats.
SCORE_VALUES = st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0]) | st.floats(-8, 8, width=32)
EPSILONS = st.sampled_from([0.0, 0.01, 0.1, 0.3, 1.0])


@st.composite
def router_scores(draw):
    shape = (draw(st.integers(1, 6)), draw(st.integers(2, 8)))  # (T, E)
    return draw(arrays(np.float32, shape, elements=SCORE_VALUES))


@settings(max_examples=300, deadline=None)
@given(scores=router_scores(), jitter_eps=EPSILONS)
def test_sparsemixer_matches_the_reference(scores, jitter_eps):
    experts, weights = sparsemixer(scores, jitter_eps)
    ref_experts, ref_weights = sparsemixer_reference(scores, jitter_eps)
    assert experts.shape == weights.shape == (len(scores), 2) and weights.dtype == np.float32
    assert np.array_equal(experts, ref_experts)
    assert np.allclose(weights, ref_weights, rtol=0, atol=ATOL_ROUTING_WEIGHT)
    assert (experts[:, 0] != experts[:, 1]).all()
    assert ((weights > 0) & (weights <= 1)).all()


@settings(max_examples=200, deadline=None)
@given(scores=router_scores(), jitter_eps=EPSILONS)
def test_sparsemixer_matches_transformers(scores, jitter_eps):
    """The same inputs through transformers' `sparsemixer` (eval mode), ties included."""
    torch, _ = import_reference()
    from transformers.models.phimoe.modeling_phimoe import sparsemixer as reference

    ref_weights, ref_experts = reference(torch.from_numpy(scores), jitter_eps=jitter_eps, training=False)
    experts, weights = sparsemixer(scores, jitter_eps)
    assert np.array_equal(experts, ref_experts.numpy())
    assert np.allclose(weights, ref_weights.numpy(), rtol=0, atol=ATOL_ROUTING_WEIGHT)


def test_sparsemixer_by_hand():
    """Worked examples from docs/moe.md (eps = 0.01, so the threshold is 0.02)."""
    experts, weights = sparsemixer(np.array([[4.0, 1.0, 3.99, -2.0]], dtype=np.float32), 0.01)
    # round 1: 3.99 is 0.25% below 4.0 -> kept; weight = 1 / (1 + e^-0.01)
    # round 2: without expert 0, expert 2 is best and nothing else is within 2% of it
    assert experts.tolist() == [[0, 2]]
    assert np.allclose(weights, [[1 / (1 + np.exp(-0.01)), 1.0]])
    # an exact tie: the first index wins round 1 with weight 1/2, the other then stands alone
    experts, weights = sparsemixer(np.array([[1.0, 3.0, 3.0]], dtype=np.float32), 0.01)
    assert experts.tolist() == [[1, 2]] and np.allclose(weights, [[0.5, 1.0]])


def test_group_by_expert_covers_every_choice_once():
    experts = np.array([[3, 1], [1, 0], [3, 0], [2, 3]])
    plan = list(group_by_expert(experts))
    assert [e for e, _, _ in plan] == [0, 1, 2, 3]  # only chosen experts, in order
    seen = sorted((int(r), int(s)) for e, rows, slots in plan for r, s in zip(rows, slots))
    assert seen == [(t, s) for t in range(4) for s in range(2)]
    for e, rows, slots in plan:
        assert (experts[rows, slots] == e).all()


@pytest.fixture(scope="module")
def moe_model():
    return minislm.load(FIXTURES / "moe_longrope")


def test_dispatch_equals_its_dense_twin(moe_model):
    """moe() runs each chosen expert on its tokens only; the dense twin runs every
    expert on every token and multiplies by a (T, E) weight matrix that is zero
    where an expert was not chosen. They must agree."""
    config, w = moe_model.config, moe_model.weights
    layer = "model.layers.1."
    x = np.random.default_rng(0).normal(size=(37, config.hidden_size)).astype(np.float32)
    scores = x @ w[layer + "block_sparse_moe.gate.weight"].T
    experts, gates = sparsemixer(scores, config.router_jitter_noise)
    mixing = np.zeros((len(x), config.num_local_experts), dtype=np.float32)  # (T, E)
    np.put_along_axis(mixing, experts, gates, axis=-1)
    dense = np.zeros_like(x)
    for e in range(config.num_local_experts):
        p = expert_prefix(layer, e)
        dense += mixing[:, e : e + 1] * expert_mlp(x, w[p + "w1.weight"], w[p + "w3.weight"], w[p + "w2.weight"])
    trace = Recorder(names=("experts",))
    sparse = moe(x, w, layer, config, trace, 1)
    assert np.abs(sparse - dense).max() <= ATOL_FP32_ACTIVATIONS
    assert np.array_equal(trace.steps[0].value, experts)


def test_decode_reads_only_the_chosen_experts(moe_model):
    """Each decode step looks up the matrices of exactly the 2 experts per layer its
    router chose, and every non-expert weight; so the bytes it reads are the dense part
    plus 2 of E experts per layer."""
    config, w = moe_model.config, moe_model.weights
    prompt = np.arange(1, 20)
    for step in decode_reads(moe_model, prompt, steps=6):
        expert_names = {n for n in step.names if ".experts." in n}
        expected = {
            expert_prefix(f"model.layers.{i}.", int(e)) + m
            for i, pair in enumerate(step.experts)
            for e in pair
            for m in ("w1.weight", "w3.weight", "w2.weight")
        }
        assert expert_names == expected
        assert {n for n in w if ".experts." not in n} <= step.names  # the dense part, all of it
    one_expert = sum(w[expert_prefix("model.layers.0.", 0) + m].nbytes for m in ("w1.weight", "w3.weight", "w2.weight"))
    all_experts = one_expert * config.num_local_experts * config.num_hidden_layers
    embed = w["model.embed_tokens.weight"]
    dense = total_bytes(w) - all_experts - embed.nbytes + embed.nbytes // embed.shape[0]
    assert step.bytes_read == dense + 2 * one_expert * config.num_hidden_layers


def test_generated_tokens_carry_the_routing_of_the_position_before_them(moe_model):
    """a recorder given to generate_tokens records, for generated token n, the routing at
    the position whose logits chose it; a full forward over the same sequence routes
    that position the same way."""
    prompt = np.arange(5, 30)
    trace = Recorder(names=("experts", "expert_weights"))
    tokens = list(generate_tokens(moe_model, prompt, 8, Sampler(SamplingSettings(temperature=0.0)), trace=trace))
    routing = routing_per_token(trace, tokens)
    assert [step.token for step in routing] == tokens
    full = Recorder(names=("experts", "expert_weights"))
    sequence = np.concatenate([prompt, tokens[:-1]])
    moe_model.forward(sequence, moe_model.new_cache(len(sequence)), full)
    for n, step in enumerate(routing):
        position = len(prompt) - 1 + n
        assert step.experts.tolist() == [experts[position].tolist() for experts in full.per_layer("experts")]
        assert np.allclose(step.weights, [w[position] for w in full.per_layer("expert_weights")], atol=ATOL_ROUTING_WEIGHT)
