"""Shared paths and helpers for the test suite.

Nothing here touches the network: models come from tests/fixtures/ (made by
tools/make_fixtures.py) or are built by the tests themselves.
"""

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# The real Phi-3 tokenizer, rebuilt from llama.cpp's vocabulary file by
# tools/make_phi3_tokenizer.py and committed, so the suite needs nothing beside the repo.
PHI3_TOKENIZER = FIXTURES / "phi3-tokenizer"
VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())
# The bar for every comparison with transformers' float32 logits: both sides compute
# in float32 and differ only in summation order (BLAS vs torch), which moves logits
# of magnitude ~10 by ~1e-5. 1e-4 is the bar.
ATOL_FP32_LOGITS = 1e-4


@pytest.fixture(scope="session")
def phi3_tokenizer_dir() -> Path:
    assert (PHI3_TOKENIZER / "tokenizer.json").is_file(), f"{PHI3_TOKENIZER}: run tools/make_phi3_tokenizer.py"
    return PHI3_TOKENIZER


def import_reference():
    """torch and transformers for the live differential tests.

    Locally they are optional (the tests skip without them); CI sets
    MINISLM_REQUIRE_REFERENCE=1, and then a missing import fails the run instead.
    """
    import os

    if os.environ.get("MINISLM_REQUIRE_REFERENCE") == "1":
        import torch
        import transformers
    else:
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
    return torch, transformers


def save_random_model(model, folder: Path, seed: int):
    """Give a transformers model large random weights and save it as safetensors.

    Weights large enough that logits spread over ~10 units, so argmax ties are
    vanishingly rare: norm gains around 1, biases (PhiMoE) around 0, matrices with
    unit-variance outputs.
    """
    torch, _ = import_reference()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    model.eval().save_pretrained(folder)
    return model


def assert_cached_last_token_matches(ours, ids, expected_last, atol: float) -> None:
    """The last token again, but through the KV cache after a prefill of the rest."""
    if len(ids) > 1:
        cache = ours.new_cache(len(ids))
        ours.forward(ids[:-1], cache)
        last = ours.lm_head(ours.forward(ids[-1:], cache))[0]
        assert np.abs(last - expected_last).max() <= atol


def assert_greedy_matches(ours, reference, prompt, max_new_tokens: int) -> None:
    """minislm's cached greedy tokens equal transformers' full-forward ones. Generation
    stops when prompt + tokens fill the context (max_position_embeddings)."""
    n = min(max_new_tokens, ours.config.max_position_embeddings - len(prompt))
    expected = greedy_by_full_forward(reference, prompt, n, ours.generation_config.eos_token_ids)
    assert list(ours.generate(prompt, max_new_tokens)) == expected


def greedy_by_full_forward(reference, prompt, max_new_tokens: int, stop_ids) -> list[int]:
    """transformers' greedy tokens, each from a full forward over the whole sequence.

    This is the definition a cached decoder must reproduce. We do not use
    `generate()` here: its sliding-window cache disagrees with transformers' own
    full forward when the window is 1 (transformers 5.24), and its LongRoPE switch
    relies on dropping the cache (4.57.1's PhiMoE gets that wrong); a plain loop has
    neither subtlety.
    """
    torch, _ = import_reference()
    sequence, new = list(prompt), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(reference(torch.tensor([sequence])).logits[0, -1].argmax())
        new.append(token)
        sequence.append(token)
        if token in stop_ids:
            break
    return new
