"""The packed path for files from other tools: GroupedCodes -> minislm.kernels weights.

What is checked here is the hand-over (formats/kernel_weights.py): every format's
codes, scales, zero points and offsets reach the kernel weight such that its own
`dequantize()` equals the format's exact weights bit for bit (up to the sign of a
zero), act-order's gathered inputs and stacked parts of different types included;
and that whole models run through the packed kernels close to the float path. How
exactly the kernels multiply (int8 activations per group, float32 sums) is the
kernels' own tests' subject (tests/test_kernels_packed.py).

The group-wise kernels (`Int4Weight.from_codes`, `Int8Weight`) come with the
kernels work; on a checkout without them these tests skip, saying so.
"""

import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from minislm.formats import kernel_weights
from minislm.formats.gguf_blocks import BLOCK_TYPES, K_QUANT_FIELDS, unpack_rows, unpack_superblocks
from minislm.formats.grouped import GroupedCodes, RowStack, dequantize, take_rows, to_float32
from minislm.kernels import KQuantWeight

pytestmark = pytest.mark.skipif(
    not kernel_weights.available(), reason="needs the group-wise kernels (Int4Weight.from_codes, Int8Weight)"
)

# The packed model against its "twin": the exact float32 weights multiplied by
# activations rounded as the kernels round them (int8 per group, kernels.reference),
# which the kernels reproduce up to float32 summation order. Every position is a
# forward through every weight, so a wiring mistake (a wrong part, order or zero
# point) fails the first one; later positions may part where one activation sits on
# a rounding boundary (as with llama.cpp, test_gguf_llama_cpp.py), so the first
# SAME_PREFIX positions must match to ATOL_TWIN.
ATOL_TWIN = 1e-4
SAME_PREFIX = 4


def assert_same_values(ours, expected):
    same = ours.view(np.uint32) == expected.view(np.uint32)
    assert ours.shape == expected.shape and np.all(same | ((ours == 0) & (expected == 0)))


