"""minislm.formats.gguf_tokenizer: a GGUF file's vocabulary -> tokenizer.json.

The reference is llama.cpp's own test data: ggml-vocab-phi-3.gguf with the ids the
original Phi-3 tokenizer gives its 47 test strings (test_tokenizer.py checks those on
the committed tokenizer.json; here we check the reader rebuilds exactly that file).
"""

import json

import pytest

gguf = pytest.importorskip("gguf")

from minislm.errors import MinislmError  # noqa: E402
from minislm.formats.gguf_tokenizer import HUB_RSTRIP, tokenizer_from_gguf  # noqa: E402
from minislm.tokenizer import load_tokenizer  # noqa: E402
from conftest import PHI3_TOKENIZER  # noqa: E402


@pytest.fixture(scope="module")
def phi3_from_gguf():
    return tokenizer_from_gguf(gguf.GGUFReader(PHI3_TOKENIZER / "ggml-vocab-phi-3.gguf"))


def test_rebuilds_the_committed_phi3_tokenizer(phi3_from_gguf):
    tokenizer, config = phi3_from_gguf
    assert json.loads(tokenizer.to_str()) == json.loads((PHI3_TOKENIZER / "tokenizer.json").read_text(encoding="utf-8"))
    assert config == json.loads((PHI3_TOKENIZER / "tokenizer_config.json").read_text(encoding="utf-8"))


def test_phi3_special_tokens_carry_the_hub_flags(phi3_from_gguf):
    tokenizer, config = phi3_from_gguf
    added = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}
    rstrip = {name for name, t in added.items() if t.rstrip}
    assert rstrip == {"</s>", "<|assistant|>"} | {f"<|placeholder{i}|>" for i in range(1, 7)} == set(HUB_RSTRIP)
    assert {"<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|end|>", "<|user|>"} <= set(added) - rstrip
    assert not any(t.lstrip or t.normalized for t in added.values())
    assert not added["</s>"].special and added["<|end|>"].special  # USER_DEFINED vs CONTROL in the GGUF
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<s>", "<|endoftext|>", "<unk>", "<|endoftext|>"
    )
    assert config["add_bos_token"] is True and config["chat_template"].startswith("{{ bos_token }}")


def write_gguf(path, pieces, scores, types, model="llama", **ids):
    """A metadata-only GGUF file, as llama.cpp's vocab files are."""
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_tokenizer_model(model)
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(ids.get("bos", 1))
    writer.add_eos_token_id(ids.get("eos", 2))
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ bos_token }}{{ messages[0]['content'] }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


# A five-piece SentencePiece vocabulary small enough to follow by hand.
TINY = dict(
    pieces=["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁ab", "ba"],
    scores=[0.0, 0.0, 0.0, -4.0, -5.0, -6.0, -1.0, -2.0, -3.0],
    types=[3, 3, 3, 1, 1, 1, 1, 1, 1],
)


@pytest.mark.parametrize(
    "text, pieces",
    [
        # SentencePiece merges the pair whose union scores best: "ab" (-1), then "▁ab" (-2).
        ("ab", ["▁ab"]),
        ("aba", ["▁ab", "a"]),
        ("bab", ["▁", "b", "ab"]),  # "ab" (-1) beats "ba" (-3); "▁b" is no piece
        ("ab ab", ["▁ab", "▁ab"]),
    ],
)
def test_merges_follow_sentencepiece_scores(tmp_path, text, pieces):
    tokenizer, _ = tokenizer_from_gguf(write_gguf(tmp_path / "tiny.gguf", **TINY))
    assert tokenizer.encode(text, add_special_tokens=False).tokens == pieces
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=True) == text


def test_a_gguf_tokenizer_loads_like_a_hub_folder(tmp_path):
    tokenizer, config = tokenizer_from_gguf(write_gguf(tmp_path / "tiny.gguf", **TINY))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = load_tokenizer(tmp_path)
    assert ours.encode("ab") == [1, 7]
    assert ours.encode_chat([{"role": "user", "content": "ab"}]) == [1, 7]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model="bert"), "tokenizer.ggml.model is 'bert'"),
        (dict(model="gpt2"), "tokenizer.ggml.pre is None"),
        (dict(scores=[0.0] * 3), "tokenizer arrays disagree"),
        (dict(bos=99), "bos_token_id = 99 is outside the vocabulary"),
    ],
)
def test_bad_gguf_tokenizers_raise_one_clear_error(tmp_path, change, message):
    with pytest.raises(MinislmError, match=message):
        tokenizer_from_gguf(write_gguf(tmp_path / "bad.gguf", **{**TINY, **change}))
