"""The GGUF byte-level vocabularies of Phi-4 and Phi-4-mini against llama.cpp itself.

llama-cpp-python (0.3.36) loads the same vocab-only files tests/test_gguf_gpt2_vocab.py
writes and tokenizes the tiktoken sweep (tests/fixtures/tiktoken/sweep.json).

Phi-4 ("dbrx", cl100k): llama.cpp gives tiktoken's ids on every sweep text, and
decodes every id run (characters cut apart included) as tiktoken does.

Phi-4-mini ("gpt-4o", o200k): llama.cpp's split is a rewrite of GPT-4o's pattern for
C++ std::regex (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT4O): the upper/lower-case
classes become "a letter that is not a-z" / "not A-Z", and the combining marks
(\\p{M}) the original pattern keeps inside words are dropped from them. So wherever a
word holds a combining mark (Hindi's vowel signs, a decomposed "é") llama.cpp splits
it differently from the tokenizer Phi-4-mini was trained with; minislm follows tiktoken
and the hub's tokenizer.json there. The test pins exactly that: every sweep text without
a combining mark agrees with llama.cpp, and every disagreement holds one.
"""

import unicodedata

from optional import require_module

require_module("llama_cpp")  # CI builds it (.ci/run)

from llama_cpp_compare import llama_cpp_detokenize, llama_cpp_tokenize  # noqa: E402
from test_gguf_gpt2_vocab import SWEEP, vocab_files  # noqa: E402,F401  (the module-scoped files)


def has_combining_mark(text: str) -> bool:
    return any(unicodedata.category(c).startswith("M") for c in text)


def test_phi4_dbrx_vocabulary_equals_llama_cpp_everywhere(vocab_files):
    entry = SWEEP["phi4"]
    assert llama_cpp_tokenize(vocab_files["phi4"], entry["texts"], parse_special=True) == entry["ids"]
    assert llama_cpp_detokenize(vocab_files["phi4"], entry["decode_ids"]) == entry["decoded"]


def test_phi4_mini_gpt4o_vocabulary_differs_from_llama_cpp_only_at_combining_marks(vocab_files):
    entry = SWEEP["phi4mini"]
    theirs = llama_cpp_tokenize(vocab_files["phi4mini"], entry["texts"], parse_special=True)
    differ = [text for text, a, b in zip(entry["texts"], theirs, entry["ids"]) if a != b]
    assert all(has_combining_mark(text) for text in differ), [t for t in differ if not has_combining_mark(t)][:3]
    unmarked = [text for text in entry["texts"] if not has_combining_mark(text)]
    assert len(unmarked) > 80  # code, CJK, emoji, numbers, whitespace, specials, chat turns
    assert "नमस्ते दुनिया क्षत्रिय" in differ  # real Hindi: the disagreement is not only in random text
    assert llama_cpp_detokenize(vocab_files["phi4mini"], entry["decode_ids"]) == entry["decoded"]
