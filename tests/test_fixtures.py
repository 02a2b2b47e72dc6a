"""minislm against transformers' golden logits (tests/fixtures, made by tools/make_fixtures.py).

One tiny checkpoint per architecture variant: MHA, GQA, LongRoPE below and above
the original context, a sliding window shorter than the sequence, partial rotary
with tied embeddings, and a sharded bf16 checkpoint; and PhiMoE with biases (4
experts), with LongRoPE and its two mscales (8 experts, GQA), and sharded bf16
with a sliding window (2 experts, no biases).

The PhiMoE LongRoPE fixture past its original length follows the model's design
(long factors, as transformers 4.57.1 and Microsoft's code), not transformers 5,
which keeps the short factors; see tools/make_fixtures.py and docs/moe.md.
"""

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import minislm
from conftest import ATOL_FP32_LOGITS, FIXTURES, VARIANTS, decoder_greedy
from minislm.trace import Recorder

# Routing weights are softmax values of router logits that differ by ~1e-6 between
# BLAS and torch; the weights move by less than that.
ATOL_ROUTING_WEIGHT = 1e-5
MOE_VARIANTS = [v for v in VARIANTS if v.startswith("moe") or v == "slimmoe"]


def test_every_variant_has_a_fixture():
    assert set(VARIANTS) == {
        "mha", "gqa", "longrope", "sliding", "partial_tied", "sharded_bf16", "moe", "moe_longrope", "moe_sharded_bf16",
        "phi4", "phi4_mini", "slimmoe",
    }


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    folder = FIXTURES / request.param
    return request.param, minislm.load(folder), load_file(folder / "reference.safetensors")


def cases(reference):
    return sorted({key.split(".")[1] for key in reference if key.startswith("case.")})


def test_logits_match_transformers(variant):
    name, model, reference = variant
    for case in cases(reference):
        ids = reference[f"case.{case}.input_ids"]
        expected = reference[f"case.{case}.logits"]
        got = model.logits(ids)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.abs(got - expected).max() <= ATOL_FP32_LOGITS, f"{name}/{case}"
        assert (got.argmax(-1) == expected.argmax(-1)).all(), f"{name}/{case}: top-1 differs"


def test_greedy_continuation_matches_transformers(variant):
    name, model, reference = variant
    tokens = decoder_greedy(model, reference["greedy.prompt"], 20)
    assert tokens == reference["greedy.tokens"].tolist(), name


def test_cached_decode_equals_full_forward(variant):
    """Prefill half the sequence, then feed one token at a time through the KV cache:
    each step's logits must equal those of a full forward over the same prefix."""
    name, model, reference = variant
    # the longest case: for LongRoPE it starts below the switch point and crosses it
    ids = max((reference[f"case.{c}.input_ids"] for c in cases(reference)), key=len)
    split = len(ids) // 2
    cache = model.new_cache(len(ids))
    steps = [model.lm_head(model.forward(ids[:split], cache))]
    for token in ids[split:]:
        steps.append(model.lm_head(model.forward([token], cache)))
    stepped = np.concatenate(steps)
    # Compare each row with a full forward of its own prefix: with LongRoPE, the
    # factor set depends on the prefix length, so rows of one long forward differ.
    for t in range(split - 1, len(ids)):
        full = model.logits(ids[: t + 1])[-1]
        assert np.abs(stepped[t] - full).max() <= ATOL_FP32_LOGITS, f"{name}: position {t}"


@pytest.mark.parametrize("name", MOE_VARIANTS)
def test_routing_matches_transformers(name):
    """PhiMoE: in every layer, every token goes to the experts transformers' sparsemixer
    chose, with the same weights. A logit mismatch with the same routing points at the
    experts' arithmetic; a routing mismatch names the layer and token where it starts."""
    model = minislm.load(FIXTURES / name)
    reference = load_file(FIXTURES / name / "reference.safetensors")
    for case in cases(reference):
        trace = Recorder(names=("experts", "expert_weights"))
        ids = reference[f"case.{case}.input_ids"]
        model.forward(ids, model.new_cache(len(ids)), trace)
        routing = zip(trace.per_layer("experts"), trace.per_layer("expert_weights"))
        for layer, ((experts, weights), expected) in enumerate(zip(routing, reference[f"case.{case}.experts"])):
            differ = np.flatnonzero((experts != expected).any(axis=-1))
            assert differ.size == 0, f"{name}/{case}: layer {layer}, token {differ[:1]} routed differently"
            assert np.abs(weights - reference[f"case.{case}.expert_weights"][layer]).max() <= ATOL_ROUTING_WEIGHT


