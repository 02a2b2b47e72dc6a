"""A small Phi-3: the real `Phi3ForCausalLM` architecture, sized for a laptop CPU.

Nothing here changes the architecture. A small model is the same decoder as
Phi-3-mini with fewer, narrower layers: RMSNorm, one fused `qkv_proj` with
grouped-query attention (fewer key/value heads than query heads), rotary
position embeddings (the default kind, no LongRoPE), a SwiGLU MLP with a fused
`gate_up_proj`. The export writes the files a hub checkpoint has, in the
layout Microsoft's Phi-3 repositories use, so a runtime that reads this folder
also reads the real thing.
"""

import json
from pathlib import Path

import torch
from transformers import Phi3Config, Phi3ForCausalLM

ROPE_THETA = 10000.0  # Phi-3-mini's base; the context here is far below where it matters


def padded_vocab(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows, rounded up as Phi-3 does (32011 tokens, 32064 rows).

    The extra rows are never produced by the tokenizer; a runtime must not
    sample them, and keeping them exercises that rule.
    """
    return -(-n_tokens // multiple) * multiple


def make_config(*, n_tokens: int, hidden: int, layers: int, heads: int, kv_heads: int,
                ffn: int, context: int, dropout: float, tie: bool,
                bos_id: int, eos_id: int) -> Phi3Config:
    if hidden % heads or heads % kv_heads:
        raise SystemExit(f"--hidden {hidden} must split into --heads {heads}, "
                         f"and --heads into --kv-heads {kv_heads}")
    return Phi3Config(
        vocab_size=padded_vocab(n_tokens),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        original_max_position_embeddings=context,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attention_dropout=0.0,
        tie_word_embeddings=tie,
        sliding_window=None,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        # No padding row during training: nn.Embedding never updates its
        # padding_idx row, and <|endoftext|> (Phi-3's pad) must be learned.
        pad_token_id=None,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def hub_config(config: Phi3Config, dtype: str, pad_id: int) -> dict:
    """config.json as Microsoft's Phi-3 repositories write it.

    Their files predate transformers 5: `rope_theta` sits at the top level with
    `rope_scaling: null` (transformers 5 reads this and builds its own
    `rope_parameters`), and the dtype key is `torch_dtype`.
    """
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id,
        "embd_pdrop": 0.0,
        "eos_token_id": config.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "original_max_position_embeddings": config.original_max_position_embeddings,
        "pad_token_id": pad_id,
        "resid_pdrop": 0.0,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_parameters["rope_theta"],
        "sliding_window": None,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def export(model: Phi3ForCausalLM, folder: Path, *, dtype: torch.dtype,
           pad_id: int, stop_ids: list[int]) -> None:
    """Write model.safetensors, config.json and generation_config.json into `folder`.

    Dropout is switched off in the written config: it only matters in training.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    copy = Phi3ForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(dtype).save_pretrained(folder, safe_serialization=True)
    config = hub_config(model.config, dtype_name, pad_id)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Greedy decoding of a model this small loops ("I am a gentleman." forever); a
    # repetition penalty keeps `minislm generate "ROMEO:"` deterministic and
    # play-like. minislm and transformers both apply it from this file.
    generation = {"bos_token_id": model.config.bos_token_id,
                  "eos_token_id": stop_ids, "pad_token_id": pad_id,
                  "repetition_penalty": 1.2}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
