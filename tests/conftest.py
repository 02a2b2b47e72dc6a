"""Shared paths and helpers for the test suite.

Nothing here touches the network: models come from tests/fixtures/ (made by
tools/make_fixtures.py) or are built by the tests themselves.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from optional import SKIP_PREFIX, require_module

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
    """torch and transformers for the live differential tests: skipped without them,
    except in CI, which sets MINISLM_REQUIRE_REFERENCE=1 (tests/optional.py)."""
    return require_module("torch"), require_module("transformers")


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


def decoder_greedy(model, prompt, max_new_tokens: int) -> list[int]:
    """The decoder's own greedy tokens through the KV cache, stopping on
    generation_config.json's ids: what transformers' greedy decoding computes. The
    policy's extra rules (runtime.py: never an id the tokenizer has no piece for, stop on
    the tokenizer's end token too) are left out because transformers has neither, and
    the fixtures' random weights do pick padding ids; tests/test_runtime.py tests them."""
    from minislm.generate import generate_tokens
    from minislm.sampling import Sampler, SamplingSettings

    greedy = Sampler(SamplingSettings(repetition_penalty=model.generation_config.repetition_penalty))
    return list(generate_tokens(model, model.check_ids(prompt), max_new_tokens, greedy,
                                model.generation_config.eos_token_ids))


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


# Phi-3-vision's golden fixture keeps no weights: they are rebuilt bit for bit from a
# seed (minislm.bench.random_checkpoint), and the file's SHA-256 must match the one
# tools/make_vision_fixtures.py recorded when it ran the reference code on them.
PHI3_V_FIXTURE = FIXTURES / "phi3_v"
PHI3_V_REFERENCE = PHI3_V_FIXTURE / "reference_vision.safetensors"


@pytest.fixture(scope="session")
def phi3_v_dir(tmp_path_factory) -> Path:
    """tests/fixtures/phi3_v plus its rebuilt model.safetensors, in a temporary folder."""
    import json
    import shutil

    from safetensors import safe_open

    from minislm.bench.random_checkpoint import write_hashed_checkpoint

    folder = tmp_path_factory.mktemp("phi3_v") / "model"
    shutil.copytree(PHI3_V_FIXTURE, folder)
    metadata = safe_open(PHI3_V_REFERENCE, "np").metadata()
    sha = write_hashed_checkpoint(folder, json.loads((folder / "config.json").read_text()), int(metadata["seed"]))
    assert sha == metadata["checkpoint_sha256"], "the rebuilt checkpoint is not the one the reference ran on"
    return folder


# ---------------------------------------------------------------- CI's two phases


def pytest_collectreport(report):
    record_optional_skip(report)


def pytest_runtest_logreport(report):
    record_optional_skip(report)


def record_optional_skip(report) -> None:
    """With MINISLM_SKIPPED_LOG set (CI's first phase), append the node id of every test
    or module skipped for a missing optional package, one per line: the list of tests
    CI runs again once it has installed them."""
    log = os.environ.get("MINISLM_SKIPPED_LOG")
    if not log or not report.skipped or not isinstance(report.longrepr, tuple):
        return
    reason = report.longrepr[2].removeprefix("Skipped: ")
    if reason.startswith(SKIP_PREFIX + ":"):
        with open(log, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")
