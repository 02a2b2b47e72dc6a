"""One shape for every quantized matrix minislm reads: codes, scales and offsets per group.

GGUF's blocks, AWQ, GPTQ and MLX look different on disk, but each of them, once its
bits are unpacked, says the same thing about a weight matrix W of shape (out, in):

    W[r, k] = scales[r, k // G] * codes[r, k] + offsets[r, k // G]

with integer `codes`, and one float32 scale and one float32 offset per group of G
consecutive inputs of a row. How each format fills the three arrays:

    format    codes            scale            offset
    Q8_0      int8 as stored   d                0
    Q4_0      0..15            d                -8 d
    Q4_1      0..15            d                m
    Q5_0      0..31            d                -16 d
    Q5_1      0..31            d                m
    Q4_K      0..15            d * sc[j]        -(dmin * m[j])      (sub-block j of 32)
    Q5_K      0..31            d * sc[j]        -(dmin * m[j])
    Q6_K      0..63            d * sc[j]        -32 d sc[j]         (sub-block j of 16)
    AWQ/GPTQ  0..15            s                -s z                (integer zero point z)
    MLX       0..15            s                bias                (a float, per group)

Why this is exact: every product `scale * code` above needs at most 24 significant
bits (an fp16 scale has 11, a 6-bit sub-block scale 6 more, a code at most 6 or 8), so
float32 holds it exactly, and the one rounding left is the sum — the same single
rounding the format's own dequantizer does (llama.cpp computes `d1 * q - m1`). So
`dequantize` below equals each format's reference bit for bit; the one exception is
the sign of a zero (`8d + (-8d)` is +0 where `d * 0` may be -0), which no sum can see.

A reader produces a `GroupedCodes` per matrix; a second, small step turns it into
what the decoder multiplies by: `dequantize` (float32: the exact path, for tests and
small models), or a packed kernel weight that computes the same sum (the next step).

K-quants (Q4_K, Q5_K, Q6_K) have a second shape, `SuperBlockCodes`, which keeps
their two levels of scales (an fp16 d and dmin per 256 weights, 6-bit integer
scales and mins per sub-block) instead of multiplying them out into a float32 scale
and offset per group: the kernels read those integers (kernels/kquant.py), which
is what keeps a K-quant file at its own size in memory. `as_grouped` gives the
table's form above, exactly.
"""

from dataclasses import dataclass

import numpy as np

from ..kernels.reference import KQUANT_KINDS, QK_K


@dataclass(frozen=True)
class GroupedCodes:
    """A quantized (out, in) matrix: W = scales * codes + offsets, per group of G inputs.

    `input_order` is for GPTQ's act-order checkpoints, whose groups are not runs of
    consecutive inputs: there, column j of `codes` holds original input
    `input_order[j]`, so that the groups are contiguous again (see gptq.py).
    """

    codes: np.ndarray  # (out, in) uint8, or int8 for formats that store signed codes
    scales: np.ndarray  # (out, in // G) float32
    offsets: np.ndarray  # (out, in // G) float32
    group_size: int  # G
    bits: int  # how many bits a code uses (4, 5, 6 or 8)
    input_order: np.ndarray | None = None  # (in,) permutation, or None for the natural order
    # When the offsets are exactly -scales * z for integer zero points z (Q4_0: 8, Q5_0: 16,
    # Q6_K: 32, AWQ/GPTQ: one per group), z itself: an int, or uint8 (out, in // G). A
    # kernel can then subtract z from the codes instead of adding a float per group.
    zero: int | np.ndarray | None = None

    def __post_init__(self):
        out, n = self.codes.shape
        groups = (out, n // self.group_size)
        if n % self.group_size or self.scales.shape != groups or self.offsets.shape != groups:
            raise ValueError(
                f"codes {self.codes.shape} with group size {self.group_size} need scales and offsets of shape "
                f"{groups}, got {self.scales.shape} and {self.offsets.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape


def dequantize(q: GroupedCodes) -> np.ndarray:
    """The float32 weights (out, in), in the original input order."""
    out, n = q.codes.shape
    G = q.group_size
    codes = q.codes.reshape(out, n // G, G).astype(np.float32)  # (out, groups, G)
    w = (codes * q.scales[:, :, None] + q.offsets[:, :, None]).reshape(out, n)
    if q.input_order is None:
        return w
    original = np.empty_like(w)
    original[:, q.input_order] = w  # column j goes back to input input_order[j]
    return original


def take_rows(q, rows: np.ndarray):
    """The matrix (GroupedCodes or SuperBlockCodes) with its rows reordered (row i of
    the result is row rows[i] of q)."""
    if isinstance(q, SuperBlockCodes):
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return SuperBlockCodes(q.codes[rows], q.d[rows], q.sub_scales[rows], pick(q.dmin), pick(q.sub_mins), q.bits)
    zero = q.zero[rows] if isinstance(q.zero, np.ndarray) else q.zero
    return GroupedCodes(q.codes[rows], q.scales[rows], q.offsets[rows], q.group_size, q.bits, q.input_order, zero)


SUPER_BLOCK = QK_K  # weights per K-quant super-block (256)


@dataclass(frozen=True)
class SuperBlockCodes:
    """A K-quant (out, in) matrix with its two levels of scales:

        W[r, k] = d[r, s] * sc[r, j] * (codes[r, k] - z) - dmin[r, s] * m[r, j]
                  s = k // 256, j = k // sub_block

    Q4_K and Q5_K (bits 4, 5): sub-blocks of 32, 6-bit sc and m (uint8), z = 0.
    Q6_K (bits 6): sub-blocks of 16, int8 sc, no dmin and m, z = 32.
    """

    codes: np.ndarray  # (out, in) uint8, below 2**bits
    d: np.ndarray  # (out, in // 256) float32 holding float16 values
    sub_scales: np.ndarray  # (out, in // sub_block) uint8 (Q6_K: int8)
    dmin: np.ndarray | None  # (out, in // 256) float32 holding float16 values, or None (Q6_K)
    sub_mins: np.ndarray | None  # (out, in // sub_block) uint8, or None (Q6_K)
    bits: int  # 4, 5 or 6

    @property
    def sub_block(self) -> int:
        return KQUANT_KINDS[self.bits][0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def as_grouped(self) -> GroupedCodes:
        """The same weights as GroupedCodes (scale d*sc and offset -dmin*m per sub-block,
        or Q6_K's zero code 32): every product is exact in float32, so both forms
        dequantize to the same bits."""
        G, zero, _ = KQUANT_KINDS[self.bits]
        per_sub = SUPER_BLOCK // G
        scales = np.repeat(self.d, per_sub, axis=1) * self.sub_scales.astype(np.float32)
        if self.dmin is None:
            return GroupedCodes(self.codes, scales, -zero * scales, G, self.bits, zero=zero)
        offsets = -(np.repeat(self.dmin, per_sub, axis=1) * self.sub_mins.astype(np.float32))
        return GroupedCodes(self.codes, scales, offsets, G, self.bits)


@dataclass(frozen=True)
class RowStack:
    """Matrices stacked along the output rows, e.g. [q | k | v] -> qkv_proj.

    Kept as parts rather than copied into one array, because the parts of one file
    may use different types (a Q4_K_M file stores attn_v as Q6_K beside Q4_K q and k).
    """

    parts: tuple


def to_float32(stored) -> np.ndarray:
    """What the float path multiplies by: a float32 array, whatever the reader made."""
    if isinstance(stored, SuperBlockCodes):
        stored = stored.as_grouped()
    if isinstance(stored, GroupedCodes):
        return dequantize(stored)
    if isinstance(stored, RowStack):
        return np.concatenate([to_float32(p) for p in stored.parts], axis=0)
    return np.ascontiguousarray(stored, dtype=np.float32)
