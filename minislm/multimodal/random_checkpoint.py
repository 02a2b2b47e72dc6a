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
