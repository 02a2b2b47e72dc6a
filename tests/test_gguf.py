"""GGUF files: layouts, tensor types, config from metadata, bad files.

The GGUFs are written at test time from the committed fixtures (tests/gguf_files.py,
with the `gguf` package's writer and quantizers); nothing here needs llama.cpp
(tests/test_gguf_llama_cpp.py compares with llama.cpp itself where it is installed).

Three references:
  * transformers' logits (the fixtures' reference.safetensors) for float files: a
    float32 GGUF holds the checkpoint's weights unchanged, so it must give them;
  * `gguf.quants.dequantize` for quantized files: minislm's weights equal it bit for
    bit (see test_gguf_blocks.py for what that means for the sign of zero);
  * the float model built from those reference weights: the same logits.
"""

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

import minislm
from conftest import ATOL_FP32_LOGITS, FIXTURES
from gguf_files import llama_cpp_permute, reference_weights, wide_checkpoint, write_gguf
from minislm.cli import main
from minislm.formats import gguf as gguf_format
from minislm.runtime import Model
from minislm.weights import save_safetensors

FLOAT_CASES = [("mha", "llama"), ("gqa", "phi3"), ("gqa", "llama"), ("longrope", "phi3"),
               ("partial_tied", "phi3"), ("sliding", "phi3"), ("moe", "phimoe")]


def reference_cases(fixture: str):
    reference = load_file(FIXTURES / fixture / "reference.safetensors")
    names = sorted({key.split(".")[1] for key in reference if key.startswith("case.")})
    return [(reference[f"case.{c}.input_ids"], reference[f"case.{c}.logits"]) for c in names]


@pytest.mark.parametrize("fixture,layout", FLOAT_CASES)
def test_float_gguf_gives_transformers_logits(tmp_path, fixture, layout):
    """Both layouts (and PhiMoE), GQA, LongRoPE past its switch, partial rotary with a
    tied embedding (no output.weight: Phi-4-mini's shape), a sliding window."""
    model = minislm.load(write_gguf(tmp_path / "m.gguf", FIXTURES / fixture, layout))
    for ids, expected in reference_cases(fixture):
        got = model.logits(ids)
        assert np.abs(got - expected).max() <= ATOL_FP32_LOGITS, fixture
        assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_llama_layout_is_wrong_without_undoing_the_permutation(tmp_path, monkeypatch):
    """The control for the test above: read the `llama` file's q/k rows as they lie
    (adjacent-pair order) and the logits are far off — the un-permutation is what
    makes the llama layout right."""
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "llama")
    monkeypatch.setattr(gguf_format, "unpermute_heads", lambda rows, heads: np.arange(rows * heads))
    ids, expected = reference_cases("gqa")[0]
    assert np.abs(minislm.load(path).logits(ids) - expected).max() > 0.1


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_unpermute_heads_inverts_the_converters_permutation(heads):
    rows_per_head = 8
    w = np.random.default_rng(heads).standard_normal((heads * rows_per_head, 5)).astype(np.float32)
    assert np.array_equal(llama_cpp_permute(w, heads)[gguf_format.unpermute_heads(rows_per_head, heads)], w)


# ---------------------------------------------------------------- quantized files vs gguf's dequantizer


def assert_same_bits(ours, ref):
    same = ours.view(np.uint32) == ref.view(np.uint32)
    assert ours.shape == ref.shape and np.all(same | ((ours == 0) & (ref == 0)))


