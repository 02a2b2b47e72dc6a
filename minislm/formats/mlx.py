"""MLX (mlx-lm's `convert -q`): 4-bit codes packed along the input, a float scale AND bias.

For a matrix of shape (out, in) and groups of G inputs (64 by default):

    weight   uint32 (out, in/8)    input 8w + j of row r in bits 4j..4j+3 of word [r, w]
    scales   fp16/bf16 (out, in/G)
    biases   fp16/bf16 (out, in/G)

    W[r, k] = scales[r, k // G] * q[r, k] + biases[r, k // G]

The offset is a float of its own (the group's minimum, roughly), not scale times an
integer zero point, so it cannot be stored as minislm's int4 zero point. It is
exactly the `offsets` of grouped.py, though: the float path and a kernel that
adds `bias * sum(x of the group)` per group both reproduce it. MLX evaluates the
formula in the model's dtype (fp16/bf16); we evaluate it in float32, where the
product is exact and only the sum rounds.

mlx-lm also quantizes the embedding (looked up row by row) and the lm_head, and may
record per-module settings in the config: `"quantization": {"group_size": 64,
"bits": 4, "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 4}}`, or
`false` for a module it left in float. Its PhiMoE stacks each layer's experts
(`block_sparse_moe.switch_mlp.{gate,up,down}_proj`, leading axis = expert), which
`split_switch_mlp` hands out as the hub's per-expert w1, w3, w2.
"""

import numpy as np

from ..errors import MinislmError
from ..weights import StoredTensor
from .grouped import GroupedCodes
from .tensors import need_part


def module_settings(raw: dict, module: str, source: str) -> tuple[int, int] | None:
    """(bits, group_size) for one module, or None if the config says it stays float."""
    override = raw.get(module)
    if override is False:
        return None
    settings = override if isinstance(override, dict) else raw
    bits, group = settings.get("bits", 4), settings.get("group_size", 64)
    if bits != 4:
        raise MinislmError(f"{source}: MLX quantization with bits = {bits} ({module}) is not supported; minislm reads 4-bit")
    return bits, int(group)


def check_settings(raw: dict, source: str) -> None:
    mode = raw.get("mode", "affine")
    if mode != "affine":
        raise MinislmError(f"{source}: MLX quantization mode {mode!r} is not supported (minislm reads 'affine')")
    module_settings(raw, "", source)


def part_shapes(shape: tuple[int, int], group_size: int) -> dict:
    out, n = shape
    return {"weight": (out, n // 8), "scales": (out, n // group_size), "biases": (out, n // group_size)}


def read(tensors: dict, prefix: str, shape: tuple[int, int], group_size: int, where) -> GroupedCodes:
    """`{prefix}.weight/.scales/.biases` -> the (out, in) matrix as GroupedCodes."""
    out, n = shape
    words, scales, biases = (need_part(tensors, prefix, part, s, where) for part, s in part_shapes(shape, group_size).items())
    shifts = 4 * np.arange(8, dtype=np.uint32)
    codes = ((np.asarray(words.array, dtype=np.uint32)[:, :, None] >> shifts) & 0xF).reshape(out, n).astype(np.uint8)
    return GroupedCodes(codes, as_float32(scales.float32()), as_float32(biases.float32()), group_size, 4)


def as_float32(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)


SWITCH_MLP = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def split_switch_mlp(tensors: dict[str, StoredTensor], config, where) -> dict[str, StoredTensor]:
    """mlx-lm's stacked PhiMoE experts -> the hub's per-expert names (views, not copies):
    `model.layers.N.block_sparse_moe.switch_mlp.gate_proj.{weight,scales,biases}` (E, ...)
    -> `model.layers.N.block_sparse_moe.experts.{e}.w1.{weight,scales,biases}`."""
    if config.model_type != "phimoe":
        return tensors
    tensors = dict(tensors)
    for name in [n for n in tensors if ".block_sparse_moe.switch_mlp." in n]:
        layer, rest = name.split(".block_sparse_moe.switch_mlp.")
        proj, part = rest.split(".")
        stacked = tensors.pop(name)
        if proj not in SWITCH_MLP or stacked.array.shape[0] != config.num_local_experts:
            raise MinislmError(f"{where}: tensor '{name}' of shape {list(stacked.array.shape)} is not an expert stack of this config")
        for e in range(config.num_local_experts):
            expert = f"{layer}.block_sparse_moe.experts.{e}.{SWITCH_MLP[proj]}.{part}"
            tensors[expert] = StoredTensor(stacked.dtype, stacked.array[e])
    return tensors
