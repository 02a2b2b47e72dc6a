"""Logprobs (minislm/logprobs.py) through the library, the CLI and the server.

Each generated token's log-probability must equal log_softmax of the logits the
sampler drew it from: the model's logits for the text before it, from a full
forward (no cache), with the processors the settings ask for applied here in plain
NumPy in transformers' order, not by minislm's sampler. The server must return the
same numbers in OpenAI's two shapes (chat: `content` entries; completions: parallel
lists with `text_offset`).
"""

import numpy as np
import pytest

import minislm
from minislm.cli import main as minislm_main
from minislm.load import BUNDLED_MODEL
from minislm.logprobs import token_text
from served import CHAT, client, running

# The cached decode and a full forward differ by float32 rounding (~1e-6 on the shipped
# model's logits); a log-softmax adds a few ulp. 1e-4 is far below any real difference.
ATOL_LOGPROB = 1e-4


@pytest.fixture(scope="module")
def model():
    return minislm.load(BUNDLED_MODEL)


def reference_logprobs(model, ids, penalty: float, temperature: float, top_k: int) -> np.ndarray:
    """log_softmax of the last position's logits after the repetition penalty (CTRL's),
    the temperature (none when greedy) and top-k, from a full forward."""
    logits = model.logits(ids)[-1].astype(np.float64)[: model.tokenizer.vocab_size]
    seen = np.unique(ids)
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    if temperature:
        logits = logits / temperature
    if top_k:
        logits[logits < np.sort(logits)[-top_k]] = -np.inf
    return logits - np.logaddexp.reduce(logits)


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 20, "seed": 3}])
def test_logprobs_are_log_softmax_of_the_distribution_the_token_was_drawn_from(model, settings):
    ids = model.tokenizer.encode("ROMEO:\nWhat light")
    entries = list(model.generate(ids, 12, logprobs=5, **settings))
    penalty = model.generation_config.repetition_penalty  # 1.2, which the shipped model asks for
    for n, entry in enumerate(entries):
        text = ids + [e.token for e in entries[:n]]
        expected = reference_logprobs(model, text, penalty, settings.get("temperature", 0), settings.get("top_k", 0))
        assert abs(entry.logprob - expected[entry.token]) < ATOL_LOGPROB
        best = np.argsort(-expected, kind="stable")[:5]
        assert [t for t, _ in entry.top] == best.tolist()
        np.testing.assert_allclose([lp for _, lp in entry.top], expected[best], atol=ATOL_LOGPROB)
    assert [e.token for e in entries] == list(model.generate(ids, 12, **settings))  # asking changes no token


def test_alternatives_never_list_an_impossible_id(model):
    """top_k 3 leaves 3 ids with a probability; asking for 10 alternatives lists those 3."""
    ids = model.tokenizer.encode("ROMEO:")
    for entry in model.generate(ids, 5, logprobs=10, temperature=1.0, top_k=3, seed=1):
        assert len(entry.top) == 3 and all(np.isfinite(lp) for _, lp in entry.top)
        assert entry.token in [t for t, _ in entry.top]


def test_the_cli_prints_the_apis_numbers(model, capsys):
    ids = model.tokenizer.encode("ROMEO:")
    entries = list(model.generate(ids, 6, logprobs=2))
    assert minislm_main(["generate", "--no-chat-template", "-n", "6", "--logprobs", "2", "ROMEO:"]) == 0
    err = capsys.readouterr().err
    for n, entry in enumerate(entries, 1):
        line = next(line for line in err.splitlines() if line.startswith(f"#{n} "))
        assert f"{token_text(model.tokenizer, entry.token)!r} {entry.logprob:.4f}" in line


def test_the_server_returns_them_as_openai_does(model):
    ids_chat = model.tokenizer.encode_chat(CHAT)
    expected_chat = list(model.generate(ids_chat, 8, logprobs=3))
    expected_text = list(model.generate(model.tokenizer.encode("ROMEO:"), 8, logprobs=2))
    with running(model) as server:
        c = client(server)
        chat = c.chat.completions.create(model="x", messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3)
        content = chat.choices[0].logprobs.content
        assert [e.logprob for e in content] == pytest.approx([e.logprob for e in expected_chat], abs=1e-9)
        assert [e.token for e in content] == [token_text(model.tokenizer, e.token) for e in expected_chat]
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in content)
        assert b"".join(bytes(e.bytes) for e in content).decode() .strip() == chat.choices[0].message.content.strip()

        streamed = [chunk.choices[0].logprobs for chunk in c.chat.completions.create(
            model="x", messages=CHAT, max_tokens=8, logprobs=True, stream=True) if chunk.choices]
        # the same request again: the cache holds its prompt, so only the last prompt token
        # is fed (a one-token forward, not the prefill's): equal within rounding
        assert [e.logprob for part in streamed if part for e in part.content] == pytest.approx(
            [e.logprob for e in content], abs=ATOL_LOGPROB)

        text = c.completions.create(model="x", prompt="ROMEO:", max_tokens=8, logprobs=2).choices[0]
        assert text.logprobs.token_logprobs == pytest.approx([e.logprob for e in expected_text], abs=1e-9)
        assert all(len(top) <= 2 for top in text.logprobs.top_logprobs)
        offsets = text.logprobs.text_offset
        assert offsets == sorted(offsets) and offsets[-1] < len(text.text)

        for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
            with pytest.raises(Exception, match="top_logprobs"):
                c.chat.completions.create(model="x", messages=CHAT, max_tokens=2, **bad)
