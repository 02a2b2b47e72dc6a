"""4-bit safetensors folders from the hub: AWQ, GPTQ and MLX, recognised from config.json.

Such a folder is a normal model folder (config.json, tokenizer files) whose
safetensors hold, for each quantized linear layer, packed parts instead of
`.weight`: `.qweight/.qzeros/.scales` (AWQ, GPTQ, with GPTQ's `.g_idx`) or a uint32
`.weight` with `.scales/.biases` (MLX). Norms, biases and whatever the quantizer left
alone stay float tensors under their own names. What it is says config.json:

    "quantization_config": {"quant_method": "awq",  "bits": 4, "group_size": 128, "version": "gemm", ...}
    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true,
                            "sym": true, "checkpoint_format": "gptq", ...}
    "quantization":        {"group_size": 64, "bits": 4}                        (MLX)
"""

from dataclasses import dataclass, field

import numpy as np

from ..errors import MinislmError
from ..weights import StoredTensor, expected_shapes
from . import awq, gptq, mlx
from .tensors import need_part

METHODS = ("awq", "gptq", "mlx")


@dataclass(frozen=True)
class HubQuantization:
    """Which packing a folder uses, and its settings, as config.json records them."""

    method: str  # "awq", "gptq" or "mlx"
    group_size: int
    gptq_v2: bool = False  # GPTQ: zero points stored as z (True) or z - 1 (False)
    settings: dict = field(default_factory=dict)  # the raw config entry (MLX: per-module overrides)

    def describe(self) -> str:
        kind = {"awq": "AWQ (GEMM)", "gptq": "GPTQ v2" if self.gptq_v2 else "GPTQ", "mlx": "MLX"}[self.method]
        return f"{kind} 4-bit, group {self.group_size}"


def hub_quantization(raw_config: dict, source: str) -> HubQuantization | None:
    """The folder's packing from config.json, or None for a float checkpoint.
    (minislm's own int4 folders are recognised by `minislm.quantize`, not here.)"""
    entry = raw_config.get("quantization_config")
    if entry is None:
        entry = raw_config.get("quantization")
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise MinislmError(f"{source}: quantization_config must be a JSON object, got {entry!r:.80}")
    method = str(entry.get("quant_method", "mlx")).lower()  # MLX writes no quant_method
    if method == "minislm":
        return None
    if method not in METHODS:
        raise MinislmError(
            f"{source}: quant_method {method!r} is not supported (minislm reads awq, gptq, mlx and its own int4)"
        )
    bits = entry.get("bits", 4)
    if bits != 4:
        raise MinislmError(f"{source}: {method} checkpoint with bits = {bits}; minislm reads 4-bit ones only")
    if method == "awq":
        awq.check_settings(entry, source)
    if method == "mlx":
        mlx.check_settings(entry, source)
    v2 = method == "gptq" and gptq.checkpoint_format(entry, source) == "gptq_v2"
    group = entry.get("group_size", 64 if method == "mlx" else 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise MinislmError(f"{source}: group_size must be a positive integer (or -1), got {group!r}")
    return HubQuantization(method, group, v2, entry)


def is_packed(tensors: dict[str, StoredTensor], prefix: str, quant: HubQuantization) -> bool:
    """Does the checkpoint hold this matrix packed (or did the quantizer leave it float)?"""
    return f"{prefix}.qweight" in tensors if quant.method in ("awq", "gptq") else f"{prefix}.scales" in tensors


def weight_plan(tensors: dict[str, StoredTensor], config, quant: HubQuantization, where) -> dict:
    """Every tensor the decoder reads -> a function that unpacks it (GroupedCodes) or
    returns it as float32. Nothing is unpacked yet; shapes and names are checked now."""
    if quant.method == "mlx":
        tensors = mlx.split_switch_mlp(tensors, config, where)
    plan, used = {}, set()
    for name, shape in expected_shapes(config).items():
        prefix = name.removesuffix(".weight")
        if len(shape) == 2 and name.endswith(".weight") and is_packed(tensors, prefix, quant):
            plan[name] = packed_reader(tensors, prefix, shape, quant, where)
            used.update(k for k in tensors if k.startswith(prefix + ".") and k.count(".") == prefix.count(".") + 1)
            continue
        if name not in tensors:
            raise MinislmError(f"{where}: missing tensor '{name}' (neither packed nor float)")
        if tensors[name].array.shape != shape:
            raise MinislmError(
                f"{where}: tensor '{name}' has shape {list(tensors[name].array.shape)}, config.json implies {list(shape)}"
            )
        plan[name] = tensors[name].float32
        used.add(name)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise MinislmError(f"{where}: unknown tensor '{unknown[0]}' in a {quant.describe()} checkpoint")
    return plan


def packed_reader(tensors, prefix: str, shape: tuple[int, int], quant: HubQuantization, where):
    out, n = shape
    if quant.method == "mlx":
        settings = mlx.module_settings(quant.settings, prefix, str(where))
        group = settings[1] if settings else quant.group_size
    else:
        group = quant.group_size if quant.group_size > 0 else n
    # AWQ packs 8 outputs per word, GPTQ 8 inputs per word (and 8 zero points), MLX 8 inputs
    words_along = {"awq": (out,), "gptq": (out, n), "mlx": (n,)}[quant.method]
    if n % group or any(d % 8 for d in words_along):
        raise MinislmError(f"{where}: '{prefix}' ({out} x {n}) does not divide into groups of {group} and words of 8")
    module = {"awq": awq, "gptq": gptq, "mlx": mlx}[quant.method]
    for part, part_shape in module.part_shapes(shape, group).items():
        need_part(tensors, prefix, part, part_shape, where)  # fail now, before anything is unpacked
    if quant.method == "gptq" and f"{prefix}.g_idx" in tensors:
        gptq.group_order(tensors[f"{prefix}.g_idx"].array.astype(np.int64), group, f"{prefix}.g_idx", where)
    if quant.method == "awq":
        return lambda: awq.read(tensors, prefix, shape, group, where)
    if quant.method == "gptq":
        return lambda: gptq.read(tensors, prefix, shape, group, quant.gptq_v2, where)
    return lambda: mlx.read(tensors, prefix, shape, group, where)
