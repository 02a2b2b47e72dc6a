"""Tokenizer behaviour, with the real Phi-3 tokenizer in tests/fixtures/phi3-tokenizer
(built from llama.cpp's vocabulary file by tools/make_phi3_tokenizer.py)."""

import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.tokenizer import StreamingDetokenizer, load_tokenizer
from conftest import FIXTURES


@pytest.fixture(scope="module")
def phi3(phi3_tokenizer_dir):
    return load_tokenizer(phi3_tokenizer_dir)


def vocab_test_vectors(folder):
    """llama.cpp's 47 test strings and the ids the original Phi-3 tokenizer gives them."""
    strings = (folder / "vocab-test.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (folder / "vocab-test.out").read_text(encoding="utf-8").split("\n")
    strings[-1] = strings[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    return list(zip(strings, [[int(i) for i in line.split()] for line in ids]))


def test_all_47_vocab_vectors(phi3, phi3_tokenizer_dir):
    vectors = vocab_test_vectors(phi3_tokenizer_dir)
    assert len(vectors) == 47
    for text, expected in vectors:
        assert phi3.encode(text, add_bos=False) == expected, repr(text)


def test_chat_tokens_keep_the_newline_as_the_hub_file_does(phi3):
    """The hub's tokenizer.json rstrips `<|assistant|>` but not `<|user|>`/`<|end|>`, so
    "\n" after those stays ("▁", "<0x0A>"): the ids transformers 4.4x produced for
    Microsoft's samples (../PHI3_FACTS.md). llama.cpp gives 1, 32010, 6324, 32007, 32001."""
    text = "<s><|user|>\nHi<|end|>\n<|assistant|>\n"
    assert phi3.encode(text, add_bos=False) == [1, 32010, 29871, 13, 18567, 32007, 29871, 13, 32001]
    assert phi3.encode("<|assistant|>\n  x", add_bos=False) == phi3.encode("<|assistant|>x", add_bos=False)


def test_bos_follows_tokenizer_config(phi3):
    assert phi3.add_bos and phi3.bos_id == 1
    assert phi3.encode("Hello")[0] == 1
    assert phi3.encode("Hello", add_bos=False)[0] != 1


def test_phi3_special_ids(phi3):
    assert [phi3.token_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>")] == [
        32000, 32001, 32007, 32010, 32006
    ]


def test_original_phi3_chat_template(phi3):
    text = phi3.render_chat([{"role": "user", "content": "Hi there"}])
    assert text == "<s><|user|>\nHi there<|end|>\n<|assistant|>\n"
    ids = phi3.encode_chat([{"role": "user", "content": "Hi there"}])
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, not a second one
    assert 32010 in ids and 32007 in ids and 32001 in ids


def test_chat_template_is_sandboxed(phi3):
    phi3.chat_template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    from minislm.errors import MinislmError

    with pytest.raises(MinislmError, match="chat template"):
        phi3.render_chat([{"role": "user", "content": "x"}])


def test_generation_tags_render_their_words(phi3_tokenizer_dir):
    """transformers' `{% generation %}` mark (assistant-mask templates, e.g. the ones
    phi-4 fine-tuning code patches in) renders its body; plain Jinja would refuse the
    template. The live twin, tests/test_live_phi4_family.py, holds it to transformers."""
    plain = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    tagged = plain.replace("{{ m['content'] }}", "{% generation %}{{ m['content'] }}{% endgeneration %}")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    phi3 = load_tokenizer(phi3_tokenizer_dir)  # a private copy: the template changes below
    phi3.chat_template = tagged
    text = phi3.render_chat(chat, add_generation_prompt=False)
    assert text == "<|user|>Hi<|end|><|assistant|>Hello!<|end|>"
    phi3.chat_template = plain
    assert phi3.render_chat(chat, add_generation_prompt=False) == text
    from minislm.errors import MinislmError

    phi3.chat_template = "{% generation %}never closed"
    with pytest.raises(MinislmError, match="endgeneration"):
        phi3.render_chat(chat)


def stream(tokenizer, ids):
    detok = StreamingDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    return pieces + [detok.flush()]


@pytest.mark.parametrize(
    "text",
    ["Hello world, how are you?", "  leading spaces and  double  spaces", "Äpfel und Öl kosten 3 €", "日本語のテキスト 🦙🦙 emoji", "line\nbreaks\n\n  indented"],
)
def test_streaming_equals_full_decode(phi3, text):
    ids = phi3.encode(text, add_bos=False)
    pieces = stream(phi3, ids)
    assert "".join(pieces) == phi3.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_streaming_keeps_spaces_that_token_by_token_decoding_drops(phi3):
    ids = phi3.encode("the quick brown fox", add_bos=False)
    naive = "".join(phi3.decode([i]) for i in ids)
    assert naive == "thequickbrownfox"  # the bug this class exists to avoid
    assert "".join(stream(phi3, ids)) == "the quick brown fox"


def test_streaming_waits_for_split_utf8(phi3):
    ids = phi3.encode("🦙", add_bos=False)
    assert len(ids) > 2  # byte-fallback: the llama is 4 byte tokens
    pieces = stream(phi3, ids)
    # nothing until the 4th byte arrives, then the whole character, then nothing left
    assert pieces[: len(ids) - 1] == [""] * (len(ids) - 1)
    assert pieces[len(ids) - 1 :] == ["🦙", ""]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_streaming_equals_full_decode_on_any_text(phi3, text):
    ids = phi3.encode(text, add_bos=False)
    assert "".join(stream(phi3, ids)) == phi3.decode(ids)


def test_fixture_tokenizer_is_smaller_than_the_vocab():
    """Like Phi-3 (32011 ids in a 32064-row embedding), so the sampler's limit is exercised."""
    from minislm.config import load_config

    tok = load_tokenizer(FIXTURES / "mha")
    assert tok.vocab_size < load_config(FIXTURES / "mha").vocab_size


# ---------------------------------------------------------------- what a server needs from it


def test_encoding_lets_other_threads_run(phi3):
    """A server tokenizes in request threads; while one text is tokenized, the other
    threads must run. With a switch interval of 100 s the interpreter never takes the GIL
    from a running thread, so this thread runs before the worker is done only if the
    tokenizer lets go of the GIL itself (a plain `encode` holds it: measured 1.2 s for
    a 1 MB text, during which nothing else ran)."""
    finished, seen = threading.Event(), []
    worker = threading.Thread(target=lambda: (phi3.encode("the quick brown fox. " * 10_000), finished.set()))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        worker.start()
        seen.append(finished.is_set())  # runs when the worker gives up the GIL
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert seen == [False]


def test_whitespace_list_is_what_python_calls_whitespace():
    from minislm.tokenizer import WHITESPACE

    assert set(WHITESPACE) == {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}


TRICKY = st.lists(st.sampled_from(["x", "é", "🦙", " ", "  ", "\u3000", "\n", "\t", "▁", "</s>", "<|assistant|>",
                                   "<|end|>", "<s>", "therefore,", "the", "<0x41>", "<"]), max_size=60).map("".join)


@pytest.fixture(scope="module", params=["phi3-tokenizer", "phi4", "shakespeare"])
def tokenizer(request):
    from minislm.load import bundled_model

    return load_tokenizer(FIXTURES / request.param if request.param != "shakespeare" else bundled_model())


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(TRICKY, st.text(max_size=80)))
def test_fewest_tokens_is_never_more_than_the_tokens(tokenizer, text):
    """The bound the server refuses over-long prompts by: any text, the added tokens that
    swallow whitespace beside them (Phi-3's "</s>" + 10,000 spaces is one token) included."""
    assert tokenizer.piece_bound[0] > 0  # Phi-3 SentencePiece-style, Phi-4 byte-level: the bound applies
    assert tokenizer.fewest_tokens(text) <= len(tokenizer.encode(text, add_bos=False))


def test_fewest_tokens_counts_bytes_over_the_longest_piece(phi3):
    longest, strip_starts = phi3.piece_bound
    assert longest == max(len(p.encode()) for p in phi3.backend.get_vocab(with_added_tokens=True))
    assert strip_starts == "<"  # Phi-3's </s>, <|assistant|>, <|end|> ... are rstrip
    assert phi3.fewest_tokens("x" * (10 * longest)) == 10
    assert phi3.fewest_tokens("</s>" + " " * (10 * longest)) == 1


def test_fewest_tokens_promises_nothing_for_pipelines_that_can_shrink_text():
    """BERT-style whitespace splitting drops the spaces, NFKC turns "ﬁ" (3 bytes) into
    "fi" (2), and without byte fallback a whole unknown word may be one <unk>."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers

    from minislm.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "a": 1, "b": 2}
    drops_spaces = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    drops_spaces.pre_tokenizer = pre_tokenizers.Whitespace()
    nfkc = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    nfkc.normalizer = normalizers.NFKC()
    no_fallback = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", fuse_unk=True))
    for backend in (drops_spaces, nfkc, no_fallback):
        tokenizer = Tokenizer(backend, {}, False, None)
        assert tokenizer.piece_bound == (0, "") and tokenizer.fewest_tokens("a " * 1000) == 0
