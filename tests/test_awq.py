"""AutoAWQ GEMM folders: unpacking is exact, and the model equals its float twin.

The packer below is written from the format's definition (docs/formats.md): the
layer's (out, in) codes transposed to (in, out), 8 neighbouring outputs per int32
word, nibble i holding output column [0, 2, 4, 6, 1, 3, 5, 7][i] of the 8; zero
points packed the same way; fp16 scales (in/G, out). Where AutoAWQ is installed, its
own unpacker (awq/utils/packing_utils.py, plain torch) is the second reference.
"""

import importlib.util

import numpy as np
import pytest

import minislm
from conftest import ATOL_FP32_LOGITS, FIXTURES
from minislm.cli import main
from minislm.formats import awq
from minislm.formats.awq import unpack_columns
from minislm.formats.grouped import dequantize
from minislm.weights import StoredTensor, read_checkpoint, save_safetensors
from optional import require_module, skip_or_fail
from quantized_folders import known_integers, set_quantization, write_folders

GROUP = 32
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq_words(columns: np.ndarray) -> np.ndarray:
    """uint8 (rows, n) values 0..15 -> int32 (rows, n/8), AWQ's interleaved nibbles."""
    rows, n = columns.shape
    words = np.zeros((rows, n // 8), dtype=np.uint32)
    for i, column in enumerate(ORDER):
        words |= columns[:, column::8].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def awq_packer(rng, symmetric):
    def pack(name, shape):
        codes, zeros, scales = known_integers(rng, shape, GROUP, symmetric)
        prefix = name.removesuffix(".weight")
        parts = {
            f"{prefix}.qweight": pack_awq_words(codes.T),  # (in, out/8)
            f"{prefix}.qzeros": pack_awq_words(zeros.T),  # (in/G, out/8)
            f"{prefix}.scales": np.ascontiguousarray(scales.T),  # (in/G, out) fp16
        }
        s = np.repeat(scales.astype(np.float32), GROUP, axis=1)
        z = np.repeat(zeros.astype(np.float32), GROUP, axis=1)
        return parts, s * (codes.astype(np.float32) - z)  # the definition, in float32

    return pack


def awq_config(group=GROUP, **extra):
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm", **extra}


def test_unpacking_a_known_word():
    """0x76543210: nibble i holds i, so the 8 columns read 0, 4, 1, 5, 2, 6, 3, 7."""
    assert unpack_columns(np.array([[0x76543210]], dtype=np.int32)).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


def assert_model_equals_float_twin(packed, float_dir, expected):
    ours, twin = minislm.load(packed, quant="float32"), minislm.load(float_dir)
    for name, w in expected.items():
        assert np.array_equal(ours.weights[name], w), name  # bit for bit (up to the sign of zero)
    ids = np.arange(0, ours.config.vocab_size, 29)
    assert np.abs(ours.logits(ids) - twin.logits(ids)).max() <= ATOL_FP32_LOGITS


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_phi3(tmp_path, symmetric):
    packed, float_dir, expected = write_folders(FIXTURES / "gqa", tmp_path, awq_config(),
                                                awq_packer(np.random.default_rng(0), symmetric),
                                                packed=lambda n: "embed_tokens" not in n and "lm_head" not in n)
    assert_model_equals_float_twin(packed, float_dir, expected)


@pytest.mark.parametrize("fixture,router_packed", [("moe", False), ("moe_longrope", True)])
def test_awq_phimoe(tmp_path, fixture, router_packed):
    """Phi-3.5-MoE in AWQ: q/k/v/o (with their float biases) and every expert's w1/w2/w3
    packed; the router either left float (AutoAWQ's usual choice) or packed too (8
    experts: AWQ packs 8 outputs per word)."""
    def packed(name):
        if "embed_tokens" in name or "lm_head" in name:
            return False
        return router_packed or not name.endswith("block_sparse_moe.gate.weight")

    root = tmp_path
    quant = awq_config(modules_to_not_convert=None if router_packed else ["gate"])
    packed_dir, float_dir, expected = write_folders(FIXTURES / fixture, root, quant,
                                                    awq_packer(np.random.default_rng(1), False), packed=packed)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in read_checkpoint(packed_dir)
    assert_model_equals_float_twin(packed_dir, float_dir, expected)


def load_autoawq_packing_utils():
    """AutoAWQ's unpacker, from its one plain-torch file (the package's __init__ wants
    its GPU dependency stack, so the file is loaded alone)."""
    require_module("torch")
    spec = importlib.util.find_spec("awq")
    if spec is None:
        skip_or_fail("AutoAWQ is not installed (pip install --no-deps autoawq==0.2.9)", "MINISLM_REQUIRE_FORMAT_REFERENCES")
    path = spec.submodule_search_locations[0] + "/utils/packing_utils.py"
    module_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_unpacking_equals_autoawq(tmp_path):
    """AutoAWQ's dequantize_gemm on the same words, with the scales given as float32 so
    that it evaluates (q - z) * s in float32 as we do. (On its own it uses the fp16
    scales and rounds each weight to fp16.)"""
    packing = load_autoawq_packing_utils()
    torch = require_module("torch")
    rng = np.random.default_rng(3)
    out, n = 48, 128
    codes, zeros, scales = known_integers(rng, (out, n), GROUP, symmetric=False)
    arrays = {"m.qweight": pack_awq_words(codes.T), "m.qzeros": pack_awq_words(zeros.T), "m.scales": scales.T.copy()}
    stored = {k: StoredTensor({np.int32: "I32", np.float16: "F16"}[v.dtype.type], v) for k, v in arrays.items()}
    ours = dequantize(awq.read(stored, "m", (out, n), GROUP, "test"))
    theirs = packing.dequantize_gemm(torch.from_numpy(arrays["m.qweight"]), torch.from_numpy(arrays["m.qzeros"]),
                                     torch.from_numpy(arrays["m.scales"].astype(np.float32)), 4, GROUP)
    assert np.array_equal(ours, theirs.numpy().T)


@pytest.mark.parametrize("change,fragment", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"bits": 8}, "bits = 8"),
    ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"zero_point": False}, "zero_point: false"),
])
def test_bad_quantization_config(tmp_path, capsys, change, fragment):
    packed, _, _ = write_folders(FIXTURES / "gqa", tmp_path, awq_config(), awq_packer(np.random.default_rng(0), True),
                                 packed=lambda n: "embed_tokens" not in n and "lm_head" not in n)
    set_quantization(packed, {**awq_config(), **change})
    assert main(["generate", "--model", str(packed), "-n", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "config.json" in err, err


def test_missing_part(tmp_path, capsys):
    packed, _, _ = write_folders(FIXTURES / "gqa", tmp_path, awq_config(), awq_packer(np.random.default_rng(0), True),
                                 packed=lambda n: "embed_tokens" not in n and "lm_head" not in n)
    arrays = {k: np.array(t.array) for k, t in read_checkpoint(packed).items() if k != "model.layers.1.mlp.down_proj.qzeros"}
    save_safetensors(packed / "model.safetensors", arrays)
    assert main(["generate", "--model", str(packed), "-n", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing tensor 'model.layers.1.mlp.down_proj.qzeros'" in err, err
