"""LoRA adapters (minislm/lora.py): the arithmetic, PEFT folders, and what is refused.

The golden fixtures (tools/make_lora_fixtures.py) are adapters PEFT's get_peft_model
made and saved on two of the suite's tiny checkpoints, with PeftModel's logits: plain
LoRA on every Phi-3 decoder matrix, and rsLoRA on PhiMoE's attention, targets given
as a regular expression.
"""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from conftest import ATOL_FP32_LOGITS, FIXTURES

import minislm
from minislm.errors import MinislmError
from minislm.kernels import Bf16Weight
from minislm.lora import Adapter, LoraPair, LoraWeight, merge_adapter, read_peft_adapter, with_adapter
from minislm.weights import save_safetensors

LORA = FIXTURES / "lora"
BASES = {"phi3": "gqa", "phimoe": "moe"}


def load_with_adapter(name: str, merge: bool = False):
    model = minislm.load(FIXTURES / BASES[name])
    adapter = read_peft_adapter(LORA / name, model.weights, model.config)
    return model, model.with_adapter(adapter, merge=merge)


@pytest.mark.parametrize("name", list(BASES))
def test_peft_adapter_logits_equal_peftmodels(name):
    reference = load_file(LORA / name / "reference_lora.safetensors")
    model, adapted = load_with_adapter(name)
    assert np.abs(adapted.logits(reference["ids"]) - reference["logits"]).max() <= ATOL_FP32_LOGITS
    assert np.abs(model.logits(reference["ids"]) - reference["base_logits"]).max() <= ATOL_FP32_LOGITS


@pytest.mark.parametrize("name", list(BASES))
def test_merged_adapter_gives_the_same_logits(name):
    """W + scale·B·A formed once: the same function, rounded once more (float32)."""
    reference = load_file(LORA / name / "reference_lora.safetensors")
    _, merged = load_with_adapter(name, merge=True)
    assert not any(isinstance(w, LoraWeight) for w in merged.weights.values())
    assert np.abs(merged.logits(reference["ids"]) - reference["logits"]).max() <= ATOL_FP32_LOGITS


def test_rslora_scale_and_regex_targets():
    model = minislm.load(FIXTURES / "moe")
    adapter = read_peft_adapter(LORA / "phimoe", model.weights, model.config)
    assert {p.scale for p in adapter.pairs.values()} == {3 / 6**0.5}  # alpha / sqrt(r)
    assert sorted({n.split(".")[-2] for n in adapter.pairs}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "r 6" in adapter.describe() and "W·x + (B·(A·x))" in adapter.describe()


def test_cached_decoding_with_an_adapter_equals_full_forwards():
    reference = load_file(LORA / "phi3" / "reference_lora.safetensors")
    _, adapted = load_with_adapter("phi3")
    ids = reference["ids"]
    cache = adapted.new_cache(len(ids))
    adapted.forward(ids[:-1], cache)
    last = adapted.lm_head(adapted.forward(ids[-1:], cache))[0]
    assert np.abs(last - reference["logits"][-1]).max() <= ATOL_FP32_LOGITS


def test_with_adapter_none_gives_back_the_base_model():
    model, adapted = load_with_adapter("phi3")
    assert adapted.with_adapter(None) is model and model.with_adapter(None) is model
    assert adapted.adapter.name == "phi3" and model.adapter is None


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 40), inp=st.integers(1, 40), rank=st.integers(1, 9), tokens=st.integers(1, 5),
       scale=st.floats(0.1, 4), seed=st.integers(0, 2**16))
def test_lora_weight_is_w_x_plus_scaled_b_a_x(out, inp, rank, tokens, scale, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, inp)).astype(np.float32)
    pair = LoraPair(rng.standard_normal((rank, inp)).astype(np.float32), rng.standard_normal((out, rank)).astype(np.float32),
                    scale)
    x = rng.standard_normal((tokens, inp)).astype(np.float32)
    expected = x.astype(np.float64) @ (W.astype(np.float64) + scale * (pair.B.astype(np.float64) @ pair.A)).T
    y = LoraWeight(W, pair).matmul(x)
    assert y.shape == (tokens, out) and y.dtype == np.float32
    assert np.allclose(y, expected, atol=1e-4 * (1 + np.abs(expected).max()))
    merged = merge_adapter({"w": W}, Adapter("a", {"w": pair}))["w"]
    assert np.allclose(x @ merged.T, expected, atol=1e-4 * (1 + np.abs(expected).max()))


def test_lora_over_bf16_weights_and_merging_into_them():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((24, 16)).astype(np.float32)
    pair = LoraPair(rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((24, 2)).astype(np.float32), 0.5)
    packed = Bf16Weight(W)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    base = packed.matmul(x)
    assert np.allclose(LoraWeight(packed, pair).matmul(x), base + 0.5 * (x @ pair.A.T) @ pair.B.T, atol=1e-4)
    merged = merge_adapter({"w": packed}, Adapter("a", {"w": pair}))["w"]
    assert isinstance(merged, Bf16Weight)
    widened = packed.rows(np.arange(24))
    assert np.allclose(merged.rows(np.arange(24)), widened + 0.5 * pair.B @ pair.A, atol=0.05)  # bf16 rounding