def sane_blocks(kind, rows, cols, seed):
    """Random blocks of `kind` whose fp16 scales are small finite numbers."""
    from test_gguf import random_k_blocks

    rng = np.random.default_rng(seed)
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        return random_k_blocks(rng, rows, cols, kind)
    block_bytes = BLOCK_TYPES[kind][1]
    blocks = rng.integers(0, 256, (rows * cols // 32, block_bytes), dtype=np.uint8)
    for offset in ((0, 2) if kind in ("Q4_1", "Q5_1") else (0,)):
        blocks[:, offset : offset + 2] = rng.uniform(-0.05, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_every_gguf_type_reaches_the_kernels_exactly(kind):
    q = unpack_rows(kind, sane_blocks(kind, 40, 512, seed=len(kind)))
    assert_same_values(kernel_weights.to_kernel_weight(q).dequantize(), dequantize(q))


@pytest.mark.parametrize("kind", sorted(K_QUANT_FIELDS))
def test_k_quants_reach_the_kernels_at_their_two_levels_of_scales_exactly(kind):
    """What the loader does with a K-quant tensor: SuperBlockCodes -> KQuantWeight, whose
    weights are the GroupedCodes reading's bit for bit, stored at the file's bits per
    weight (plus 1/8 for the 6-bit sub-block scales and mins kept as bytes)."""
    blocks = sane_blocks(kind, 40, 512, seed=len(kind))
    packed = kernel_weights.to_kernel_weight(unpack_superblocks(kind, blocks))
    assert isinstance(packed, KQuantWeight) and packed.kind == kind
    assert_same_values(packed.dequantize(), dequantize(unpack_rows(kind, blocks)))
    assert_same_values(to_float32(unpack_superblocks(kind, blocks)), dequantize(unpack_rows(kind, blocks)))
    file_bits = 8 * BLOCK_TYPES[kind][1] / 256
    rows_padded = 48  # 40 rows in blocks of 16
    assert packed.nbytes * 8 / (rows_padded * 512) == file_bits + (0 if kind == "Q6_K" else 1 / 8)


def test_gathered_inputs_and_stacked_rows():
    rng = np.random.default_rng(0)
    q4 = unpack_rows("Q4_K", sane_blocks("Q4_K", 24, 256, 1))
    q6 = unpack_rows("Q6_K", sane_blocks("Q6_K", 8, 256, 2))
    stack = RowStack((take_rows(q4, rng.permutation(24)), q6))
    assert_same_values(kernel_weights.to_kernel_weight(stack).dequantize(),
                       np.concatenate([dequantize(p) for p in stack.parts]))
    order = rng.permutation(256)
    gathered = GroupedCodes(q4.codes, q4.scales, q4.offsets, 32, 4, input_order=order)
    packed = kernel_weights.to_kernel_weight(gathered)
    assert_same_values(packed.dequantize(), dequantize(gathered))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    exact = x @ dequantize(gathered).T
    assert np.abs(packed.matmul(x) - exact).max() <= 0.02 * np.abs(exact).max()
    k4 = unpack_superblocks("Q4_K", sane_blocks("Q4_K", 24, 256, 1))
    k6 = unpack_superblocks("Q6_K", sane_blocks("Q6_K", 8, 256, 2))
    k_stack = RowStack((take_rows(k4, rng.permutation(24)), k6))
    assert_same_values(kernel_weights.to_kernel_weight(k_stack).dequantize(), to_float32(k_stack))


class KernelRoundingTwin:
    """Exact float weights times activations rounded as the kernels round them (int8
    per group of 32 inputs, or of the weight group; per 256 for K-quant weights)."""

    def __init__(self, packed):
        self.packed, self.shape = packed, packed.shape

    def matmul(self, x):
        from minislm.kernels import reference

        p = self.packed
        if isinstance(p, kernel_weights.StackedRows):
            return np.concatenate([KernelRoundingTwin(part).matmul(x) for part in p.parts], axis=-1)
        if isinstance(p, kernel_weights.GatheredInputs):
            return KernelRoundingTwin(p.weight).matmul(np.ascontiguousarray(x[:, p.order]))
        a = reference.QK_K if isinstance(p, KQuantWeight) else reference.act_group_size(p.group_size)
        rounded = []
        for row in x.astype(np.float32):
            xq, x_scale, _ = reference.quantize_activations(row, a)
            rounded.append(np.repeat(x_scale, a) * xq)
        return (np.stack(rounded).astype(np.float64) @ p.dequantize().T.astype(np.float64)).astype(np.float32)

    def rows(self, ids):
        return self.packed.rows(ids)


def packed_vs_twin(path):
    from minislm.runtime import Model

    packed = minislm.load(path, kv_cache="float32")  # the weights' path alone: both sides keep a float32 cache
    assert packed.kv_cache == "float32" and minislm.load(path).kv_cache == "float16"  # a file's codes default to float16
    assert any(not isinstance(w, np.ndarray) for w in packed.weights.values()), "nothing was packed"
    twin = Model(packed.config, {name: w if isinstance(w, np.ndarray) else KernelRoundingTwin(w)
                                 for name, w in packed.weights.items()}, kv_cache="float32")
    ids = np.arange(0, packed.config.vocab_size, max(1, packed.config.vocab_size // 24))
    err = np.abs(packed.logits(ids) - twin.logits(ids)).max(-1)
    assert (err[:SAME_PREFIX] <= ATOL_TWIN).all(), err


@pytest.mark.parametrize("layout", ["phi3", "llama"])
def test_k_quant_gguf_through_the_kernels(tmp_path, layout):
    import gguf

    from gguf_files import gguf_tensors, wide_checkpoint, write_gguf
    from test_gguf import random_k_blocks

    folder = wide_checkpoint(tmp_path / "wide")
    _, arrays = gguf_tensors(folder, layout)
    rng = np.random.default_rng(3)
    tensors = {}
    for i, (name, a) in enumerate(arrays.items()):
        kind = "Q6_K" if ("attn_v" in name or "ffn_down" in name) else ("Q4_K", "Q5_K")[i % 2]
        tensors[name] = (a, None) if a.ndim == 1 else (random_k_blocks(rng, *a.shape, kind), gguf.GGMLQuantizationType[kind])
    path = write_gguf(tmp_path / "k.gguf", folder, layout, tensors=tensors)
    packed_vs_twin(path)
    fmt = minislm.load(path).weights_format   # the file's own types, not "int4"/"int8"
    assert set(dict(fmt.kinds)) == {"Q4_K", "Q5_K", "Q6_K"}, fmt.kinds   # stacked parts counted as themselves
    assert fmt.format in ("Q4_K", "Q5_K", "Q6_K") and fmt.bits == int(fmt.format[1])
    assert fmt.group_size == (16 if fmt.format == "Q6_K" else 32)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q5_1"])
def test_legacy_gguf_through_the_kernels(tmp_path, kind):
    from gguf_files import write_gguf

    packed_vs_twin(write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", kind))


def test_awq_gptq_mlx_through_the_kernels(tmp_path):
    from test_awq import awq_config, awq_packer
    from test_gptq import build
    from test_mlx import mlx_packer
    from quantized_folders import write_folders

    awq, _, _ = write_folders(FIXTURES / "moe", tmp_path / "awq", awq_config(), awq_packer(np.random.default_rng(0), False),
                              packed=lambda n: "embed_tokens" not in n and "lm_head" not in n and not n.endswith(".gate.weight"))
    gptq, _, _ = build(tmp_path / "gptq", symmetric=False, act_order=True)
    mlx, _, _ = write_folders(FIXTURES / "gqa", tmp_path / "mlx", {"group_size": 32, "bits": 4},
                              mlx_packer(np.random.default_rng(1), "bf16", {}), config_key="quantization")
    for folder in (awq, gptq, mlx):
        packed_vs_twin(folder)
