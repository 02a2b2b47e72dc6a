"""bf16 and int4 weights inside the model: loading, saving, round trips, refusals.

The kernels themselves are property-tested against their NumPy references in
test_kernels_*.py; here we check the wiring: which tensors get packed, that a
saved int4 checkpoint loads back bit for bit and memory-mapped, and that the
packed model decodes through the cache exactly as it runs a full forward.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import minislm
from minislm.errors import MinislmError
from minislm.kernels import Bf16Weight, Int4Weight, Int8Weight
from minislm.kernels import reference as ref
from minislm.quantize import OLD_LAYOUT, QuantConfig, output_layer, save_quantized
from conftest import ATOL_FP32_LOGITS, FIXTURES, decoder_greedy


def test_bf16_checkpoint_is_mapped_not_copied_and_matches_transformers():
    # a bf16 checkpoint's words widen exactly: only the summation order differs from transformers
    model = minislm.load(FIXTURES / "sharded_bf16", quant="bf16", kv_cache="float32")  # float16 is the default
    w = model.weights["model.layers.0.self_attn.qkv_proj.weight"]
    assert isinstance(w, Bf16Weight) and not w.bits.flags.owndata  # a view of the file
    reference = load_file(FIXTURES / "sharded_bf16" / "reference.safetensors")
    got = model.logits(reference["case.seq.input_ids"])
    assert np.abs(got - reference["case.seq.logits"]).max() <= ATOL_FP32_LOGITS
    assert decoder_greedy(model, reference["greedy.prompt"], 20) == reference["greedy.tokens"].tolist()


def test_norms_biases_and_the_router_stay_float32():
    model = minislm.load(FIXTURES / "moe", quant="int4")
    for name, w in model.weights.items():
        two_d = len(w.shape) == 2
        stays_exact = not two_d or name.endswith("block_sparse_moe.gate.weight")
        assert isinstance(w, np.ndarray) == stays_exact, name
    assert isinstance(model.weights["model.layers.0.block_sparse_moe.gate.weight"], np.ndarray)
    assert isinstance(model.weights["model.layers.0.block_sparse_moe.experts.1.w2.weight"], Int4Weight)
    assert isinstance(model.weights["model.embed_tokens.weight"], Int4Weight)
    assert isinstance(model.weights["lm_head.weight"], Int8Weight)   # the output layer: 8 bits


@pytest.mark.parametrize("output_bits", [8, 4])
def test_the_output_layer_is_8_bit_unless_asked_and_a_tied_embedding_is_the_output_layer(output_bits):
    model = minislm.load(FIXTURES / "partial_tied", quant="int4", output_bits=output_bits)
    assert model.config.tie_word_embeddings and output_layer(model.config) == "model.embed_tokens.weight"
    assert isinstance(model.weights["model.embed_tokens.weight"], Int8Weight if output_bits == 8 else Int4Weight)
    assert isinstance(model.weights["model.layers.0.mlp.down_proj.weight"], Int4Weight)


@pytest.mark.parametrize("variant", ["gqa", "partial_tied", "moe"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_checkpoint_round_trip_is_bit_identical_and_memory_mapped(tmp_path, variant, symmetric):
    quantized = minislm.load(FIXTURES / variant, quant="int4", group_size=32, symmetric=symmetric)
    save_quantized(FIXTURES / variant, tmp_path / "q", quantized.weights, quantized.packing)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["group_size"] == 32
    assert config["quantization_config"]["symmetric"] is symmetric

    reloaded = minislm.load(tmp_path / "q")
    assert reloaded.packing == quantized.packing
    for name, w in quantized.weights.items():
        r = reloaded.weights[name]
        if isinstance(w, (Int4Weight, Int8Weight)):
            assert type(r) is type(w)
            assert np.array_equal(r.codes, w.codes) and np.array_equal(r.scales, w.scales)
            assert (r.zeros is None) == (w.zeros is None) and (w.zeros is None or np.array_equal(r.zeros, w.zeros))
            assert not r.codes.flags.owndata  # memory-mapped from the file, not re-quantized
        else:
            assert np.array_equal(r, w)
    ids = np.arange(30) % 200
    assert np.array_equal(reloaded.logits(ids), quantized.logits(ids))
    assert reloaded.tokenizer is not None  # the folder is a complete model


@pytest.mark.parametrize("quant", ["bf16", "int4"])
def test_packed_cached_decode_equals_full_forward(quant):
    model = minislm.load(FIXTURES / "longrope", quant=quant)
    ids = load_file(FIXTURES / "longrope" / "reference.safetensors")["case.above.input_ids"][:80]
    cache = model.new_cache(len(ids))
    model.forward(ids[:50], cache)
    for t in range(50, len(ids)):
        step = model.lm_head(model.forward(ids[t : t + 1], cache))[0]
        full = model.logits(ids[: t + 1])[-1]
        # prefill (GEMM) and decode (GEMV) kernels sum in different orders
        assert np.abs(step - full).max() <= 1e-3, t


def version_1_folder(source, folder, weights):
    """A folder as minislm wrote them before the tiles-16x8 layout: every matrix
    int4 in 16x4 tiles with bf16 scales (here: today's codes with their scales
    rounded to bf16), layout "tiles-16x4", no output_bits."""
    arrays = {}
    for name, w in weights.items():
        prefix = name.removesuffix(".weight")
        if isinstance(w, np.ndarray):
            arrays[name] = w
            continue
        codes = ref.unpack_tiles(w.codes, 4)
        n, k = codes.shape
        qweight = np.zeros((n // 16, k // 4, 32), np.uint8)   # byte 2r+e = q[4j+e] | q[4j+2+e] << 4
        c = codes.reshape(n // 16, 16, k // 4, 4).transpose(0, 2, 1, 3)
        qweight[...] = (c[..., 0:2] | (c[..., 2:4] << 4)).reshape(n // 16, k // 4, 32)
        arrays[f"{prefix}.qweight"] = qweight
        arrays[f"{prefix}.scales"] = ref.f32_to_bf16(ref.scale_values(w.scales))
        if w.zeros is not None:
            arrays[f"{prefix}.zeros"] = w.zeros
    from safetensors.numpy import save_file
    folder.mkdir()
    save_file(arrays, folder / "model.safetensors")
    raw = json.loads((source / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "minislm", "format": "int4", "bits": 4, "group_size": 32,
                                  "symmetric": True, "layout": OLD_LAYOUT}
    (folder / "config.json").write_text(json.dumps(raw))
    shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")


def test_a_version_1_int4_folder_loads_converted_exactly(tmp_path):
    quantized = minislm.load(FIXTURES / "gqa", quant="int4", output_bits=4)
    version_1_folder(FIXTURES / "gqa", tmp_path / "v1", quantized.weights)
    old = minislm.load(tmp_path / "v1")
    assert old.packing.layout == OLD_LAYOUT and old.packing.output_bits == 4
    for name, w in quantized.weights.items():
        if isinstance(w, Int4Weight):
            s = ref.bf16_to_f32(ref.f32_to_bf16(ref.scale_values(ref.by_row(w.scales))))
            want = (ref.unpack_tiles(w.codes, 4).astype(np.float32) - 8) * np.repeat(s, 32, axis=1)
            assert np.array_equal(old.weights[name].dequantize(), want[: w.shape[0], : w.shape[1]]), name


def test_an_unknown_int4_layout_is_refused_clearly(tmp_path):
    quantized = minislm.load(FIXTURES / "gqa", quant="int4")
    save_quantized(FIXTURES / "gqa", tmp_path / "q", quantized.weights, quantized.packing)
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    raw["quantization_config"]["layout"] = "tiles-32x8"
    (tmp_path / "q" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MinislmError, match="layout 'tiles-32x8' is unknown"):
        minislm.load(tmp_path / "q")


def test_an_int4_checkpoint_cannot_be_loaded_as_bf16(tmp_path):
    quantized = minislm.load(FIXTURES / "gqa", quant="int4")
    save_quantized(FIXTURES / "gqa", tmp_path / "q", quantized.weights, quantized.packing)
    with pytest.raises(MinislmError, match="already quantized"):
        minislm.load(tmp_path / "q", quant="bf16")


def test_save_refuses_an_existing_folder_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "q").mkdir()
    quantized = minislm.load(FIXTURES / "gqa", quant="int4")
    with pytest.raises(MinislmError, match="already exists"):
        save_quantized(FIXTURES / "gqa", tmp_path / "q", quantized.weights, quantized.packing)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_quant_config_refuses_unknown_formats_and_groups():
    with pytest.raises(MinislmError, match="--group-size 48"):
        QuantConfig("int4", 48)
    with pytest.raises(MinislmError, match="--quant int8"):
        QuantConfig("int8")
