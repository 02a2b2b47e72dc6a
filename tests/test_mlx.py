"""MLX 4-bit folders (mlx-lm): unpacking is exact, and the model equals its float twin.

The packer below is written from the format's definition (docs/formats.md): uint32
words along the input, input 8w + j of a row in bits 4j of word w; per group of G
inputs a scale and a bias (fp16 or bf16), w = scale * q + bias. mlx-lm also packs
the embedding and the lm_head, and may give modules their own settings (or none).
Where MLX itself installs (`pip install "mlx[cpu]"` on Linux), mx.quantize and
mx.dequantize are the second reference.
"""


import numpy as np
import pytest

import minislm
from conftest import ATOL_FP32_LOGITS, FIXTURES
from minislm.cli import main
from minislm.formats import mlx
from minislm.formats.grouped import dequantize
from minislm.weights import StoredTensor, float32_to_bf16
from optional import require_module
from quantized_folders import set_quantization, write_folders

GROUP = 32


def pack_words(codes: np.ndarray) -> np.ndarray:
    """uint8 (rows, n) 0..15 -> uint32 (rows, n/8): column 8w + j in bits 4j of word w."""
    words = np.zeros((codes.shape[0], codes.shape[1] // 8), dtype=np.uint32)
    for j in range(8):
        words |= codes[:, j::8].astype(np.uint32) << np.uint32(4 * j)
    return words


def mlx_packer(rng, dtype, groups: dict):
    """Known codes, float scales and biases per group (biases any float: MLX's is not
    an integer zero point), stored as fp16 or bf16 words."""
    def pack(name, shape):
        out, n = shape
        prefix = name.removesuffix(".weight")
        G = groups.get(prefix, GROUP)
        codes = rng.integers(0, 16, (out, n), dtype=np.uint8)
        scales = rng.uniform(0.5, 1.5, (out, n // G)).astype(np.float32) / (4 * np.sqrt(n))
        biases = -8 * scales * rng.uniform(0.7, 1.3, scales.shape).astype(np.float32)
        if dtype == "bf16":
            s_words, b_words = float32_to_bf16(scales), float32_to_bf16(biases)
            s_stored, b_stored = ("BF16", s_words), ("BF16", b_words)
            s = (s_words.astype(np.uint32) << 16).view(np.float32)
            b = (b_words.astype(np.uint32) << 16).view(np.float32)
        else:
            s_stored, b_stored = scales.astype(np.float16), biases.astype(np.float16)
            s, b = s_stored.astype(np.float32), b_stored.astype(np.float32)
        parts = {f"{prefix}.weight": pack_words(codes), f"{prefix}.scales": s_stored, f"{prefix}.biases": b_stored}
        return parts, np.repeat(s, G, axis=1) * codes + np.repeat(b, G, axis=1)

    return pack


def assert_model_equals_float_twin(packed, float_dir, expected):
    ours, twin = minislm.load(packed, quant="float32"), minislm.load(float_dir)
    for name, w in expected.items():
        assert np.array_equal(ours.weights[name], w), name
    ids = np.arange(0, ours.config.vocab_size, 29)
    assert np.abs(ours.logits(ids) - twin.logits(ids)).max() <= ATOL_FP32_LOGITS


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_mlx_phi3_with_packed_embedding_and_per_module_settings(tmp_path, dtype):
    """Everything packed, the embedding and lm_head included, except one module the
    config leaves float; one module with its own group size."""
    quant = {"group_size": GROUP, "bits": 4,
             "model.layers.0.self_attn.o_proj": False,
             "model.layers.1.mlp.down_proj": {"group_size": 64, "bits": 4}}
    packer = mlx_packer(np.random.default_rng(0), dtype, {"model.layers.1.mlp.down_proj": 64})
    packed, float_dir, expected = write_folders(FIXTURES / "partial_tied", tmp_path, quant, packer,
                                                config_key="quantization",
                                                packed=lambda n: n != "model.layers.0.self_attn.o_proj.weight")
    assert_model_equals_float_twin(packed, float_dir, expected)


def test_mlx_phimoe_switch_mlp(tmp_path):
    """mlx-lm's PhiMoE stacks each layer's experts (switch_mlp); the router is packed too."""
    from minislm.weights import read_checkpoint, save_safetensors

    packed, float_dir, expected = write_folders(FIXTURES / "moe", tmp_path, {"group_size": GROUP, "bits": 4},
                                                mlx_packer(np.random.default_rng(1), "fp16", {}),
                                                config_key="quantization")
    arrays = {k: np.array(t.array) for k, t in read_checkpoint(packed).items()}
    for i in range(2):
        for proj, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            for part in ("weight", "scales", "biases"):
                experts = [arrays.pop(f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.{part}") for e in range(4)]
                arrays[f"model.layers.{i}.block_sparse_moe.switch_mlp.{proj}.{part}"] = np.stack(experts)
    save_safetensors(packed / "model.safetensors", arrays)
    assert_model_equals_float_twin(packed, float_dir, expected)


def test_unpacking_equals_mlx():
    mx = require_module("mlx.core")  # CI installs mlx[cpu] (.ci/run)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((24, 256)).astype(np.float32)
    for group in (32, 64, 128):
        wq, scales, biases = mx.quantize(mx.array(w).astype(mx.float16), group_size=group, bits=4)
        stored = {"m.weight": StoredTensor("U32", np.array(wq)), "m.scales": StoredTensor("F16", np.array(scales)),
                  "m.biases": StoredTensor("F16", np.array(biases))}
        ours = dequantize(mlx.read(stored, "m", w.shape, group, "test"))
        theirs = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group, bits=4)
        assert np.array_equal(ours, np.array(theirs)), group


@pytest.mark.parametrize("quant,fragment", [
    ({"group_size": 32, "bits": 8}, "bits = 8"),
    ({"group_size": 32, "bits": 4, "mode": "mxfp4"}, "mode 'mxfp4' is not supported"),
])
def test_bad_quantization(tmp_path, capsys, quant, fragment):
    packed, _, _ = write_folders(FIXTURES / "gqa", tmp_path, {"group_size": GROUP, "bits": 4},
                                 mlx_packer(np.random.default_rng(0), "fp16", {}), config_key="quantization")
    set_quantization(packed, quant, key="quantization")
    assert main(["generate", "--model", str(packed), "-n", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
