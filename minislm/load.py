"""`minislm.load`: from a folder, a repo id or a GGUF file to a ready `Model`.

The order is the order of trust: find the folder, read config.json, open and check
every tensor against the shapes the config implies, and only then convert or pack
weights. A bad checkpoint fails before any large allocation.

What `--model` can name:
    a folder with config.json and safetensors   hub float (fp32/bf16/fp16) checkpoints,
                                                minislm's own int4 folders, and the hub's
                                                4-bit AWQ, GPTQ and MLX folders
    a .gguf file                                llama.cpp's format (minislm/formats/gguf.py)
    a Hugging Face repo id                      downloaded, then as a folder
"""

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .config import load_config, load_generation_config, read_json
from .config import GenerationConfig
from .errors import MinislmError
from .formats import kernel_weights
from .formats.grouped import GroupedCodes, RowStack, to_float32
from .formats.hub_quantized import hub_quantization
from .hub import resolve_model_dir
from .model import Model
from .quantize import QuantConfig, pack_weights, read_packed_weights
from .tokenizer import load_tokenizer
from .weights import StoredTensor, check_tensors, expected_shapes, read_checkpoint, split_fused_experts


def load(
    model: str | os.PathLike,
    revision: str | None = None,
    quant: str | None = None,
    group_size: int = 32,
    symmetric: bool = True,
) -> Model:
    """Load a Phi-3 or PhiMoE checkpoint (local folder or Hugging Face repo id).

    quant=None: float32 weights, the reference path (an int4 checkpoint made by
    `minislm quantize` stays int4). quant="bf16": matrices kept as bf16 words,
    memory-mapped as they are when the checkpoint is bf16. quant="int4": matrices
    quantized now, group-wise along the inputs (`group_size` 32/64/128, symmetric
    or with zero points).

    A GGUF file, or an AWQ/GPTQ/MLX folder, keeps its own codes and scales: each
    matrix becomes a packed weight holding exactly the format's weights, multiplied
    by minislm's group-wise kernels (float32 where this install has no such kernels;
    see formats/kernel_weights.py). quant="float32" unpacks them to float32 instead,
    the exact path the tests use; "bf16"/"int4" re-quantize the unpacked weights
    (no longer the file's exact weights).
    """
    exact = quant == "float32"
    quant = None if exact else quant
    if Path(model).expanduser().is_file():
        return load_gguf(Path(model).expanduser(), quant, group_size, symmetric, exact)
    model_dir = resolve_model_dir(model, revision)
    config = load_config(model_dir)
    tensors = split_fused_experts(read_checkpoint(model_dir), config, model_dir)
    foreign = hub_quantization(read_json(Path(model_dir) / "config.json"), str(Path(model_dir) / "config.json"))
    stored = stored_quantization(model_dir) if foreign is None else None
    if foreign is not None:
        from .formats.hub_quantized import weight_plan

        plan = weight_plan(tensors, config, foreign, model_dir)
        used = quant_config(quant, group_size, symmetric)
        weights = unpack_weights(plan, config, used, exact, model_dir)
    elif stored is not None:
        if quant not in (None, stored.format):
            raise MinislmError(f"--quant {quant}: {model_dir} is already quantized to {stored.describe()}")
        weights = read_packed_weights(tensors, config, stored, model_dir)
        used = stored
    else:
        check_tensors(tensors, config, model_dir)
        used = QuantConfig(quant, group_size, symmetric) if quant else None
        if used is None:
            # Only the tensors the forward reads (a tied checkpoint may carry a spare lm_head copy).
            weights = {name: np.ascontiguousarray(tensors[name].float32()) for name in expected_shapes(config)}
        else:
            weights = pack_weights(tensors, config, used, model_dir)
    return Model(
        config,
        weights,
        tokenizer=load_tokenizer(model_dir),
        generation_config=load_generation_config(model_dir, config),
        path=Path(model_dir),
        quant=used,
    )


def stored_quantization(model_dir: Path) -> QuantConfig | None:
    """The quantization_config a `minislm quantize` checkpoint records, if any."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path).get("quantization_config")
    return None if raw is None else QuantConfig.from_json(raw, str(path))


def quant_config(quant: str | None, group_size: int, symmetric: bool) -> QuantConfig | None:
    return QuantConfig(quant, group_size, symmetric) if quant else None


def unpack_weights(plan: dict, config, quant: QuantConfig | None, exact: bool, where) -> dict:
    """The weights of a GGUF or AWQ/GPTQ/MLX file, one tensor at a time: each matrix's
    codes in a packed kernel weight (the default, where the group-wise kernels exist),
    or unpacked to float32 (`exact`, or no such kernels), or unpacked and re-packed by
    `pack_weights` when `quant` asks for bf16/int4. PhiMoE's router stays float32."""
    if quant is not None:
        return pack_weights(UnpackedTensors(plan), config, quant, where)
    native = not exact and kernel_weights.available()
    weights = {}
    for name, make in plan.items():
        stored = make()
        if native and isinstance(stored, (GroupedCodes, RowStack)) and not name.endswith("block_sparse_moe.gate.weight"):
            weights[name] = kernel_weights.to_kernel_weight(stored, name)
        else:
            weights[name] = to_float32(stored)
    return weights


class UnpackedTensors(Mapping):
    """A plan seen as the {name: StoredTensor} that `pack_weights` reads: each tensor is
    unpacked to float32 when it is looked up, so at most one is in memory at a time."""

    def __init__(self, plan: dict):
        self.plan = plan

    def __getitem__(self, name: str) -> StoredTensor:
        return StoredTensor("F32", to_float32(self.plan[name]()))

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def load_gguf(path: Path, quant: str | None, group_size: int, symmetric: bool, exact: bool) -> Model:
    """A GGUF file: config from its metadata, weights unpacked under the hub's names."""
    from .formats.gguf import generation_stop_ids, load_gguf_tokenizer, open_gguf, weight_plan

    gg = open_gguf(path)
    tokenizer = load_gguf_tokenizer(gg)
    used = quant_config(quant, group_size, symmetric)
    plan = {name: planned.make for name, planned in weight_plan(gg).items()}
    return Model(
        gg.config,
        unpack_weights(plan, gg.config, used, exact, path),
        tokenizer=tokenizer,
        generation_config=GenerationConfig(eos_token_ids=generation_stop_ids(gg)),
        path=path,
        quant=used,
    )
