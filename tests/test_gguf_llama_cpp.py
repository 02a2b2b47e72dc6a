"""minislm against llama.cpp itself, on GGUF files llama.cpp quantized.

Runs where llama-cpp-python is installed (CI builds it from the PyPI source
package; locally it is optional and these tests skip without it, unless
MINISLM_REQUIRE_LLAMA_CPP=1 makes a missing install an error):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 --no-binary :all:

Files: float GGUFs written from the committed fixtures (both layouts, partial rotary
with a tied output, LongRoPE) and from a random 256-wide Phi-3, then quantized by
llama.cpp's own quantizer (`llama_model_quantize`) to Q8_0, Q4_0, Q4_K_M and
Q5_K_M with its default per-tensor choices. Each file is checked twice:

* the weights: minislm's equal `gguf.quants.dequantize` bit for bit — on blocks
  llama.cpp's quantizer chose, not random ones;
* the logits against llama.cpp's, within bounds measured on these files (see
  BOUNDS): llama.cpp multiplies quantized weights by activations it has itself
  quantized to 8 bits (Q8_0/Q8_K blocks), and F16 weights by F16 activations, so
  its logits are not those of the exact weights; minislm's are (float32);
* the explanation of that gap: minislm's exact weights multiplied by activations
  rounded as llama.cpp rounds them (llama_cpp_compare.with_llama_cpp_activations)
  give llama.cpp's logits to float32 noise (<= 1e-4), position after position, until
  the first position where some activation sits on a rounding boundary and the two
  engines' last-bit differences round it to different codes; from there on the KV
  cache carries the difference. On these files that happens at position 7 at the
  earliest, so the first SAME_PREFIX positions must match: each of them is a forward
  through every weight of the file, so one wrong weight would fail it.
* the K-quant files once more as minislm runs them by default, on its K-quant
  kernels (kernels/kquant.py: int8 activations per 256 inputs, as llama.cpp's Q8_K):
  their logits are llama.cpp's to float32 noise over the first SAME_PREFIX positions
  (the same rounding-boundary caveat), so the kernels' arithmetic, not only the
  weights, is held to llama.cpp's.
PhiMoE is not compared: llama.cpp runs its PhiMoE GGUFs with RMSNorm and softmax
top-2 routing, not PhiMoE's LayerNorm and sparsemixer (docs/formats.md).
"""


import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from gguf_files import reference_weights, wide_checkpoint, write_gguf
from llama_cpp_compare import (llama_cpp_logits, metrics, prompt_ids, quantize_with_llama_cpp,
                               with_llama_cpp_activations)
from optional import require_module

require_module("llama_cpp")  # CI builds it (.ci/run)

CASES = [
    ("mha", "llama", "F32"),
    ("gqa", "phi3", "F32"),
    ("gqa", "llama", "F32"),
    ("partial_tied", "phi3", "F32"),
    ("longrope", "phi3", "F32"),
    ("gqa", "phi3", "Q4_K_M"),  # rows of 32 and 64: llama.cpp writes only the fallback types
    ("wide", "phi3", "F16"),
    ("wide", "phi3", "Q8_0"),
    ("wide", "phi3", "Q4_0"),
    ("wide", "phi3", "Q4_K_M"),
    ("wide", "phi3", "Q5_K_M"),
    ("wide", "llama", "Q8_0"),
    ("wide", "llama", "Q4_K_M"),
]
# (max |Δlogit|, least top-1 agreement, most mean KL in nats) per file kind, over 24
# positions of random tiny models whose logits have a standard deviation of ~1.
# Measured (tools/gguf_vs_llama_cpp.py, llama-cpp-python 0.3.36, AVX-512 CPU):
# F32 <= 4e-6; F16 3e-3 (F16 activations); quantized 0.08-0.13, top-1 >= 0.917,
# KL <= 3.6e-4 (8-bit activations). The bounds leave room for other CPUs' kernels.
BOUNDS = {
    "F32": (1e-4, 1.0, 1e-9),
    "F16": (1e-2, 1.0, 1e-5),
}
QUANTIZED_BOUND = (0.3, 0.85, 1e-3)
SAME_PREFIX = 4  # leading positions where the activation-rounding twin must match llama.cpp
ATOL_TWIN = 1e-4


def source_folder(model: str, out):
    if model != "wide":
        return FIXTURES / model
    folder = out / "wide"
    return folder if folder.is_dir() else wide_checkpoint(folder)


def gguf_file(model: str, layout: str, kind: str, out):
    """The GGUF for one case, made once per folder `out`."""
    target = out / f"{model}-{layout}-{kind}.gguf"
    if target.is_file():
        return target
    folder = source_folder(model, out)
    if kind in ("F32", "F16"):
        return write_gguf(target, folder, layout, kind)
    f32 = gguf_file(model, layout, "F32", out)
    return quantize_with_llama_cpp(f32, target, kind)


def weights_are_exact(model, path) -> bool:
    expected = reference_weights(path, model.config)
    for name, w in model.weights.items():
        ref = expected[name]
        same = w.view(np.uint32) == ref.view(np.uint32)
        if w.shape != ref.shape or not np.all(same | ((w == 0) & (ref == 0))):
            return False
    return set(expected) == set(model.weights)


