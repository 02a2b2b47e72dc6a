"""GGUF block unpacking, bit for bit against the `gguf` package's own dequantizer.

`gguf.quants.dequantize` is the llama.cpp project's NumPy reference (its K-quant
code follows ggml-quants.c's dequantize_row_*). Blocks are random bytes (seeded by
hypothesis), with the fp16 scale fields drawn as finite fp16 numbers (edge values
included: 0, the smallest subnormal, ±65504), plus hand-made edge blocks: all
zeros, all ones (every 6-bit scale and min at 63), and K-quant scale bytes that
exercise sub-blocks 4-7, whose scales and mins borrow the top bits of bytes 0-7.

"Bit for bit": minislm computes scale * code + offset where the reference computes
e.g. d * (q - 8); both are exact until the one final rounding, so the float32
patterns agree — except that a zero may come out +0 where the reference has -0
(8d + (-8d) versus d * 0 for negative d). The helper below checks exactly that.
"""

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.formats.gguf_blocks import BLOCK_TYPES, k_scales_and_mins, unpack_rows
from minislm.formats.grouped import dequantize

# byte offsets of each type's fp16 fields within a block
FP16_FIELDS = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}
# fp16 bit patterns with an exponent below all-ones: every finite fp16, +-0 and
# subnormals included, without the filtering st.floats(width=16) would do
FINITE_FP16 = st.builds(lambda sign, magnitude: float(np.array([sign << 15 | magnitude], np.uint16).view(np.float16)[0]),
                        st.integers(0, 1), st.integers(0, 0x7BFF))


def reference(kind: str, data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])


def assert_same_bits(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    same = ours.view(np.uint32) == ref.view(np.uint32)
    assert np.all(same | ((ours == 0) & (ref == 0))), f"{np.count_nonzero(~same)} values differ"


def with_scales(kind: str, raw: bytes, scales: list[float], rows: int) -> np.ndarray:
    block_bytes = BLOCK_TYPES[kind][1]
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, block_bytes).copy()
    fields = FP16_FIELDS[kind]
    values = np.array(scales, dtype=np.float16).reshape(len(blocks), len(fields))
    for j, offset in enumerate(fields):
        blocks[:, offset : offset + 2] = values[:, j : j + 1].view(np.uint8)
    return blocks.reshape(rows, -1)


@st.composite
def tensors(draw, kind):
    block_bytes = BLOCK_TYPES[kind][1]
    rows, per_row = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = rows * per_row
    # the code bytes from a seeded generator (hypothesis is slow at drawing kilobytes)
    raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(n * block_bytes)
    scales = draw(st.lists(FINITE_FP16, min_size=n * len(FP16_FIELDS[kind]), max_size=n * len(FP16_FIELDS[kind])))
    return with_scales(kind, raw, scales, rows)


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_unpacked_blocks_equal_gguf_dequantize(kind, data):
    tensor = data.draw(tensors(kind))
    assert_same_bits(dequantize(unpack_rows(kind, tensor)), reference(kind, tensor))


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0xC3])
@pytest.mark.parametrize("scale", [0.0, -65504.0, 2.0**-24, 1.0])
def test_edge_blocks(kind, fill, scale):
    """All-zero and all-one code bytes (every 6-bit scale/min 63 for 0xFF), with
    extreme scales: the largest fp16, the smallest subnormal, zero."""
    block_bytes = BLOCK_TYPES[kind][1]
    raw = bytes([fill]) * (2 * block_bytes)
    tensor = with_scales(kind, raw, [scale] * (2 * len(FP16_FIELDS[kind])), rows=2)
    assert_same_bits(dequantize(unpack_rows(kind, tensor)), reference(kind, tensor))


def test_k_quant_scales_of_sub_blocks_4_to_7():
    """Sub-blocks 4-7 take their scale's low 4 bits from bytes 8-11 and the top 2 from
    bytes 0-3 (bits 6-7); their min's low 4 bits from the high nibbles of 8-11 and the
    top 2 from bytes 4-7. Sub-blocks 0-3 use the low 6 bits of bytes 0-7."""
    packed = np.array([[0b11_000001, 0b10_000010, 0b01_000011, 0b00_000100,
                        0b01_000101, 0b10_000110, 0b11_000111, 0b00_001000,
                        0x9A, 0xBC, 0xDE, 0xF1]], dtype=np.uint8)
    scales, mins = k_scales_and_mins(packed)
    assert scales.tolist() == [[1, 2, 3, 4, 0b11_1010, 0b10_1100, 0b01_1110, 0b00_0001]]
    assert mins.tolist() == [[5, 6, 7, 8, 0b01_1001, 0b10_1011, 0b11_1101, 0b00_1111]]


def test_group_sizes_and_code_ranges():
    """What the kernels need to know: G and the code range per type."""
    rng = np.random.default_rng(0)
    for kind, (_, block_bytes, group, bits, _) in BLOCK_TYPES.items():
        tensor = with_scales(kind, rng.bytes(4 * block_bytes), [1.0] * 4 * len(FP16_FIELDS[kind]), rows=2)
        q = unpack_rows(kind, tensor)
        assert q.group_size == group and q.codes.shape[1] == q.scales.shape[1] * group
        if kind == "Q8_0":
            assert q.codes.dtype == np.int8
        else:
            assert q.codes.dtype == np.uint8 and q.codes.max() < 2**bits
