"""The real tokenizers of Phi-3-small, Phi-4 and Phi-4-mini (minislm.tiktoken_bpe).

Reference: tiktoken. tools/make_tiktoken_tokenizers.py copied OpenAI's rank files
(cl100k_base, o200k_base; SHA-256 pinned) into tests/fixtures/tiktoken and recorded
the ids tiktoken gives a broad sweep, after checking that minislm, tiktoken and
transformers' own TikTokenConverter agree on every text. Here minislm rebuilds each
tokenizer from the committed rank file and must give those ids again.
"""

import gzip
import json
import shutil

import pytest

from minislm.errors import MinislmError
from minislm.tiktoken_bpe import (
    CL100K_PATTERN,
    O200K_PATTERN,
    PHI3_SMALL_RANK_FILE,
    PHI3_SMALL_SPECIAL,
    read_ranks,
    tokenizer_from_ranks,
)
from minislm.tokenizer import StreamingDetokenizer, load_tokenizer
from conftest import FIXTURES

TIKTOKEN = FIXTURES / "tiktoken"
PATTERNS = {"cl100k_base.tiktoken.gz": CL100K_PATTERN, "o200k_base.tiktoken.gz": O200K_PATTERN}


@pytest.fixture(scope="module")
def sweep():
    return json.loads((TIKTOKEN / "sweep.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ranks():
    return {name: read_ranks(TIKTOKEN / name) for name in PATTERNS}


@pytest.fixture(scope="module")
def tokenizers(sweep, ranks):
    return {
        model: tokenizer_from_ranks(ranks[entry["rank_file"]], PATTERNS[entry["rank_file"]], entry["special"])
        for model, entry in sweep.items()
    }


def test_the_sweep_covers_three_models_and_every_kind_of_text(sweep):
    assert set(sweep) == {"phi3small", "phi4", "phi4mini"}
    texts = sweep["phi4mini"]["texts"]
    for needle in ("def fib", "日本語", "🦙", "33333333", " " * 300, "<|end|>", "<|assistant|>", "é"):
        assert any(needle in t for t in texts), needle
    assert len(texts) > 300


@pytest.mark.parametrize("model", ["phi3small", "phi4", "phi4mini"])
def test_ids_equal_tiktoken_on_the_whole_sweep(sweep, tokenizers, model):
    entry, ours = sweep[model], tokenizers[model]
    wrong = [text for text, ids in zip(entry["texts"], entry["ids"]) if ours.encode(text, add_special_tokens=False).ids != ids]
    assert not wrong, f"{len(wrong)} texts differ from tiktoken, e.g. {wrong[:3]!r}"


@pytest.mark.parametrize("model", ["phi3small", "phi4", "phi4mini"])
def test_decoding_cut_characters_equals_tiktoken_replace(sweep, tokenizers, model):
    """Ids that split UTF-8 characters decode to U+FFFD exactly where tiktoken's
    decode(errors="replace") puts them."""
    entry, ours = sweep[model], tokenizers[model]
    assert any("\ufffd" in text for text in entry["decoded"])  # the cases do cut characters
    for ids, text in zip(entry["decode_ids"], entry["decoded"]):
        assert ours.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("model", ["phi4", "phi4mini"])
def test_chat_ids_equal_the_hub_tokenizer_ids_microsoft_quotes(sweep, tokenizers, model):
    """A reference that is not tiktoken: the ids microsoft/onnxruntime-extensions' tests
    record as the Hugging Face tokenizer's output for a Phi-4 and a Phi-4-mini(-reasoning)
    chat (sources: tools/make_tiktoken_tokenizers.py)."""
    quoted = sweep[model]["quoted"]
    assert quoted
    for case in quoted:
        assert tokenizers[model].encode(case["text"], add_special_tokens=False).ids == case["ids"]


@pytest.mark.parametrize(
    "model, token, token_id",
    [("phi3small", "<|end|>", 100266), ("phi3small", "<|dummy_id_2|>", 100256), ("phi3small", "<|dummy_id_86|>", 100351),
     ("phi4", "<|im_sep|>", 100266), ("phi4", "<|dummy_85|>", 100349), ("phi4", "<|endofprompt|>", 100276),
     ("phi4mini", "<|end|>", 200020), ("phi4mini", "<|endofprompt|>", 200018), ("phi4mini", "<|assistant|>", 200019),
     ("phi4mini", "<|tool_call|>", 200025), ("phi4mini", "<|tag|>", 200028)],
)
def test_special_tokens_sit_at_their_ids(tokenizers, model, token, token_id):
    assert tokenizers[model].token_to_id(token) == token_id
    assert tokenizers[model].encode(f"a{token}b", add_special_tokens=False).ids[1] == token_id


def test_phi4_mini_has_exactly_the_hubs_twelve_added_tokens(sweep):
    """199999 and 200018..200028, nothing else (the hub's tokenizer_config.json as
    Microsoft's onnxruntime-extensions copies it; see tools/make_tiktoken_tokenizers.py)."""
    assert sorted(sweep["phi4mini"]["special"].values()) == [199999, *range(200018, 200029)]


def test_phi3_small_fills_its_padded_vocabulary(tokenizers):
    assert tokenizers["phi3small"].get_vocab_size(with_added_tokens=True) == 100352
    assert sorted(PHI3_SMALL_SPECIAL.values()) == list(range(100256, 100352))


@pytest.fixture(scope="module")
def phi3_small_dir(tmp_path_factory):
    """A Phi-3-small folder as the hub lays it out: the plain rank file, no tokenizer.json."""
    folder = tmp_path_factory.mktemp("phi3small")
    (folder / PHI3_SMALL_RANK_FILE).write_bytes(gzip.decompress((TIKTOKEN / "cl100k_base.tiktoken.gz").read_bytes()))
    templates = json.loads((TIKTOKEN / "templates.json").read_text(encoding="utf-8"))
    config = {"tokenizer_class": "Phi3SmallTokenizer", "chat_template": templates["phi3small"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_a_phi3_small_folder_loads_from_its_rank_file(phi3_small_dir):
    tok = load_tokenizer(phi3_small_dir)
    assert tok.vocab_size == 100352 and not tok.add_bos
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    # <|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\n (../PHI3_SMALL_FACTS.md, section 3)
    assert ids == [100257, 100262, 198, 13347, 100266, 198, 100263, 198]
    assert tok.decode(ids) == "\nHi\n\n"  # special tokens hidden


def test_streaming_a_byte_level_vocabulary_waits_for_whole_characters(tokenizers):
    """Byte-level BPE splits characters across tokens too (an emoji is often 2-4 ids)."""
    from minislm.tokenizer import Tokenizer

    tok = Tokenizer(tokenizers["phi4mini"], {}, False, None)
    text = "Ünïcödé 日本語 🦙🦙 👨‍👩‍👧‍👦 done"
    ids = tok.encode(text)
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize(
    "content, message",
    [(b"not base64!! 0\n", "line 1 is not"), (b"YQ== 0\nYg== 2\n", "ranks are not 0..1"), (b"YQ==\n", "line 1")],
)
def test_bad_rank_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(MinislmError, match=message):
        read_ranks(path)


def test_a_damaged_rank_file_in_a_folder_names_the_file(tmp_path, phi3_small_dir):
    folder = tmp_path / "model"
    shutil.copytree(phi3_small_dir, folder)
    (folder / PHI3_SMALL_RANK_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(MinislmError, match=PHI3_SMALL_RANK_FILE):
        load_tokenizer(folder)
