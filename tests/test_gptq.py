"""GPTQ folders: v1 (zero points stored minus one) and gptq_v2, symmetric and not,
act-order g_idx; unpacking is exact and the model equals its float twin.

The packer below is written from the format's definition (docs/formats.md): codes
transposed to (in, out) and 8 consecutive INPUTS per int32 word (input 8w + j in
bits 4j), zero points (v1: z - 1) packed 8 outputs per word, fp16 scales
(groups, out), and g_idx giving each input's group. With act-order, the inputs of
a group are scattered: g_idx[perm[i]] = i // G for a permutation perm, as GPTQ
assigns them when it quantizes columns in order of importance.
"""

import numpy as np
import pytest

import minislm
from conftest import ATOL_FP32_LOGITS, FIXTURES
from minislm.cli import main
from minislm.formats import gptq
from minislm.formats.grouped import dequantize
from minislm.weights import StoredTensor
from quantized_folders import known_integers, set_quantization, write_folders

GROUP = 32


def pack_rows(values: np.ndarray) -> np.ndarray:
    """uint8 (n, cols) 0..15 -> int32 (n/8, cols): row 8w + j in bits 4j of word row w."""
    words = np.zeros((values.shape[0] // 8, values.shape[1]), dtype=np.uint32)
    for j in range(8):
        words |= values[j::8].astype(np.uint32) << np.uint32(4 * j)
    return words.view(np.int32)


def pack_columns(values: np.ndarray) -> np.ndarray:
    """uint8 (rows, n) 0..15 -> int32 (rows, n/8): column 8c + j in bits 4j of word c."""
    words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for j in range(8):
        words |= values[:, j::8].astype(np.uint32) << np.uint32(4 * j)
    return words.view(np.int32)


def gptq_packer(rng, symmetric, v2, act_order, group=GROUP):
    def pack(name, shape):
        out, n = shape
        G = group if group > 0 else n
        # known integers per group; with act-order, group g holds inputs perm[g*G:(g+1)*G]
        codes, zeros, scales = known_integers(rng, shape, G, symmetric, zero_range=(0 if v2 else 1, 15))
        perm = rng.permutation(n) if act_order else np.arange(n)
        g_idx = np.empty(n, dtype=np.int32)
        g_idx[perm] = np.arange(n) // G
        prefix = name.removesuffix(".weight")
        stored_zeros = zeros if v2 else zeros - 1  # v1 keeps z - 1
        parts = {
            f"{prefix}.qweight": pack_rows(codes.T),  # (in/8, out)
            f"{prefix}.qzeros": pack_columns(stored_zeros.T),  # (groups, out/8)
            f"{prefix}.scales": np.ascontiguousarray(scales.T),  # (groups, out) fp16
            f"{prefix}.g_idx": g_idx,
        }
        s = scales.astype(np.float32)[:, g_idx]  # (out, in): each input's group
        z = zeros.astype(np.float32)[:, g_idx]
        return parts, s * (codes.astype(np.float32) - z)

    return pack


def gptq_config(group=GROUP, **extra):
    return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True, **extra}


def build(tmp_path, fixture="gqa", symmetric=True, v2=False, act_order=False, group=GROUP, lm_head=True, seed=0):
    quant = gptq_config(group, desc_act=act_order, sym=symmetric, **({"checkpoint_format": "gptq_v2"} if v2 else {}))
    return write_folders(FIXTURES / fixture, tmp_path, quant,
                         gptq_packer(np.random.default_rng(seed), symmetric, v2, act_order, group),
                         packed=lambda n: "embed_tokens" not in n and (lm_head or "lm_head" not in n)
                         and not n.endswith("block_sparse_moe.gate.weight"))


@pytest.mark.parametrize("symmetric,v2,act_order", [
    (True, False, False),  # the common AutoGPTQ file: sym, v1, g_idx = k // G
    (False, False, True),  # asymmetric zero points (1..15 in v1) with act-order
    (False, True, True),  # GPTQModel's v2: z stored as is, 0 included
    (True, True, False),
])
def test_gptq_phi3(tmp_path, symmetric, v2, act_order):
    packed, float_dir, expected = build(tmp_path, symmetric=symmetric, v2=v2, act_order=act_order)
    ours, twin = minislm.load(packed, quant="float32"), minislm.load(float_dir)
    for name, w in expected.items():
        assert np.array_equal(ours.weights[name], w), name
    ids = np.arange(0, ours.config.vocab_size, 29)
    assert np.abs(ours.logits(ids) - twin.logits(ids)).max() <= ATOL_FP32_LOGITS


def test_gptq_whole_row_group_and_phimoe(tmp_path):
    """group_size -1 (one group per row) on PhiMoE with its biases (router left float)."""
    packed, float_dir, expected = build(tmp_path, fixture="moe", symmetric=False, group=-1, lm_head=False, seed=2)
    ours, twin = minislm.load(packed, quant="float32"), minislm.load(float_dir)
    for name, w in expected.items():
        assert np.array_equal(ours.weights[name], w), name
    ids = np.arange(0, ours.config.vocab_size, 29)
    assert np.abs(ours.logits(ids) - twin.logits(ids)).max() <= ATOL_FP32_LOGITS


def read_one(parts, shape, group, v2):
    stored = {k: StoredTensor({np.int32: "I32", np.float16: "F16"}[v.dtype.type], v) for k, v in parts.items()}
    return gptq.read(stored, "m", shape, group, v2, "test")


def test_act_order_keeps_groups_contiguous_and_records_the_order():
    rng = np.random.default_rng(5)
    parts, w = gptq_packer(rng, False, False, True)("m.weight", (16, 128))
    q = read_one(parts, (16, 128), GROUP, v2=False)
    g_idx = parts["m.g_idx"]
    assert q.input_order is not None
    assert np.array_equal(g_idx[q.input_order], np.arange(128) // GROUP)  # runs of G in the stored order
    assert np.array_equal(dequantize(q), w)
    parts, _ = gptq_packer(rng, False, False, False)("m.weight", (16, 128))
    assert read_one(parts, (16, 128), GROUP, v2=False).input_order is None


def test_v1_zero_nibble_15_reads_as_16():
    """v1 stores z - 1; a stored 15 (how z = 0 wrapped) reads as z = 16, as AutoGPTQ's
    and transformers' v1 readers compute it: w = s * (q - 16)."""
    out, n = 8, 32
    codes = np.full((out, n), 3, np.uint8)
    parts = {"m.qweight": pack_rows(codes.T), "m.qzeros": pack_columns(np.full((1, out), 15, np.uint8)),
             "m.scales": np.ones((1, out), np.float16)}
    assert np.all(dequantize(read_one(parts, (out, n), GROUP, v2=False)) == 3 - 16)
    assert np.all(dequantize(read_one(parts, (out, n), GROUP, v2=True)) == 3 - 15)


def test_g_idx_that_does_not_form_groups(tmp_path, capsys):
    from minislm.weights import read_checkpoint, save_safetensors

    packed, _, _ = build(tmp_path)
    arrays = {k: np.array(t.array) for k, t in read_checkpoint(packed).items()}
    arrays["model.layers.0.mlp.down_proj.g_idx"][-3:] = 0  # group 0 gets 35 members
    save_safetensors(packed / "model.safetensors", arrays)
    assert main(["generate", "--model", str(packed), "-n", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.0.mlp.down_proj.g_idx" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("change,fragment", [
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"bits": 3}, "bits = 3"),
    ({"quant_method": "exl2"}, "quant_method 'exl2' is not supported"),
])
def test_bad_quantization_config(tmp_path, capsys, change, fragment):
    packed, _, _ = build(tmp_path)
    set_quantization(packed, {**gptq_config(), **change})
    assert main(["generate", "--model", str(packed), "-n", "1", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
