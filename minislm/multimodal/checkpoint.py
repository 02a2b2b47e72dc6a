"""A Phi-4-multimodal checkpoint in either layout -> minislm's names and two adapters.

The hub's files (phi4mm) hold the adapters inside the checkpoint, in the names
PEFT's LoRA layers give them inside the remote model:

    model.layers.0.self_attn.qkv_proj.base_layer.weight      the matrix W
    model.layers.0.self_attn.qkv_proj.lora_A.vision.weight   (r, in)
    model.layers.0.self_attn.qkv_proj.lora_B.vision.weight   (out, r)    (and .speech.)

transformers' conversion (phi4_multimodal) renames a few encoder tensors, drops
the LoRA tensors and `base_layer.` from the model, and writes each adapter as a
PEFT folder: vision-lora/ and speech-lora/ (adapter_config.json +
adapter_model.safetensors, names without the adapter's name).

Both become the same thing here: the weights under the hub's names without
`base_layer.` (what the Phi-4-mini decoder reads), and {"vision": Adapter,
"speech": Adapter}.
"""

import re
from pathlib import Path

from ..errors import MinislmError
from ..lora import Adapter, lora_pairs, read_peft_adapter
from .config import LORA_MODULES, Phi4MMConfig, transformers_to_hub

HUB_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>vision|speech)\.weight$")
ADAPTER_FOLDERS = {"vision": "vision-lora", "speech": "speech-lora"}


def split_checkpoint(tensors: dict, mm: Phi4MMConfig, where: Path) -> tuple[dict, dict]:
    """-> (base tensors under minislm's names, {adapter: {"<module>.lora_A.weight": tensor}})
    for the hub layout; a converted checkpoint only has its names changed back."""
    if mm.layout == "phi4_multimodal":
        renamed = {}
        for name, tensor in tensors.items():
            if ".lora_" in name:
                raise MinislmError(f"{where}: tensor '{name}': a converted checkpoint keeps its adapters in "
                                   "vision-lora/ and speech-lora/, not in the model file")
            renamed[transformers_to_hub(name)] = tensor
        return renamed, {}
    base, adapters = {}, {"vision": {}, "speech": {}}
    for name, tensor in tensors.items():
        match = HUB_LORA.match(name)
        if match:
            adapters[match["adapter"]][f"{match['module']}.lora_{match['part']}.weight"] = tensor
        elif ".lora_" in name:
            raise MinislmError(f"{where}: unknown adapter tensor '{name}' (the hub's are lora_A/lora_B of vision "
                               "and speech)")
        else:
            base[name.replace(".base_layer.", ".")] = tensor
    return base, adapters


def load_adapters(model_dir: Path, config, lora_tensors: dict, weights: dict) -> dict[str, Adapter]:
    """The vision and speech adapters, checked against the decoder's matrices. A
    hub checkpoint takes rank and alpha from config.json's vision_lora / speech_lora; a
    converted one reads its adapter folders. A missing adapter is an error: the model
    answers wrongly without it."""
    mm = config.phi4mm
    adapters = {}
    targets = r"model\.layers\.\d+\.(" + "|".join(re.escape(m) for m in LORA_MODULES) + ")"
    for name, folder in ADAPTER_FOLDERS.items():
        if mm.layout == "phi4_multimodal":
            path = Path(model_dir) / folder
            if not path.is_dir():
                raise MinislmError(f"{model_dir}: no {folder}/ folder; a converted Phi-4-multimodal needs its "
                                   f"{name} adapter (transformers' conversion writes it)")
            adapters[name] = read_peft_adapter(path, weights, config, name=name, label=str(path))
            continue
        shape = mm.vision_lora if name == "vision" else mm.speech_lora
        if shape is None or not lora_tensors.get(name):
            raise MinislmError(f"{model_dir}: the checkpoint has no {name} adapter (config.json's {name}_lora and "
                               f"lora_A.{name} / lora_B.{name} tensors); Phi-4-multimodal needs both adapters")
        where = f"{model_dir}: {name} adapter"
        adapters[name] = Adapter(name, lora_pairs(lora_tensors[name], weights, config, where, targets,
                                                  (shape.rank, shape.scale)))
        missing = {f"model.layers.{i}.{m}.weight" for i in range(config.num_hidden_layers) for m in LORA_MODULES}
        missing -= set(adapters[name].pairs)
        if missing:
            raise MinislmError(f"{where}: no LoRA tensors for {sorted(missing)[0]} (and {len(missing) - 1} more)")
    return adapters
