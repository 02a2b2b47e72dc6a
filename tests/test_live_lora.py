"""--lora against PEFT's own PeftModel, live, on random adapters and random tiny models.

Skipped without torch, transformers and peft (tests/optional.py). tests/test_lora.py
checks the same against committed fixtures without them.
"""

import numpy as np
import pytest

from conftest import ATOL_FP32_LOGITS, save_random_model
from optional import require_module

import minislm
from minislm.lora import read_peft_adapter

torch = require_module("torch")
transformers = require_module("transformers")
peft = require_module("peft")


@pytest.mark.parametrize("rank, alpha, rslora, targets", [
    (2, 4, False, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    (8, 3, True, r"model\.layers\.1\.(self_attn\.o_proj|mlp\.down_proj)"),
    (1, 16, False, ["gate_up_proj"]),
])
def test_peft_adapters_on_a_random_phi3(tmp_path, rank, alpha, rslora, targets):
    config = transformers.Phi3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     pad_token_id=0, attn_implementation="eager")
    base = save_random_model(transformers.Phi3ForCausalLM(config), tmp_path / "base", seed=rank)
    lora = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(rank + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    model.save_pretrained(tmp_path / "adapter")
    ids = np.random.default_rng(rank).integers(0, 96, 17)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(ids[None])).logits[0].numpy()
    ours = minislm.load(tmp_path / "base")
    adapter = read_peft_adapter(tmp_path / "adapter", ours.weights, ours.config)
    assert np.abs(ours.with_adapter(adapter).logits(ids) - expected).max() <= ATOL_FP32_LOGITS
    assert np.abs(ours.with_adapter(adapter, merge=True).logits(ids) - expected).max() <= ATOL_FP32_LOGITS
