"""GGUF byte-level BPE vocabularies (tokenizer.ggml.model = "gpt2"): Phi-4-mini and Phi-4.

The files are written here with gguf-py the way llama.cpp's convert_hf_to_gguf.py
writes them (tests/gguf_files.py, write_gpt2_vocab), from OpenAI's real rank files in
tests/fixtures/tiktoken. The reference for the ids is tiktoken (the sweep that
tools/make_tiktoken_tokenizers.py recorded); llama.cpp itself is compared in
tests/test_gguf_gpt2_llama_cpp.py where llama-cpp-python is installed.
"""

import json

import numpy as np
import pytest

import minislm
from minislm.errors import MinislmError
from minislm.formats.gguf_file import read_gguf
from minislm.formats.gguf_tokenizer import tokenizer_from_gguf
from minislm.tiktoken_bpe import O200K_PATTERN, read_ranks, tokenizer_from_ranks
from minislm.weights import expected_shapes, save_safetensors
from minislm.config import parse_config
from conftest import ATOL_FP32_LOGITS, FIXTURES

gguf = pytest.importorskip("gguf")
from gguf_files import write_gguf, write_vocab_only  # noqa: E402

TIKTOKEN = FIXTURES / "tiktoken"
SWEEP = json.loads((TIKTOKEN / "sweep.json").read_text(encoding="utf-8"))
TEMPLATES = json.loads((TIKTOKEN / "templates.json").read_text(encoding="utf-8"))
# (rank file, pre as llama.cpp's converter names it, embedding rows, bos, eos)
VOCABS = {
    "phi4mini": ("o200k_base.tiktoken.gz", "gpt-4o", 200064, 199999, 200020),
    "phi4": ("cl100k_base.tiktoken.gz", "dbrx", 100352, 100257, 100265),
}


def vocab_file(folder, model: str, **change):
    rank_file, pre, rows, bos, eos = VOCABS[model]
    vocab = dict(ranks=read_ranks(TIKTOKEN / rank_file), special=SWEEP[model]["special"], pre=pre, vocab_size=rows,
                 bos=bos, eos=eos, chat_template=TEMPLATES[model])
    return write_vocab_only(folder / f"{model}.gguf", **{**vocab, **change})


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    return {model: vocab_file(folder, model) for model in VOCABS}


@pytest.mark.parametrize("model", ["phi4mini", "phi4"])
def test_gpt2_vocab_gives_tiktokens_ids_on_the_whole_sweep(vocab_files, model):
    tokenizer, config = tokenizer_from_gguf(read_gguf(vocab_files[model]))
    entry = SWEEP[model]
    wrong = [t for t, ids in zip(entry["texts"], entry["ids"]) if tokenizer.encode(t, add_special_tokens=False).ids != ids]
    assert not wrong, f"{len(wrong)} of {len(entry['texts'])} differ, e.g. {wrong[:3]!r}"
    assert tokenizer.get_vocab_size() == VOCABS[model][2]  # the [PAD] rows keep every id
    assert config["add_bos_token"] is False and config["chat_template"] == TEMPLATES[model]


def test_llama_cpps_converter_names_phi4_dbrx_and_phi4_mini_gpt4o():
    """convert_hf_to_gguf.py picks tokenizer.ggml.pre by hashing the ids of its test text
    (get_vocab_base_pre). Phi-4's cl100k ids hash exactly as DBRX's, Phi-4-mini's o200k
    ids as Xenova/gpt-4o's: the two hashes below are the ones in llama.cpp's source."""
    import hashlib

    text = (
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
        "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на "
        "Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
        "'D you like some tea? We'Ve a'lL"
    )
    llama_cpp_hashes = {
        "dbrx": "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e",
        "gpt-4o": "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e",
    }
    for model, (rank_file, pre, *_) in VOCABS.items():
        from minislm.formats.gguf_tokenizer import GPT2_PRE_PATTERNS

        tok = tokenizer_from_ranks(read_ranks(TIKTOKEN / rank_file), GPT2_PRE_PATTERNS[pre], SWEEP[model]["special"])
        ids = tok.encode(text, add_special_tokens=False).ids
        assert hashlib.sha256(str(ids).encode()).hexdigest() == llama_cpp_hashes[pre]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pre="qwen2"), "tokenizer.ggml.pre is 'qwen2'; minislm reads the gpt2 vocabularies of Phi models only"),
        (dict(pre="llama-bpe"), "tokenizer.ggml.pre is 'llama-bpe'"),
    ],
)
def test_other_gpt2_pre_tokenizers_are_refused_by_name(tmp_path, change, message):
    tiny = dict(ranks={bytes([b]): b for b in range(256)}, special={"<|end|>": 256}, vocab_size=257, bos=256, eos=256)
    path = write_vocab_only(tmp_path / "v.gguf", **{**tiny, "pre": "gpt-4o", **change})
    with pytest.raises(MinislmError, match=message.replace("|", r"\|")):
        tokenizer_from_gguf(read_gguf(path))


def test_an_unsupported_vocabulary_type_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "phi3")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[CLS]"])
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    with pytest.raises(MinislmError, match="tokenizer.ggml.model is 'bert'; minislm reads 'llama' .* and 'gpt2'"):
        tokenizer_from_gguf(read_gguf(tmp_path / "bert.gguf"))


# ---------------------------------------------------------------- a Phi-4-mini-shaped model

PHI4_MINI_SHRUNK = dict(  # microsoft/Phi-4-mini-instruct's config.json, sizes shrunk; the real vocabulary
    model_type="phi3", architectures=["Phi3ForCausalLM"], vocab_size=200064, hidden_size=48, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75,
    max_position_embeddings=64, original_max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
    sliding_window=None, tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
)


@pytest.fixture(scope="module")
def phi4_mini_twins(tmp_path_factory, vocab_files):
    """A safetensors folder with the hub's files and its GGUF, written as the converter would."""
    folder = tmp_path_factory.mktemp("phi4mini") / "model"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in expected_shapes(parse_config(PHI4_MINI_SHRUNK)).items():
        scale = 1.0 if len(shape) == 1 else 1 / np.sqrt(shape[1])
        tensors[name] = ((1.0 if len(shape) == 1 else 0.0) + scale * rng.standard_normal(shape)).astype(np.float32)
    save_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(PHI4_MINI_SHRUNK))
    special = SWEEP["phi4mini"]["special"]
    tokenizer_from_ranks(read_ranks(TIKTOKEN / "o200k_base.tiktoken.gz"), O200K_PATTERN, special).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", add_bos_token=False,
        chat_template=TEMPLATES["phi4mini"])))
    path = write_gguf(folder.parent / "phi4mini.gguf", folder, "phi3", vocab_from=vocab_files["phi4mini"])
    return minislm.load(folder), minislm.load(path, quant="float32")


def test_phi4_mini_gguf_gives_the_ids_and_logits_of_its_safetensors_twin(phi4_mini_twins):
    hub, from_gguf = phi4_mini_twins
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé 日本語 🦙 HTTPServer 12345"}]
    ids = hub.tokenizer.encode_chat(messages)
    assert from_gguf.tokenizer.encode_chat(messages) == ids
    assert ids[0] == 200022 and ids[-1] == 200019  # <|system|> ... <|assistant|>
    assert np.abs(from_gguf.logits(ids) - hub.logits(ids)).max() <= ATOL_FP32_LOGITS
    assert from_gguf.tokenizer.decode(ids) == hub.tokenizer.decode(ids)
    assert 200020 in from_gguf.generation_config.eos_token_ids  # <|end|> stops, as with the hub's files