@pytest.mark.parametrize("name", MOE_VARIANTS)
def test_moe_fixture_exercises_the_router(name):
    """Guard the fixtures: every expert is used somewhere, and (but for the variant with
    Phi-3.5-MoE's own eps = 0.01, where nearly all are 1.0) some weights are below 1."""
    model = minislm.load(FIXTURES / name)
    reference = load_file(FIXTURES / name / "reference.safetensors")
    experts = np.concatenate([reference[f"case.{c}.experts"].ravel() for c in cases(reference)])
    assert set(experts.tolist()) == set(range(model.config.num_local_experts))
    weights = np.concatenate([reference[f"case.{c}.expert_weights"].ravel() for c in cases(reference)])
    if model.config.router_jitter_noise > 0.01:
        assert (weights < 0.99).any()


@pytest.mark.parametrize("name", ["longrope", "moe_longrope"])
def test_longrope_fixture_really_crosses_the_switch(name):
    """Guard the fixture itself: the 'above' case and the greedy run must pass the
    original context length, or the LongRoPE tests above prove nothing."""
    model = minislm.load(FIXTURES / name)
    reference = load_file(FIXTURES / name / "reference.safetensors")
    original = model.config.rope.original_max_position_embeddings
    assert len(reference["case.below.input_ids"]) <= original < len(reference["case.above.input_ids"])
    assert len(reference["greedy.prompt"]) < original < len(reference["greedy.prompt"]) + len(reference["greedy.tokens"])


def test_moe_longrope_fixture_says_which_longrope_it_follows():
    """Its reference past the original length is not plain transformers 5 (which never
    switches PhiMoE to the long factors); the file's metadata must say so."""
    model = minislm.load(FIXTURES / "moe_longrope")
    assert model.config.rope.short_scale != model.config.rope.long_scale  # short_mscale, long_mscale
    with safe_open(FIXTURES / "moe_longrope" / "reference.safetensors", "np") as f:
        assert "long_factor/long_mscale" in f.metadata()["longrope_reference"]


@pytest.mark.parametrize("name", ["sliding", "moe_sharded_bf16"])
def test_sliding_fixture_window_is_shorter_than_the_sequence(name):
    model = minislm.load(FIXTURES / name)
    reference = load_file(FIXTURES / name / "reference.safetensors")
    assert model.config.sliding_window < len(reference["case.seq.input_ids"])


# --decoder-activations bf16: every product of the decoder takes its input rounded to
# bf16 (8 significant bits), as transformers in bf16 does, against this float32
# reference. sharded_bf16's weights are bf16 already, so the default's exact products
# give its logits to 1e-6; rounded activations moved them by 0.039 (values up to 4.05,
# one argmax of 48 changed, on a near tie). The bar is 3x that.
ATOL_BF16_ACTIVATIONS_LOGITS = 0.12


def test_bf16_decoder_activations_stay_within_bf16s_rounding():
    model = minislm.load(FIXTURES / "sharded_bf16", quant="bf16", kv_cache="float32", decoder_activations="bf16")
    matrices = [w for name, w in model.weights.items() if hasattr(w, "activations")]
    assert matrices and all(w.activations == "bf16" for w in matrices)
    reference = load_file(FIXTURES / "sharded_bf16" / "reference.safetensors")
    worst = max(np.abs(model.logits(reference[f"case.{case}.input_ids"]) - reference[f"case.{case}.logits"]).max()
                for case in cases(reference))
    assert ATOL_FP32_LOGITS < worst <= ATOL_BF16_ACTIVATIONS_LOGITS
