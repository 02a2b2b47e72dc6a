"""Golden fixtures for `--lora DIR`: PEFT adapters on tiny Phi models, and PeftModel's logits.

    python tools/make_lora_fixtures.py      # needs torch, transformers and peft; writes tests/fixtures/lora/

For two of the suite's tiny checkpoints, a Phi-3 (tests/fixtures/gqa) and a PhiMoE
(tests/fixtures/moe), PEFT's own `get_peft_model` puts a LoRA adapter on the
decoder, its A and B matrices are filled with seeded random values (B starts at
zero in training, which would make the adapter a no-op here), `save_pretrained`
writes the folder exactly as a user's fine-tune would be saved (adapter_config.json,
adapter_model.safetensors with PEFT's `base_model.model.` prefix), and PeftModel
runs the fixture's prompt. Written per model:

    tests/fixtures/lora/<name>/adapter_config.json, adapter_model.safetensors
    tests/fixtures/lora/<name>/reference_lora.safetensors:
        ids (T,), logits (T, V) with the adapter, base_logits (T, V) without it

The Phi-3 adapter is plain LoRA on qkv_proj, o_proj, gate_up_proj and down_proj
(scale alpha / r); the PhiMoE one targets the attention projections with rsLoRA's
scale (alpha / sqrt(r)) and a regular expression for target_modules, the other
form PEFT accepts. (transformers 5 stores PhiMoE's experts as 3-D tensors, which
PEFT's LoRA does not wrap.)
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "lora"
ADAPTERS = {
    "phi3": {"base": "gqa", "r": 4, "lora_alpha": 8, "use_rslora": False,
             "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]},
    "phimoe": {"base": "moe", "r": 6, "lora_alpha": 3, "use_rslora": True,
               "target_modules": r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"},
}
PROMPT = [1, 310, 23, 57, 200, 101, 7, 99, 3, 250, 45, 12]
SEED = 99


def main() -> None:
    import numpy as np
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    OUT.mkdir(exist_ok=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for name, spec in ADAPTERS.items():
        folder = OUT / name
        base_dir = FIXTURES / spec["base"]
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            base_logits = model(ids).logits[0].numpy()
        config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"],
                            target_modules=spec["target_modules"], lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(SEED)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
        peft_model.save_pretrained(folder)
        # the reference: the saved folder loaded back by PeftModel onto a fresh base model
        fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
        loaded = PeftModel.from_pretrained(fresh, folder).eval()
        with torch.no_grad():
            logits = loaded(ids).logits[0].numpy()
        assert np.abs(logits - base_logits).max() > 0.1, "the adapter should change the logits"
        save_file({"ids": np.array(PROMPT, dtype=np.int64), "logits": logits, "base_logits": base_logits},
                  str(folder / "reference_lora.safetensors"),
                  metadata={"versions": json.dumps(versions), "base": spec["base"], "seed": str(SEED)})
        (folder / "README.md").unlink(missing_ok=True)  # PEFT's model card; the fixture needs none
        settings = json.loads((folder / "adapter_config.json").read_text())
        settings["base_model_name_or_path"] = f"tests/fixtures/{spec['base']}"  # not this machine's path
        (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        print(f"wrote {folder}: max |logits - base| = {np.abs(logits - base_logits).max():.3f}")


if __name__ == "__main__":
    main()