def assert_matches_reference_dequantization(path):
    model = minislm.load(path, quant="float32")
    expected = reference_weights(path, model.config)
    assert set(expected) == set(model.weights)
    for name, w in model.weights.items():
        assert_same_bits(w, expected[name])
    float_model = Model(model.config, expected, kv_cache="float32")
    ids = np.arange(model.config.vocab_size)[:: max(1, model.config.vocab_size // 12)]
    assert np.abs(model.logits(ids) - float_model.logits(ids)).max() <= ATOL_FP32_LOGITS


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("layout", ["phi3", "llama"])
def test_quantized_gguf_equals_the_reference_dequantization(tmp_path, kind, layout):
    assert_matches_reference_dequantization(write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", layout, kind))


@pytest.mark.parametrize("kind,cache", [("F16", "float32"), ("Q4_0", "float16"), ("Q8_0", "float16")])
def test_a_files_codes_take_the_packed_weights_kv_cache(tmp_path, kind, cache):
    """Codes multiplied as they are trade exactness for bytes, as our int4 does: float16
    cache by default; the same file unpacked to float32 keeps the float32 cache."""
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", kind)
    assert minislm.load(path).kv_cache == cache
    assert minislm.load(path, quant="float32").kv_cache == "float32"
    assert minislm.load(path, kv_cache="int8").kv_cache == "int8"


def random_k_blocks(rng, rows: int, cols: int, kind: str) -> np.ndarray:
    """Random K-quant bytes whose fp16 super-block scales are small finite numbers
    (so the weights are of a sane size); every other bit random."""
    block_bytes = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind]
    blocks = rng.integers(0, 256, (rows * cols // 256, block_bytes), dtype=np.uint8)
    fields = (208,) if kind == "Q6_K" else (0, 2)
    for offset in fields:
        d = (rng.uniform(0.2, 1.0, len(blocks)) / (64 * 16 * np.sqrt(cols))).astype(np.float16)
        blocks[:, offset : offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("layout", ["phi3", "llama"])
def test_k_quant_gguf_equals_the_reference_dequantization(tmp_path, layout):
    """Q4_K, Q5_K and Q6_K side by side as in a Q4_K_M file (attn_v and ffn_down in
    Q6_K, the rest Q4_K or Q5_K), with random blocks: llama.cpp's quantizer is not
    needed to test the unpacking (test_gguf_llama_cpp.py runs it)."""
    from gguf_files import gguf_tensors

    folder = wide_checkpoint(tmp_path / "wide")
    _, arrays = gguf_tensors(folder, layout)
    rng = np.random.default_rng(1)
    kinds = ["Q4_K", "Q5_K", "Q6_K"]
    tensors = {}
    for i, (name, a) in enumerate(arrays.items()):
        if a.ndim == 1:
            tensors[name] = (a, None)
            continue
        kind = "Q6_K" if ("attn_v" in name or "ffn_down" in name) else kinds[i % 2]
        tensors[name] = (random_k_blocks(rng, a.shape[0], a.shape[1], kind), gguf.GGMLQuantizationType[kind])
    path = write_gguf(tmp_path / "k.gguf", folder, layout, tensors=tensors)
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} >= {"Q4_K", "Q5_K", "Q6_K", "F32"}
    assert_matches_reference_dequantization(path)


# ---------------------------------------------------------------- config from metadata


def test_longrope_and_its_attention_factor_come_from_the_file(tmp_path):
    """GGUF holds the factors as F32 tensors and the factor as a float32 key; the
    decoder uses them as float32 anyway."""
    ours = minislm.load(write_gguf(tmp_path / "m.gguf", FIXTURES / "longrope", "phi3")).config.rope
    hub = minislm.load(FIXTURES / "longrope").config.rope
    assert (ours.kind, ours.rotary_dim, ours.original_max_position_embeddings) == ("longrope", hub.rotary_dim, hub.original_max_position_embeddings)
    for name in ("short_factor", "long_factor"):
        assert np.array_equal(np.float32(getattr(ours, name)), np.float32(getattr(hub, name)))
    assert np.float32(ours.short_scale) == np.float32(hub.short_scale) and ours.long_scale == ours.short_scale


def test_phimoe_longrope_takes_the_files_attention_factor(tmp_path):
    """A PhiMoE GGUF carries the Phi-3 formula's attention factor (what the converter
    writes), not the model's short/long_mscale, which GGUF has no key for: minislm
    runs what the file says, as llama.cpp does."""
    model = minislm.load(write_gguf(tmp_path / "m.gguf", FIXTURES / "moe_longrope", "phimoe"))
    rope = model.config.rope
    ratio = model.config.max_position_embeddings / rope.original_max_position_embeddings
    formula = np.sqrt(1 + np.log(ratio) / np.log(rope.original_max_position_embeddings))
    assert rope.short_scale == rope.long_scale == pytest.approx(formula, rel=1e-6)


@pytest.mark.parametrize("context,written,expected", [
    (4096, None, 2047),  # Microsoft's Phi-3-mini-4k GGUF: no key; its config.json says 2047
    (128, None, None),  # no key, not a 4k model: no window
    (4096, 0, None),  # 0 = no window (Phi-4-mini)
    (4096, 8, 8),
])
def test_sliding_window_from_metadata(tmp_path, context, written, expected):
    extra = {"phi3.context_length": ("uint32", context)}
    if written is not None:
        extra["phi3.attention.sliding_window"] = ("uint32", written)
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3",
                      drop_keys=("context_length", "attention.sliding_window"), extra_keys=extra)
    assert minislm.load(path).config.sliding_window == expected


def test_stop_ids_from_metadata(tmp_path):
    model = minislm.load(write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3",
                                    extra_keys={"tokenizer.ggml.eot_token_id": ("uint32", 7)}))
    assert model.generation_config.eos_token_ids[:2] == (354, 7)


# ---------------------------------------------------------------- bad files: one line, exit 2


def run_cli(capsys, path):
    status = main(["generate", "--model", str(path), "-n", "1", "hi"])
    err = capsys.readouterr().err.strip()
    return status, err


def assert_clean_error(capsys, path, *fragments):
    status, err = run_cli(capsys, path)
    assert status == 2
    assert len(err.splitlines()) == 1 and err.startswith("minislm: error: ") and "Traceback" not in err
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err, err


def test_truncated_gguf(tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_clean_error(capsys, path, "truncated or corrupt GGUF")


def test_wrong_magic(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    assert_clean_error(capsys, path, "not a GGUF file")


def test_unknown_architecture(tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", architecture="gpt2")
    assert_clean_error(capsys, path, "architecture 'gpt2' is not supported")


def test_unsupported_tensor_type(tmp_path, capsys):
    from gguf_files import gguf_tensors, quantize

    _, arrays = gguf_tensors(FIXTURES / "gqa", "phi3")
    tensors = {name: quantize(name, a, "F32") for name, a in arrays.items()}
    w = arrays["blk.0.ffn_down.weight"]  # (32, 64): IQ4_NL blocks of 32 weights, 18 bytes
    tensors["blk.0.ffn_down.weight"] = (np.zeros((w.shape[0], w.shape[1] // 32 * 18), np.uint8),
                                        gguf.GGMLQuantizationType.IQ4_NL)
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", tensors=tensors)
    assert_clean_error(capsys, path, "tensor 'blk.0.ffn_down.weight' has type IQ4_NL")


def test_missing_metadata_key(tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", drop_keys=("embedding_length",))
    assert_clean_error(capsys, path, "no 'phi3.embedding_length'")


def test_missing_tensor(tmp_path, capsys):
    from gguf_files import gguf_tensors, quantize

    _, arrays = gguf_tensors(FIXTURES / "gqa", "phi3")
    tensors = {name: quantize(name, a, "F32") for name, a in arrays.items() if name != "blk.1.attn_qkv.weight"}
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", tensors=tensors)
    assert_clean_error(capsys, path, "missing tensor 'blk.1.attn_qkv.weight'")


def test_tensor_shape_that_disagrees_with_the_metadata(tmp_path, capsys):
    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", drop_keys=("feed_forward_length",),
                      extra_keys={"phi3.feed_forward_length": ("uint32", 96)})
    assert_clean_error(capsys, path, "blk.0.ffn_up.weight", "metadata implies")


# ---------------------------------------------------------------- a GGUF with a real vocabulary, end to end

PHI3_VOCAB = FIXTURES / "phi3-tokenizer" / "ggml-vocab-phi-3.gguf"
# What the hub's tokenizer.json gives for Phi-3's chat prompt (docs/formats.md, PHI3 facts):
# the "\n" after <|user|> and <|end|> stays a token. llama.cpp gives 1, 32010, 6324, 32007, 32001.
HUB_CHAT_IDS = [1, 32010, 29871, 13, 18567, 32007, 29871, 13, 32001]


@pytest.fixture(scope="module")
def phi3_vocab_model(tmp_path_factory):
    """A random tiny Phi-3 with the real 32064-token vocabulary, twice: as a GGUF file
    (vocabulary and chat template copied from llama.cpp's ggml-vocab-phi-3.gguf) and as
    a hub folder (the committed tokenizer.json made from that same file)."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("phi3vocab")
    folder = wide_checkpoint(root / "folder", hidden=64, vocab=32064, eos=32000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "phi3-tokenizer" / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, 32007]}))
    path = write_gguf(root / "phi3.gguf", folder, "phi3", "Q8_0", vocab_from=PHI3_VOCAB)
    return path, folder, minislm.load(path, quant="float32")


def test_gguf_tokenizer_renders_chat_prompts_as_the_hub_does(phi3_vocab_model):
    tokenizer = phi3_vocab_model[2].tokenizer
    assert tokenizer.encode_chat([{"role": "user", "content": "Hi"}]) == HUB_CHAT_IDS


def test_generate_from_a_gguf_file_equals_the_same_weights_in_a_folder(phi3_vocab_model, capsys, tmp_path):
    """`minislm generate --model tiny.gguf` end to end (chat template, tokenizer,
    stop ids), against the folder holding the GGUF's dequantized weights (both through
    the exact float path: `--quant float32`)."""
    path, folder, model = phi3_vocab_model
    twin = tmp_path / "twin"
    import shutil

    shutil.copytree(folder, twin)
    save_safetensors(twin / "model.safetensors", model.weights)
    outputs = []
    for source in (path, twin):
        assert main(["generate", "--model", str(source), "--quant", "float32", "-n", "12", "Hello there"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()
    assert 32007 in model.generation_config.eos_token_ids and 32000 in model.generation_config.eos_token_ids


def test_quant_int4_from_a_gguf_equals_quantizing_the_same_weights_from_a_folder(tmp_path):
    """--quant int4 on a GGUF re-quantizes the file's exact weights, as it would the
    same weights in a folder (bit-identical int4 weights, so identical logits)."""
    import shutil

    path = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", "Q4_0")
    twin = tmp_path / "twin"
    shutil.copytree(FIXTURES / "gqa", twin)
    save_safetensors(twin / "model.safetensors", minislm.load(path, quant="float32").weights)
    ours, theirs = minislm.load(path, quant="int4"), minislm.load(twin, quant="int4")
    assert type(ours.weights["model.layers.0.mlp.down_proj.weight"]).__name__ == "Int4Weight"
    ids = np.arange(0, 384, 17)
    assert np.array_equal(ours.logits(ids), theirs.logits(ids))


def test_quantize_a_gguf_into_an_int4_folder(phi3_vocab_model, tmp_path, capsys):
    """`minislm quantize -m file.gguf --out DIR`: config.json, tokenizer and stop ids
    from the file's metadata, int4 weights re-quantized from its exact weights — the
    same model as `load(file.gguf, quant="int4")`."""
    path = phi3_vocab_model[0]
    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(path), "--out", str(out)]) == 0
    folder, direct = minislm.load(out), minislm.load(path, quant="int4")
    ids = np.arange(0, 32064, 997)
    assert np.array_equal(folder.logits(ids), direct.logits(ids))
    assert folder.tokenizer.encode_chat([{"role": "user", "content": "Hi"}]) == HUB_CHAT_IDS
    assert set(folder.generation_config.eos_token_ids) == set(direct.generation_config.eos_token_ids)