def compare(model_name: str, layout: str, kind: str, out) -> dict:
    import gguf

    path = gguf_file(model_name, layout, kind, out)
    model = minislm.load(path, quant="float32")
    # LongRoPE: llama.cpp's context (256) is past the fixture's original 64, so it runs
    # the long factors; a prompt longer than 64 makes minislm choose them too.
    ids = prompt_ids(model.config.vocab_size, length=80 if model.config.rope.kind == "longrope" else 24)
    theirs = llama_cpp_logits(path, ids)
    row = metrics(model.logits(ids), theirs)
    twin = np.abs(with_llama_cpp_activations(model, path).logits(ids) - theirs).max(-1)
    row["twin"] = twin
    row["twin_prefix"] = int(np.argmax(twin > ATOL_TWIN)) if (twin > ATOL_TWIN).any() else len(twin)
    row["types"] = sorted({t.tensor_type.name for t in gguf.GGUFReader(path).tensors})
    row["exact"] = weights_are_exact(model, path)
    return row


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("llama_cpp")


@pytest.mark.parametrize("model,layout,kind", CASES)
def test_against_llama_cpp(out, model, layout, kind):
    row = compare(model, layout, kind, out)
    assert row["exact"], "minislm's weights differ from gguf.quants.dequantize"
    max_abs, top1, kl = BOUNDS.get(kind, QUANTIZED_BOUND)
    assert row["max_abs"] <= max_abs and row["top1"] >= top1 and row["kl"] <= kl, row
    if kind != "F16":  # llama.cpp's F16 dot products are not a rounding of the activations alone
        assert row["twin_prefix"] >= min(SAME_PREFIX, len(row["twin"])), row


@pytest.mark.parametrize("layout,kind", [("phi3", "Q4_K_M"), ("phi3", "Q5_K_M"), ("llama", "Q4_K_M")])
def test_k_quant_kernels_give_llama_cpps_logits(out, layout, kind):
    path = gguf_file("wide", layout, kind, out)
    model = minislm.load(path, kv_cache="float32")  # the default: the file's codes on the K-quant kernels
    from minislm.kernels import KQuantWeight

    matrices = [part for w in model.weights.values() for part in getattr(w, "parts", [w])]
    assert {m.kind for m in matrices if isinstance(m, KQuantWeight)} >= {"Q6_K", kind[:4]}
    ids = prompt_ids(model.config.vocab_size, length=24)
    theirs = llama_cpp_logits(path, ids)
    ours = model.logits(ids)
    row = metrics(ours, theirs)
    max_abs, top1, kl = QUANTIZED_BOUND
    assert row["max_abs"] <= max_abs and row["top1"] >= top1 and row["kl"] <= kl, row
    err = np.abs(ours - theirs).max(-1)
    assert (err[:SAME_PREFIX] <= ATOL_TWIN).all(), err


def test_llama_cpp_writes_k_quants_and_fallbacks(out):
    """The types the quantized files hold: K-quants where rows are 256 long, and the
    fallbacks (Q5_0/Q5_1/Q8_0) where they are not: all of them read exactly above."""
    import gguf

    types = set()
    for model, layout, kind in CASES:
        types |= {t.tensor_type.name for t in gguf.GGUFReader(gguf_file(model, layout, kind, out)).tensors}
    assert {"Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0"} <= types
    assert types & {"Q5_0", "Q5_1"}


# ---------------------------------------------------------------- the tokenizer in a GGUF file

VOCAB = FIXTURES / "phi3-tokenizer" / "ggml-vocab-phi-3.gguf"


def test_tokenizer_ids_equal_llama_cpps_on_the_same_file():
    """llama.cpp's Phi-3 vocabulary test strings through llama.cpp's tokenizer and
    through minislm's reading of the same file's metadata: the same ids."""
    import gguf

    from llama_cpp_compare import llama_cpp_tokenize
    from minislm.formats.gguf_tokenizer import tokenizer_from_gguf

    texts = (VOCAB.parent / "vocab-test.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    ours, _ = tokenizer_from_gguf(gguf.GGUFReader(VOCAB))
    theirs = llama_cpp_tokenize(VOCAB, texts)
    assert len(texts) == 47
    assert [ours.encode(t, add_special_tokens=False).ids for t in texts] == theirs


def test_chat_prompt_ids_where_llama_cpp_differs():
    """The rendered Phi-3 chat prompt: minislm follows the hub's tokenizer.json (the
    "\\n" after <|user|> and <|end|> stays a token); llama.cpp marks every Phi-3 special
    token rstrip and swallows them. Both asserted, so a change on either side shows."""
    import gguf

    from llama_cpp_compare import llama_cpp_tokenize
    from minislm.formats.gguf_tokenizer import tokenizer_from_gguf

    prompt = "<s><|user|>\nHi<|end|>\n<|assistant|>\n"
    ours, _ = tokenizer_from_gguf(gguf.GGUFReader(VOCAB))
    assert ours.encode(prompt, add_special_tokens=False).ids == [1, 32010, 29871, 13, 18567, 32007, 29871, 13, 32001]
    assert llama_cpp_tokenize(VOCAB, [prompt], parse_special=True) == [[1, 32010, 6324, 32007, 32001]]
