"""Shared paths and helpers for the test suite.

Nothing here touches the network: models come from tests/fixtures/ (made by
tools/make_fixtures.py) or are built by the tests themselves.
"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# The real Phi-3 tokenizer lives beside the repo in ../shared (CI provides it).
PHI3_TOKENIZER = ROOT.parent / "shared" / "phi3-tokenizer"
VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file())


@pytest.fixture(scope="session")
def phi3_tokenizer_dir() -> Path:
    assert (PHI3_TOKENIZER / "tokenizer.json").is_file(), f"expected the Phi-3 tokenizer at {PHI3_TOKENIZER}"
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
