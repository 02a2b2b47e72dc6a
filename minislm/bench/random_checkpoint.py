"""Random-weight checkpoints with real model shapes, for speed measurements.

Decode speed does not depend on the values of the weights, only on their shapes
and dtype, so a random checkpoint with Phi-3-mini's exact shapes measures what a
download of the real 7.6 GB model would, without the download. (For PhiMoE the
values decide which experts run, but not how many: always 2 per layer.) The file is
streamed tensor by tensor, so writing it never needs the whole model in memory.
"""

import json
from pathlib import Path

import numpy as np

from ..config import parse_config
from ..weights import NUMPY_DTYPES, expected_shapes, float32_to_bf16, write_safetensors

# microsoft/Phi-3-mini-4k-instruct's config.json, in the hub layout.
PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-05,
    "sliding_window": 2047,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# The same decoder cut down so the whole benchmark pipeline runs in seconds
# (`bench --small`). The vocabulary stays at 32064 so llama.cpp's Phi-3 vocabulary
# still fits the embedding.
PHI3_TINY = dict(
    PHI3_MINI_4K, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4,
)

# microsoft/Phi-3.5-MoE-instruct's config.json, in the hub layout (LongRoPE factors set
# to 1.0: they change no cost). 16 experts of 3 x 4096 x 6400, top-2: 41.9B parameters,
# 6.6B of them used per token.
PHI35_MOE = {
    "architectures": ["PhiMoEForCausalLM"],
    "model_type": "phimoe",
    "hidden_size": 4096,
    "intermediate_size": 6400,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 16,
    "num_experts_per_tok": 2,
    "router_jitter_noise": 0.01,
    "input_jitter_noise": 0.01,
    "attention_bias": True,
    "lm_head_bias": True,
    "vocab_size": 32064,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "longrope",
        "short_factor": [1.0] * 64,
        "long_factor": [1.0] * 64,
        "short_mscale": 1.243163121016122,
        "long_mscale": 1.243163121016122,
        "original_max_position_embeddings": 4096,
    },
    "rms_norm_eps": 1e-05,
    "sliding_window": 131072,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# The same cut to 2 of its 32 layers: the embedding, the lm_head and the layers'
# chosen experts are what a decode step reads, so two layers show the total-vs-active
# gap without an 84 GB checkpoint.
PHI35_MOE_2LAYERS = dict(PHI35_MOE, num_hidden_layers=2)
PHIMOE_TINY = dict(
    PHI35_MOE_2LAYERS, hidden_size=256, intermediate_size=384, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4,
    rope_scaling=dict(PHI35_MOE_2LAYERS["rope_scaling"], short_factor=[1.0] * 32, long_factor=[1.0] * 32),
)


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config.json holds, by hub name."""
    return expected_shapes(parse_config(config))


def random_tensor(rng: np.random.Generator, shape, dtype_tag: str, bias: bool = False) -> np.ndarray:
    """N(0, 0.02) for matrices and biases, ~1 for norm gains; stored in the requested dtype."""
    if len(shape) == 1 and not bias:
        values = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    else:
        values = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    if dtype_tag == "BF16":
        return float32_to_bf16(values)
    return values.astype(NUMPY_DTYPES[dtype_tag])


def write_random_checkpoint(folder: Path, config: dict, dtype_tag: str = "F16", seed: int = 0) -> Path:
    """Write config.json, generation_config.json and model.safetensors with random weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes(config)
    rng = np.random.default_rng(seed)
    arrays = (random_tensor(rng, shape, dtype_tag, bias=name.endswith(".bias")) for name, shape in shapes.items())
    entries = {name: (dtype_tag, shape) for name, shape in shapes.items()}
    write_safetensors(folder / "model.safetensors", entries, arrays, {"format": "pt", "note": "random weights for benchmarks"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder
