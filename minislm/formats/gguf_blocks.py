"""GGUF's block types, unpacked into codes, scales and offsets (see grouped.py).

llama.cpp stores each row of a matrix as a run of fixed-size blocks; a block holds
its own scale(s) and the packed codes of 32 (legacy types) or 256 (K-quants)
consecutive weights. Every function here takes the blocks of a tensor as a
(n_blocks, block_bytes) uint8 array and returns (codes, scales, offsets) per
block: codes (n_blocks, weights per block), scales and offsets
(n_blocks, groups per block), float32, so that

    weight = scale * code + offset          (one scale/offset per group)

The K-quants' `*_fields` functions return their fields before that multiplication
(`unpack_superblocks`: the codes, fp16 d and dmin, integer sub-block scales and
mins), which is what the kernels read (kernels/kquant.py).

The byte layouts are drawn in docs/formats.md; llama.cpp's `ggml-common.h` defines
them and `gguf.quants.dequantize` (the same project's NumPy reference) is what
tests/test_gguf_blocks.py holds these functions to, bit for bit.
"""

import numpy as np

from .grouped import GroupedCodes, SuperBlockCodes

QK_K = 256  # weights per K-quant super-block


def fp16(two_bytes: np.ndarray) -> np.ndarray:
    """(n, 2) little-endian bytes -> (n,) float32 (fp16 widens exactly)."""
    return np.ascontiguousarray(two_bytes).view("<f2")[:, 0].astype(np.float32)


def nibbles(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Low and high 4 bits of each byte."""
    return packed & np.uint8(0x0F), packed >> np.uint8(4)


def bits_of_u32(four_bytes: np.ndarray) -> np.ndarray:
    """(n, 4) bytes read as a little-endian uint32 -> (n, 32) bits, bit j in column j."""
    word = np.ascontiguousarray(four_bytes).view("<u4")  # (n, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def per_group(values: np.ndarray, groups: int) -> np.ndarray:
    """A per-block value repeated for each group of the block: (n,) -> (n, groups)."""
    return np.repeat(values[:, None], groups, axis=1)


# ---------------------------------------------------------------- 32-weight blocks


def q8_0(blocks):
    """Q8_0, 34 bytes: fp16 d, then 32 int8 codes. w = d * q."""
    d = fp16(blocks[:, 0:2])
    codes = blocks[:, 2:34].view(np.int8)
    return codes, d[:, None], np.zeros((len(blocks), 1), np.float32)


def q4_0(blocks):
    """Q4_0, 18 bytes: fp16 d, then 16 bytes; weight i in the low nibble of byte i,
    weight i + 16 in the high nibble. w = d * (q - 8)."""
    d = fp16(blocks[:, 0:2])
    low, high = nibbles(blocks[:, 2:18])
    codes = np.concatenate([low, high], axis=1)  # (n, 32)
    return codes, d[:, None], (-8 * d)[:, None]


def q4_1(blocks):
    """Q4_1, 20 bytes: fp16 d, fp16 m, then nibbles as in Q4_0. w = d * q + m."""
    d, m = fp16(blocks[:, 0:2]), fp16(blocks[:, 2:4])
    low, high = nibbles(blocks[:, 4:20])
    return np.concatenate([low, high], axis=1), d[:, None], m[:, None]


def q5_0(blocks):
    """Q5_0, 22 bytes: fp16 d, a uint32 of fifth bits (bit i for weight i), then the
    low nibbles as in Q4_0. w = d * (q - 16)."""
    d = fp16(blocks[:, 0:2])
    codes = five_bit_codes(blocks[:, 2:6], blocks[:, 6:22])
    return codes, d[:, None], (-16 * d)[:, None]


def q5_1(blocks):
    """Q5_1, 24 bytes: fp16 d, fp16 m, fifth bits, low nibbles. w = d * q + m."""
    d, m = fp16(blocks[:, 0:2]), fp16(blocks[:, 2:4])
    codes = five_bit_codes(blocks[:, 4:8], blocks[:, 8:24])
    return codes, d[:, None], m[:, None]


def five_bit_codes(high_bits, packed):
    low, high = nibbles(packed)
    return np.concatenate([low, high], axis=1) | (bits_of_u32(high_bits) << np.uint8(4))


# ---------------------------------------------------------------- K-quants: 256-weight super-blocks


def k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of Q4_K/Q5_K scales: eight 6-bit scales and eight 6-bit mins.

        bytes 0-3   scale j (j < 4) in the low 6 bits; top 2 bits of scale j+4
        bytes 4-7   min j   (j < 4) in the low 6 bits; top 2 bits of min j+4
        bytes 8-11  low 4 bits of scale j+4 | low 4 bits of min j+4 << 4
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)  # (n, 8)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)  # (n, 8)
    return scales, mins


def k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes of a Q4_K/Q5_K block -> 256 4-bit codes: each run of 32 bytes holds
    64 weights, the first 32 in the low nibbles and the next 32 in the high ones."""
    chunks = qs.reshape(len(qs), 4, 1, 32)  # (n, 4 chunks, 1, 32)
    low, high = nibbles(chunks)
    return np.concatenate([low, high], axis=2).reshape(len(qs), QK_K)


def q4_k_fields(blocks):
    """Q4_K, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of
    nibbles. Eight sub-blocks of 32: w = (d * scale_j) * q - (dmin * min_j).
    Returns (codes (n, 256), d (n,), scales (n, 8), dmin (n,), mins (n, 8))."""
    d, dmin = fp16(blocks[:, 0:2]), fp16(blocks[:, 2:4])
    sc, m = k_scales_and_mins(blocks[:, 4:16])
    return k_low_nibbles(blocks[:, 16:144]), d, sc, dmin, m


def q5_k_fields(blocks):
    """Q5_K, 176 bytes: as Q4_K with 32 bytes of fifth bits before the nibbles; the
    fifth bit of weight 32 j + l is bit j of byte l."""
    d, dmin = fp16(blocks[:, 0:2]), fp16(blocks[:, 2:4])
    sc, m = k_scales_and_mins(blocks[:, 4:16])
    qh = blocks[:, 16:48]  # (n, 32)
    fifth = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    codes = k_low_nibbles(blocks[:, 48:176]) | (fifth.reshape(len(blocks), QK_K) << np.uint8(4))
    return codes, d, sc, dmin, m


def q6_k_fields(blocks):
    """Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit high parts,
    16 int8 scales, fp16 d. Sixteen sub-blocks of 16: w = (d * scale_j) * (q - 32).
    Returns (codes (n, 256), d (n,), scales (n, 16) int8, None, None).

    Each half of 128 weights uses 64 low-nibble bytes L and 32 high bytes H; with
    l < 32, weight l takes L[l] low and H[l] bits 0-1, weight l+32 L[l+32] low and
    bits 2-3, weight l+64 L[l] high and bits 4-5, weight l+96 L[l+32] high and bits 6-7.
    """
    n = len(blocks)
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)  # (n, half, which 32 bytes, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # (n, half, 1, 32)
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8)  # (n, 16)
    low, high = nibbles(ql)  # (n, half, 2, 32) each
    low4 = np.concatenate([low, high], axis=2)  # (n, half, 4, 32): weights l, l+32, l+64, l+96
    top2 = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3  # (n, half, 4, 32)
    return (low4 | (top2 << np.uint8(4))).reshape(n, QK_K), fp16(blocks[:, 208:210]), sc, None, None


def with_offsets(fields):
    """A K-quant's fields -> (codes, scales, offsets) per sub-block (see grouped.py)."""
    codes, d, sc, dmin, m = fields
    scales = d[:, None] * sc.astype(np.float32)
    offsets = -32 * scales if dmin is None else -(dmin[:, None] * m.astype(np.float32))
    return codes, scales, offsets


def q4_k(blocks):
    return with_offsets(q4_k_fields(blocks))


def q5_k(blocks):
    return with_offsets(q5_k_fields(blocks))


def q6_k(blocks):
    return with_offsets(q6_k_fields(blocks))


# type name -> (weights per block, bytes per block, weights per group, bits per code, unpacker)
# (and ZERO_CODES: the integer zero point of the types whose offset is -zero * scale)
ZERO_CODES = {"Q4_0": 8, "Q5_0": 16, "Q6_K": 32}
BLOCK_TYPES = {
    "Q8_0": (32, 34, 32, 8, q8_0),
    "Q4_0": (32, 18, 32, 4, q4_0),
    "Q4_1": (32, 20, 32, 4, q4_1),
    "Q5_0": (32, 22, 32, 5, q5_0),
    "Q5_1": (32, 24, 32, 5, q5_1),
    "Q4_K": (QK_K, 144, 32, 4, q4_k),
    "Q5_K": (QK_K, 176, 32, 5, q5_k),
    "Q6_K": (QK_K, 210, 16, 6, q6_k),
}


K_QUANT_FIELDS = {"Q4_K": (4, q4_k_fields), "Q5_K": (5, q5_k_fields), "Q6_K": (6, q6_k_fields)}


def unpack_superblocks(kind: str, data: np.ndarray) -> SuperBlockCodes:
    """A K-quant tensor as stored, (rows, bytes per row) uint8 -> SuperBlockCodes: its
    codes, and its scales at their two levels as the file has them (grouped.py)."""
    bits, fields = K_QUANT_FIELDS[kind]
    rows = data.shape[0]
    codes, d, sc, dmin, m = fields(np.ascontiguousarray(data).reshape(-1, BLOCK_TYPES[kind][1]))
    per_row = lambda a: None if a is None else a.reshape(rows, -1)  # noqa: E731
    return SuperBlockCodes(codes.reshape(rows, -1), per_row(d), per_row(sc), per_row(dmin), per_row(m), bits)


def unpack_rows(kind: str, data: np.ndarray) -> GroupedCodes:
    """A tensor of `kind` as stored, (rows, bytes per row) uint8 -> GroupedCodes (rows, weights per row)."""
    block_weights, block_bytes, group, bits, unpack_blocks = BLOCK_TYPES[kind]
    rows = data.shape[0]
    codes, scales, offsets = unpack_blocks(np.ascontiguousarray(data).reshape(-1, block_bytes))
    return GroupedCodes(codes.reshape(rows, -1), scales.reshape(rows, -1), offsets.reshape(rows, -1), group, bits,
                        zero=ZERO_CODES.get(kind))
