"""minislm's GGUF metadata reader (minislm/formats/gguf_file.py) against gguf-py's own
`GGUFReader`, on every kind of file the suite writes: the same keys in the same order,
the same values and value types, the same tensors with the same bytes and shapes.
"""

import numpy as np
import gguf
import pytest

from conftest import FIXTURES
from gguf_files import write_gguf, write_vocab_only
from minislm.errors import MinislmError
from minislm.formats.gguf import open_reader
from minislm.formats.gguf_file import read_gguf
from minislm.tiktoken_bpe import read_ranks


def assert_reads_like_gguf_py(path):
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    fields = {k: v for k, v in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        assert ours.fields[key].contents() == field.contents(), key
        assert list(ours.fields[key].types) == list(field.types), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.n_elements, a.n_bytes) == (b.tensor_type, b.n_elements, b.n_bytes), a.name
        assert a.shape.tolist() == b.shape.tolist() and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_reads_what_gguf_py_reads(tmp_path, kind):
    assert_reads_like_gguf_py(write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", kind))


@pytest.mark.parametrize("model,layout", [("mha", "llama"), ("moe", "phimoe")])
def test_reads_the_other_layouts_too(tmp_path, model, layout):
    assert_reads_like_gguf_py(write_gguf(tmp_path / "m.gguf", FIXTURES / model, layout, "F16"))


def test_reads_llama_cpps_own_vocabulary_file():
    assert_reads_like_gguf_py(FIXTURES / "phi3-tokenizer" / "ggml-vocab-phi-3.gguf")


def test_reads_a_byte_level_vocabulary(tmp_path):
    """The first 3,000 ranks of o200k, written as llama.cpp's converter writes Phi-4-mini's."""
    ranks = dict(list(read_ranks(FIXTURES / "tiktoken" / "o200k_base.tiktoken.gz").items())[:3000])
    special = {"<|endoftext|>": 3000, "<|end|>": 3001}
    assert_reads_like_gguf_py(write_vocab_only(tmp_path / "v.gguf", ranks=ranks, special=special, pre="gpt-4o",
                                               vocab_size=3010, bos=3000, eos=3001, chat_template="{{ x }}"))


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.999])
def test_a_truncated_file_is_one_line_naming_it(tmp_path, cut):
    whole = write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", "Q4_0").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[: int(len(whole) * cut)])
    with pytest.raises(MinislmError, match="cut.gguf: truncated or corrupt GGUF file"):
        open_reader(path)
