"""Random-weight phi3_v checkpoints: tiny reproducible ones for tests, full-size for speed.

The golden fixture in tests/fixtures/phi3_v is checked against the reference code
on a checkpoint whose CLIP tower keeps its real width (1024: the reference
hard-codes it), so even two blocks weigh ~20 MB. Rather than commit that file, its
weights are a pure function of (seed, tensor name, index), written here with integer
arithmetic that every platform and NumPy version computes bit for bit; the fixture
records the file's SHA-256 so a test knows it rebuilt the same bytes.

`write_phi3_vision_shapes` makes a checkpoint with Phi-3-vision-128k's real shapes
(4.2B parameters) for `tools/bench_vision.py`; its values come from a seeded NumPy
generator, since speed does not depend on them.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from ..config import parse_config
from ..weights import expected_shapes, float32_to_bf16, write_safetensors

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


def write_hashed_checkpoint(folder: Path, raw_config: dict, seed: int) -> str:
    """model.safetensors (bf16) for config.json `raw_config`, every value hashed from
    (seed, name, index). Returns the file's SHA-256."""
    shapes = expected_shapes(parse_config(raw_config))
    entries = {name: ("BF16", shape) for name, shape in shapes.items()}
    arrays = (
        float32_to_bf16(initial_value(name, shape, hashed_uniform(seed, name, int(np.prod(shape)))))
        for name, shape in shapes.items()
    )
    path = Path(folder) / "model.safetensors"
    write_safetensors(path, entries, arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_phi3_vision_shapes(folder: Path, seed: int = 0, raw_config: dict = PHI3_VISION_128K) -> Path:
    """A bf16 checkpoint with Phi-3-vision-128k's shapes and random values (no tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    shapes = expected_shapes(parse_config(raw_config))
    rng = np.random.default_rng(seed)

    def values():
        for name, shape in shapes.items():
            uniform = rng.random(shape, dtype=np.float32) * np.float32(2) - np.float32(1)
            yield float32_to_bf16(initial_value(name, shape, uniform.reshape(-1)))

    write_safetensors(folder / "model.safetensors", {n: ("BF16", s) for n, s in shapes.items()}, values())
    return folder
