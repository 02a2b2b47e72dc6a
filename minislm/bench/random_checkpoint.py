"""Random-weight checkpoints with real model shapes: for speed, and for test fixtures.

Decode speed does not depend on the values of the weights, only on their shapes
and dtype, so a random checkpoint with Phi-3-mini's exact shapes measures what a
download of the real 7.6 GB model would, without the download. (For PhiMoE the
values decide which experts run, but not how many: always 2 per layer.)
`write_random_checkpoint` writes one for any config.json here (Phi-3-mini,
Phi-3.5-MoE, Phi-3-vision-128k), from a seeded NumPy generator.

The golden fixture in tests/fixtures/phi3_v is checked against the reference code
on a checkpoint whose CLIP tower keeps its real width (1024: the reference
hard-codes it), so even two blocks weigh ~20 MB. Rather than commit that file, its
weights are a pure function of (seed, tensor name, index), written by
`write_hashed_checkpoint` with integer arithmetic that every platform and NumPy
version computes bit for bit; the fixture records the file's SHA-256 so a test
knows it rebuilt the same bytes.

Both scale their noise the same way (`initial_value`) and stream the file tensor
by tensor, so writing it never needs the whole model in memory.
"""

import hashlib
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

# microsoft/Phi-3-vision-128k-instruct's config.json (LongRoPE factors set to 1.0: they
# change no cost), for speed measurements.
PHI3_VISION_128K = {
    "architectures": ["Phi3VForCausalLM"],
    "model_type": "phi3_v",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
    "rms_norm_eps": 1e-05,
    "sliding_window": 131072,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "img_processor": {
        "image_dim_out": 1024,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
}


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config.json holds, by hub name."""
    return expected_shapes(parse_config(config))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each uint64 (Steele, Lea & Flood's SplitMix64 finaliser).
    Unsigned NumPy arithmetic wraps modulo 2^64 on every platform, so this is exact."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_uniform(seed: int, name: str, size: int) -> np.ndarray:
    """`size` float32 values in [-1, 1), a pure function of (seed, name, index)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")
    counters = np.arange(size, dtype=np.uint64) + np.uint64(key)  # wraps, as intended
    top24 = (splitmix64(counters) >> np.uint64(40)).astype(np.float32)  # exact: 24 bits fit float32
    return top24 * np.float32(2.0**-23) - np.float32(1.0)


def initial_value(name: str, shape: tuple[int, ...], uniform: np.ndarray) -> np.ndarray:
    """Scale [-1, 1) noise to what a trained tensor of this kind looks like: norm gains
    near 1, biases near 0, matrices with unit-variance outputs (std 1/sqrt(fan_in)),
    class/position embeddings and separators of unit size."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(n in name for n in ("norm", "layrnorm")) and leaf == "weight"
    if is_norm:
        values = 1.0 + 0.1 * uniform
    elif leaf == "bias":
        values = 0.1 * uniform
    elif len(shape) >= 2 and not name.endswith(("position_embedding.weight", "_GN")):
        fan_in = int(np.prod(shape[1:]))
        values = uniform * np.float32(np.sqrt(3.0 / fan_in))  # uniform on [-a, a] has std a/sqrt(3)
    else:
        values = uniform * np.float32(np.sqrt(3.0))
    return values.astype(np.float32).reshape(shape)


def stored_as(values: np.ndarray, dtype_tag: str) -> np.ndarray:
    """float32 values in the safetensors dtype `dtype_tag` (BF16 as raw uint16 words)."""
    if dtype_tag == "BF16":
        return float32_to_bf16(values)
    return values.astype(NUMPY_DTYPES[dtype_tag])


def write_random_checkpoint(folder: Path, config: dict, dtype_tag: str = "F16", seed: int = 0) -> Path:
    """Write config.json, generation_config.json and model.safetensors with random weights
    (`initial_value` of a seeded generator's noise), every tensor stored as `dtype_tag`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes(config)
    rng = np.random.default_rng(seed)

    def arrays():
        for name, shape in shapes.items():
            uniform = rng.random(int(np.prod(shape)), dtype=np.float32) * np.float32(2) - np.float32(1)
            yield stored_as(initial_value(name, shape, uniform), dtype_tag)

    entries = {name: (dtype_tag, shape) for name, shape in shapes.items()}
    write_safetensors(folder / "model.safetensors", entries, arrays(), {"format": "pt", "note": "random weights for benchmarks"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder


def write_hashed_checkpoint(folder: Path, raw_config: dict, seed: int) -> str:
    """model.safetensors (bf16) for config.json `raw_config`, every value hashed from
    (seed, name, index). Returns the file's SHA-256."""
    shapes = checkpoint_shapes(raw_config)
    entries = {name: ("BF16", shape) for name, shape in shapes.items()}
    arrays = (
        stored_as(initial_value(name, shape, hashed_uniform(seed, name, int(np.prod(shape)))), "BF16")
        for name, shape in shapes.items()
    )
    path = Path(folder) / "model.safetensors"
    write_safetensors(path, entries, arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()
