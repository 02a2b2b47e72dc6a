"""GPTQ (AutoGPTQ, GPTQModel, optimum): 4-bit codes packed along the INPUT dimension.

For a linear layer of shape (out, in), groups of G inputs:

    qweight  int32 (in/8, out)     word [w, r] holds inputs 8w..8w+7 of output r,
                                   input 8w + j in bits 4j..4j+3
    qzeros   int32 (in/G, out/8)   zero points, packed along the outputs the same way
    scales   fp16  (in/G, out)
    g_idx    int32 (in,)           the group of each input (absent in the oldest files:
                                   then input k is in group k // G)

    W[r, k] = scales[g_idx[k], r] * (q[k, r] - z[g_idx[k], r])

Two details a reader must get right:

* The zero points of the original format ("gptq", GPTQ v1) are stored minus one: a
  file holding 7 means z = 8 (what every symmetric checkpoint holds). Every v1 reader
  adds the one back to each 4-bit value, so a stored 15 — which is how the quantizer
  wrote z = 0, wrapping -1 to 15 — reads as z = 16; we do as they do. GPTQModel's
  own format ("gptq_v2", `checkpoint_format` in the config) stores z itself.
* act-order (`desc_act: true`) quantizes the inputs in order of importance, so the
  members of a group are scattered over the row: g_idx is not k // G. Sorting the
  inputs by g_idx (a permutation P) makes each group a run of G again. We keep the
  codes in that sorted order and record P (`GroupedCodes.input_order`): the float
  path puts the columns back (W[:, P] = sorted columns, exact, done once at load); a
  group-wise kernel instead multiplies the sorted columns by the activations gathered
  in the same order, x[P] — a copy of `in` numbers per token, where un-sorting the
  weights would break the runs the kernel's per-group scales rely on.
"""

import numpy as np

from ..errors import MinislmError
from .grouped import GroupedCodes
from .tensors import need_part

FORMATS = ("gptq", "gptq_v2")


def checkpoint_format(raw: dict, source: str) -> str:
    fmt = str(raw.get("checkpoint_format") or raw.get("format") or "gptq").lower()
    if fmt not in FORMATS:
        raise MinislmError(
            f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (minislm reads {', '.join(FORMATS)})"
        )
    return fmt


def unpack_rows(words: np.ndarray) -> np.ndarray:
    """int32 (n/8, cols) -> uint8 (n, cols): nibble j of word row w is row 8w + j."""
    n_words, cols = words.shape
    shifts = 4 * np.arange(8, dtype=np.uint32)
    nibbles = (words.view(np.uint32)[:, None, :] >> shifts[None, :, None]) & 0xF  # (n/8, j, cols)
    return nibbles.reshape(n_words * 8, cols).astype(np.uint8)


def unpack_columns(words: np.ndarray) -> np.ndarray:
    """int32 (rows, n/8) -> uint8 (rows, n): nibble j of word c is column 8c + j."""
    rows, n_words = words.shape
    shifts = 4 * np.arange(8, dtype=np.uint32)
    nibbles = (words.view(np.uint32)[:, :, None] >> shifts) & 0xF  # (rows, c, j)
    return nibbles.reshape(rows, n_words * 8).astype(np.uint8)


def group_order(g_idx: np.ndarray, group_size: int, name: str, where) -> np.ndarray | None:
    """The permutation that makes each group a run of G inputs; None if already so."""
    n = len(g_idx)
    order = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[order], np.arange(n) // group_size):
        raise MinislmError(f"{where}: tensor '{name}' does not put exactly {group_size} inputs in each group")
    return None if np.array_equal(order, np.arange(n)) else order


def part_shapes(shape: tuple[int, int], group_size: int) -> dict:
    out, n = shape
    return {"qweight": (n // 8, out), "qzeros": (n // group_size, out // 8), "scales": (n // group_size, out)}


def read(tensors: dict, prefix: str, shape: tuple[int, int], group_size: int, v2: bool, where) -> GroupedCodes:
    """`{prefix}.qweight/.qzeros/.scales/.g_idx` -> the (out, in) matrix as GroupedCodes."""
    out, n = shape
    G = group_size
    qweight, qzeros, scales = (need_part(tensors, prefix, part, s, where) for part, s in part_shapes(shape, G).items())
    if f"{prefix}.g_idx" in tensors:
        g_idx = np.asarray(need_part(tensors, prefix, "g_idx", (n,), where).array, dtype=np.int64)
    else:
        g_idx = np.arange(n) // G
    codes = unpack_rows(qweight.array).T  # (out, in), original input order
    zeros = unpack_columns(qzeros.array).T.astype(np.int16)  # (out, in/G) as stored
    if not v2:
        zeros += 1  # v1 stores z - 1 (a stored 15 reads as 16)
    s = np.ascontiguousarray(scales.float32().T)  # (out, in/G)
    order = group_order(g_idx, G, f"{prefix}.g_idx", where)
    if order is not None:
        codes = codes[:, order]  # groups are runs of G again
    # z = 16 does not fit a 4-bit zero code; such a matrix keeps only its float offsets
    zero = np.ascontiguousarray(zeros.astype(np.uint8)) if zeros.max() <= 15 else None
    return GroupedCodes(np.ascontiguousarray(codes), s, -(s * zeros.astype(np.float32)), G, 4, order, zero)
