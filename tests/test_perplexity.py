"""Perplexity: windowed scoring equals scoring each token with the same context by hand."""

import math

import pytest

import minislm
from minislm.perplexity import log_softmax, score_text, windows
from conftest import FIXTURES

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York."  # < 128 tokens
LONG_TEXT = TEXT * 3  # longer than the fixture's context: needs windows


@pytest.fixture(scope="module")
def model():
    return minislm.load(FIXTURES / "gqa")


def test_windows_score_every_token_once():
    for n, window, stride in [(10, 4, 2), (100, 32, 16), (33, 32, 31), (5, 64, 32)]:
        scored = []
        for begin, end, first in windows(n, window, stride):
            assert end - begin <= window and first > begin  # each scored token has context
            scored += range(first, end)
        assert scored == list(range(1, n))


def test_one_window_equals_a_single_forward(model):
    ids = model.tokenizer.encode(TEXT)
    result = score_text(model, TEXT, window=len(ids) + 1, stride=1)
    log_probs = log_softmax(model.logits(ids))
    expected = -sum(log_probs[t, ids[t + 1]] for t in range(len(ids) - 1))
    assert result.tokens == len(ids) - 1 and result.characters == len(TEXT)
    assert math.isclose(result.nll, expected, rel_tol=1e-9)


def test_sliding_windows_equal_token_by_token_scoring(model):
    """Each token scored with exactly the context its window gives it, computed by hand."""
    ids = model.tokenizer.encode(LONG_TEXT)
    window, stride = 40, 24
    by_hand = 0.0
    for begin, end, first in windows(len(ids), window, stride):
        for p in range(first, end):
            logits = model.logits(ids[begin:p])[-1]
            by_hand -= log_softmax(logits[None])[0, ids[p]]
    result = score_text(model, LONG_TEXT, window=window, stride=stride)
    assert math.isclose(result.nll, by_hand, rel_tol=1e-6)
    assert result.nats_per_char == pytest.approx(by_hand / len(LONG_TEXT))
    assert result.bits_per_char == pytest.approx(result.nats_per_char / math.log(2))
    assert result.token_perplexity == pytest.approx(math.exp(by_hand / (len(ids) - 1)))


def test_cli_reports_the_three_figures(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "text.txt"
    path.write_text(LONG_TEXT, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "minislm", "perplexity", "--model", str(FIXTURES / "gqa"), "--file", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "nats/char" in result.stdout and "bits/char" in result.stdout and "token perplexity" in result.stdout
    expected = score_text(minislm.load(FIXTURES / "gqa"), LONG_TEXT)
    assert f"{expected.nats_per_char:.4f} nats/char" in result.stdout