def test_adapted_weights_are_shared_not_copied():
    model, adapted = load_with_adapter("phi3")
    for name, w in adapted.weights.items():
        if isinstance(w, LoraWeight):
            assert w.base is model.weights[name]
        else:
            assert w is model.weights[name]
    assert adapted.weights_format == model.weights_format


# ---------------------------------------------------------------- what is refused, in one line


@pytest.fixture()
def adapter_copy(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(LORA / "phi3", folder)
    return folder


def refused(folder, match):
    model = minislm.load(FIXTURES / "gqa")
    with pytest.raises(MinislmError, match=match) as info:
        read_peft_adapter(folder, model.weights, model.config)
    assert "\n" not in str(info.value)


def rewrite(folder, change):
    tensors = load_file(folder / "adapter_model.safetensors")
    save_safetensors(folder / "adapter_model.safetensors", change(tensors))


def test_pickle_adapter_is_refused(adapter_copy):
    (adapter_copy / "adapter_model.safetensors").rename(adapter_copy / "adapter_model.bin")
    refused(adapter_copy, "adapter_model.bin, a pickle, which minislm never loads")


def test_unknown_target_module_is_refused(adapter_copy):
    def rename(tensors):
        return {k.replace("layers.0.mlp.down_proj", "layers.0.mlp.shortcut"): v for k, v in tensors.items()}

    rewrite(adapter_copy, rename)
    refused(adapter_copy, "target module 'model.layers.0.mlp.shortcut' is not a linear layer")


def test_embedding_targets_are_refused(adapter_copy):
    def embedding(tensors):
        rng = np.random.default_rng(0)
        extra = {"base_model.model.model.embed_tokens.lora_A.weight": rng.standard_normal((4, 32)).astype(np.float32),
                 "base_model.model.model.embed_tokens.lora_B.weight": rng.standard_normal((384, 4)).astype(np.float32)}
        return {**tensors, **extra}

    rewrite(adapter_copy, embedding)
    refused(adapter_copy, "model.embed_tokens' is not a linear layer")


def test_shape_mismatch_is_refused(adapter_copy):
    def shrink(tensors):
        return {k: (v[:2] if k.endswith("layers.1.self_attn.o_proj.lora_A.weight") else v) for k, v in tensors.items()}

    rewrite(adapter_copy, shrink)
    refused(adapter_copy, r"'model.layers.1.self_attn.o_proj' has lora_A \[2, 32\] and lora_B \[32, 4\]; the matrix is 32 x 32")


def test_a_without_b_is_refused(adapter_copy):
    rewrite(adapter_copy, lambda t: {k: v for k, v in t.items() if not k.endswith("layers.0.mlp.down_proj.lora_B.weight")})
    refused(adapter_copy, "has lora_A but no lora_B")


def test_tensors_outside_target_modules_are_refused(adapter_copy):
    settings = json.loads((adapter_copy / "adapter_config.json").read_text())
    settings["target_modules"] = ["qkv_proj", "o_proj"]
    (adapter_copy / "adapter_config.json").write_text(json.dumps(settings))
    refused(adapter_copy, "which target_modules does not select")


@pytest.mark.parametrize("key, value, match", [
    ("use_dora", True, "use_dora is set"),
    ("peft_type", "IA3", "peft_type 'IA3' is not LoRA"),
    ("bias", "all", "bias = 'all' is not supported"),
    ("rank_pattern", {"o_proj": 8}, "rank_pattern is set"),
    ("r", 0, "r must be a positive integer"),
])
def test_other_peft_settings_are_refused(adapter_copy, key, value, match):
    settings = json.loads((adapter_copy / "adapter_config.json").read_text())
    settings[key] = value
    (adapter_copy / "adapter_config.json").write_text(json.dumps(settings))
    refused(adapter_copy, match)


def test_missing_files_are_refused(tmp_path, adapter_copy):
    refused(tmp_path / "nowhere", "no such adapter folder")
    (adapter_copy / "adapter_config.json").unlink()
    refused(adapter_copy, "no adapter_config.json")


def test_adapter_for_another_model_is_refused():
    """The PhiMoE adapter names q_proj, k_proj ...: the Phi-3 fixture has one fused qkv_proj."""
    refused(LORA / "phimoe", "target module 'model.layers.0.self_attn.(q|k|v)_proj' is not a linear layer")


def test_with_adapter_unknown_name():
    model = minislm.load(FIXTURES / "gqa")
    with pytest.raises(MinislmError, match="no adapter 'vision' \\(this model has: none\\)"):
        model.with_adapter("vision")


def test_lora_weight_is_not_an_embedding():
    pair = LoraPair(np.ones((1, 2), np.float32), np.ones((3, 1), np.float32), 1.0)
    with pytest.raises(TypeError):
        with_adapter({"w": np.ones((3, 2), np.float32)}, Adapter("a", {"w": pair}))["w"].rows(np.array([0]))
