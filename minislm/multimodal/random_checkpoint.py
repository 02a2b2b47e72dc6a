"""Random-weight Phi-4-multimodal checkpoints in the hub's layout, for tests.

Like Phi-3-vision's fixture (minislm/vision/random_checkpoint.py), the golden
fixture in tests/fixtures/phi4mm keeps no weights: they are a pure function of
(seed, tensor name, index), rebuilt bit for bit on every machine, and the fixture
records the file's SHA-256.

`hub_tensor_shapes` lists the tensors exactly as the hub's checkpoint names them:
the four adapted matrices of every decoder layer as `...qkv_proj.base_layer.weight`
plus `...qkv_proj.lora_A.vision.weight` / `lora_B` (and `.speech.`), as PEFT's
LoRA layers inside the remote model store them.
"""

import hashlib
from pathlib import Path

import numpy as np

from ..config import parse_config
from ..vision.random_checkpoint import hashed_uniform, initial_value
from ..weights import expected_shapes, float32_to_bf16, write_safetensors
from .config import LORA_MODULES

ADAPTERS = ("vision", "speech")


def lora_targets(config) -> list[str]:
    """The decoder modules the adapters change: 'model.layers.{i}.self_attn.qkv_proj', ..."""
    return [f"model.layers.{i}.{m}" for i in range(config.num_hidden_layers) for m in LORA_MODULES]


def hub_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a hub-layout checkpoint (model_type phi4mm), with its shape."""
    mm = config.phi4mm
    targets = set(lora_targets(config))
    shapes = {}
    for name, shape in expected_shapes(config).items():
        module = name.removesuffix(".weight")
        if module not in targets:
            shapes[name] = shape
            continue
        shapes[module + ".base_layer.weight"] = shape
        for adapter, lora in (("vision", mm.vision_lora), ("speech", mm.speech_lora)):
            shapes[f"{module}.lora_A.{adapter}.weight"] = (lora.rank, shape[1])
            shapes[f"{module}.lora_B.{adapter}.weight"] = (shape[0], lora.rank)
    return shapes


def write_hub_checkpoint(folder: Path, raw_config: dict, seed: int) -> str:
    """model.safetensors (bf16) in the hub's layout for config.json `raw_config`, every
    value hashed from (seed, name, index). Returns the file's SHA-256."""
    config = parse_config(raw_config)
    if config.phi4mm is None or config.phi4mm.layout != "phi4mm":
        raise ValueError("write_hub_checkpoint makes phi4mm (hub layout) checkpoints")
    shapes = hub_tensor_shapes(config)
    arrays = (float32_to_bf16(initial_value(name, shape, hashed_uniform(seed, name, int(np.prod(shape)))))
              for name, shape in shapes.items())
    path = Path(folder) / "model.safetensors"
    write_safetensors(path, {name: ("BF16", shape) for name, shape in shapes.items()}, arrays)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hub_name_of(converted: str, hub_names) -> str:
    """The hub's name of a tensor of transformers' conversion: the renamed encoder
    tensors mapped back, `base_layer.` put back into adapted matrices, and an adapter
    file's `vision-lora/...lora_A.weight` -> `...lora_A.vision.weight`."""
    from .config import transformers_to_hub

    folder, _, name = converted.rpartition("/")
    if folder:
        adapter = folder.removesuffix("-lora")
        return name.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}.")
    name = transformers_to_hub(name)
    if name not in hub_names:
        name = name.removesuffix(".weight") + ".base_layer.weight"
    return name


def write_converted_checkpoint(folder: Path, hub_checkpoint: Path, converted: dict) -> None:
    """A transformers-layout folder's tensors from a hub-layout checkpoint:
    model.safetensors, vision-lora/ and speech-lora/adapter_model.safetensors, with the
    names transformers' conversion script gave them (`converted`: {name: SHA-256 of the
    bf16 bytes}, recorded by tools/make_phi4mm_fixtures.py). Each tensor's bytes must
    hash to what the script wrote, so the renaming is checked tensor by tensor."""
    from ..weights import read_safetensors

    hub = read_safetensors(hub_checkpoint)
    files: dict[str, dict] = {}
    for name, digest in converted.items():
        source = hub[hub_name_of(name, hub)]
        if hashlib.sha256(np.ascontiguousarray(source.array).tobytes()).hexdigest() != digest:
            raise ValueError(f"{name}: the hub tensor {hub_name_of(name, hub)} is not the one the conversion wrote")
        target, _, tensor = name.rpartition("/")
        files.setdefault(target, {})[tensor or name] = source
    for target, tensors in files.items():
        path = Path(folder) / target / ("adapter_model.safetensors" if target else "model.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {n: (t.dtype, t.array.shape) for n, t in tensors.items()},
                          (t.array for t in tensors.values()))


# microsoft/Phi-4-multimodal-instruct's config.json (LongRoPE factors set to 1.0: they change
# no cost; the adapters' `layer` patterns left out: minislm adapts the same four matrices), for
# speed measurements.
PHI4_MULTIMODAL = {
    "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
    "rope_theta": 10000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
    "rms_norm_eps": 1e-05, "sliding_window": 262144, "hidden_act": "silu", "bos_token_id": 199999,
    "eos_token_id": 199999, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "img_processor": None,
    "embd_layer": {
        "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "embedding_cls": "audio",
                             "projection_cls": "mlp", "use_conv_downsample": False, "use_qformer": False},
        "embedding_cls": "image_audio",
        "image_embd_layer": {"crop_size": 448, "embedding_cls": "tune_image", "hd_transform_order": "sub_glb",
                             "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp",
                             "use_hd_transform": True, "with_learnable_separator": True},
    },
    "audio_processor": {"config": {
        "activation": "swish", "attention_dim": 1024, "attention_heads": 16, "batch_norm": False, "bias_in_glu": True,
        "causal": True, "chunk_size": -1, "conv_activation": "swish", "conv_glu_type": "swish",
        "depthwise_multiplier": 1, "depthwise_seperable_out_channel": 1024, "ext_pw_out_channel": 1024,
        "input_layer": "nemo_conv", "input_size": 80, "kernel_size": 3, "left_chunk": 18, "linear_units": 1536,
        "nemo_conv_settings": {"conv_channels": 1024}, "num_blocks": 24,
        "relative_attention_bias_args": {"t5_bias_max_distance": 500, "type": "t5"}, "time_reduction": 8,
    }, "name": "cascades"},
    "vision_lora": {"dp": 0.0, "lora_alpha": 512, "r": 256},
    "speech_lora": {"dp": 0.01, "lora_alpha": 640, "r": 320},
}


def write_phi4mm_shapes(folder: Path, seed: int = 0, layers: int | None = None) -> Path:
    """A bf16 hub-layout checkpoint with Phi-4-multimodal's real shapes (`layers` decoder
    layers, default all 32) and random values; no tokenizer."""
    import json

    raw = dict(PHI4_MULTIMODAL, num_hidden_layers=layers or PHI4_MULTIMODAL["num_hidden_layers"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    shapes = hub_tensor_shapes(parse_config(raw))
    rng = np.random.default_rng(seed)

    def values():
        for name, shape in shapes.items():
            uniform = rng.random(shape, dtype=np.float32) * np.float32(2) - np.float32(1)
            yield float32_to_bf16(initial_value(name, shape, uniform.reshape(-1)))

    write_safetensors(folder / "model.safetensors", {n: ("BF16", s) for n, s in shapes.items()}, values())
    return folder
