"""AutoAWQ's GEMM format: 4-bit codes packed along the OUTPUT dimension, in a shuffled order.

AWQ (activation-aware weight quantization) chooses per-channel scalings before
quantizing, but what reaches the file is plain group-wise 4-bit with integer zero
points, for each linear layer of shape (out, in) and groups of G inputs:

    qweight  int32 (in, out/8)     8 codes per word, for 8 neighbouring OUTPUTS
    qzeros   int32 (in/G, out/8)   the zero points, packed the same way
    scales   fp16  (in/G, out)

    W[r, k] = scales[k // G, r] * (q[k, r] - z[k // G, r])

Note the transpose: the file is (in, out), the hub's matrices are (out, in). And the
order of the nibbles in a word is not 0..7: the GEMM kernel wanted pairs of outputs
that sit 4 apart, so nibble i (bits 4i..4i+3) holds output column

    AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7][i]           (of the 8 columns of that word)

So a word 0x76543210 (nibble i = i) means columns 0..7 hold 0, 4, 1, 5, 2, 6, 3, 7.
"""

import numpy as np

from ..errors import MinislmError
from .grouped import GroupedCodes
from .tensors import need_part

AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of a word holds column AWQ_ORDER[i]


def check_settings(raw: dict, source: str) -> None:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise MinislmError(f"{source}: AWQ version {version!r} is not supported (minislm reads AutoAWQ's 'gemm' packing)")
    if raw.get("zero_point", True) is False:
        raise MinislmError(f"{source}: AWQ without zero points (zero_point: false) is not supported")


def unpack_columns(words: np.ndarray) -> np.ndarray:
    """int32 (rows, n/8) words -> uint8 (rows, n) codes, undoing AWQ's nibble order."""
    rows, n_words = words.shape
    shifts = 4 * np.arange(8, dtype=np.uint32)
    nibbles = (words.view(np.uint32)[:, :, None] >> shifts) & 0xF  # (rows, n/8, nibble i)
    columns = np.empty_like(nibbles)
    columns[:, :, AWQ_ORDER] = nibbles  # column AWQ_ORDER[i] <- nibble i
    return columns.reshape(rows, n_words * 8).astype(np.uint8)


def part_shapes(shape: tuple[int, int], group_size: int) -> dict:
    out, n = shape
    return {"qweight": (n, out // 8), "qzeros": (n // group_size, out // 8), "scales": (n // group_size, out)}


def read(tensors: dict, prefix: str, shape: tuple[int, int], group_size: int, where) -> GroupedCodes:
    """`{prefix}.qweight/.qzeros/.scales` -> the (out, in) matrix as GroupedCodes."""
    out, n = shape
    G = group_size
    qweight, qzeros, scales = (need_part(tensors, prefix, part, s, where) for part, s in part_shapes(shape, G).items())
    codes = unpack_columns(qweight.array).T  # (out, in)
    zeros = np.ascontiguousarray(unpack_columns(qzeros.array).T)  # (out, in/G) uint8
    s = np.ascontiguousarray(scales.float32().T)  # (out, in/G)
    return GroupedCodes(np.ascontiguousarray(codes), s, -(s * zeros.astype(np.float32)), G, 4, zero=zeros)

