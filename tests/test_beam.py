"""Beam search: token for token what transformers' generate(num_beams=N, do_sample=False)
returns, on every golden fixture and on the shipped model (recorded by
tools/make_beam_references.py); the KV cache copy it relies on; the API's shape.
"""

import json

import numpy as np
import pytest

import minislm
from minislm.beam import BeamStats, beam_search, shared_positions
from minislm.cli import main as minislm_main
from minislm.load import BUNDLED_MODEL
from conftest import ATOL_FP32_LOGITS, FIXTURES, ROOT, VARIANTS

SHIPPED_REFERENCE = ROOT / "tests" / "data" / "shakespeare_beam_reference.json"
REFERENCES = [FIXTURES / v / "beam_reference.json" for v in VARIANTS] + [SHIPPED_REFERENCE]
# A log-softmax value moves by at most twice as much as the logits, which agree with
# transformers' within ATOL_FP32_LOGITS. A hypothesis of n tokens scores the sum of n of
# them divided by n ** length_penalty, so its score may move by n ** (1 - length_penalty)
# times this.
ATOL_LOG_PROB = 2 * ATOL_FP32_LOGITS


def describe(case) -> str:
    return (f"{len(case['prompt'])}-token prompt, num_beams={case['num_beams']}, "
            f"length_penalty={case['length_penalty']}, early_stopping={case['early_stopping']}, "
            f"num_return_sequences={case['num_return_sequences']}")


@pytest.mark.parametrize("path", REFERENCES, ids=lambda p: p.parent.name if p.name == "beam_reference.json" else "shipped")
def test_beam_search_matches_transformers(path):
    record = json.loads(path.read_text())
    model = minislm.load(ROOT / record["model"])
    assert len(record["cases"]) == 12
    for case in record["cases"]:
        hypotheses = model.beam_search(
            case["prompt"], case["max_new_tokens"], case["num_beams"], length_penalty=case["length_penalty"],
            early_stopping=case["early_stopping"], num_return_sequences=case["num_return_sequences"],
        )
        assert [list(h.ids) for h in hypotheses] == case["sequences"], describe(case)
        for h, expected in zip(hypotheses, case["scores"]):
            assert abs(h.score - expected) <= ATOL_LOG_PROB * len(h.ids) ** (1 - case["length_penalty"]), describe(case)


def test_generate_with_beams_returns_the_best_hypothesis():
    record = json.loads(SHIPPED_REFERENCE.read_text())
    model = minislm.load(BUNDLED_MODEL)
    case = next(c for c in record["cases"] if c["num_return_sequences"] > 1)
    ids = model.generate(case["prompt"], case["max_new_tokens"], num_beams=case["num_beams"],
                         length_penalty=case["length_penalty"], early_stopping=case["early_stopping"])
    assert list(ids) == case["sequences"][0]


# ---------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def model():
    return minislm.load(FIXTURES / "mha")


def decode(model, cache, *tokens):
    for token in tokens:
        logits = model.lm_head(model.forward([token], cache))[0]
    return logits


def test_copy_from_copies_only_the_positions_after_keep(model):
    """Two beams as beam search makes them: one prefill, copied, then one-token forwards."""
    prompt = [1, 40, 41, 42, 43]
    a, b = model.new_cache(16), model.new_cache(16)
    model.forward(prompt, a)
    assert b.copy_from(a) == 5
    decode(model, a, 5, 6, 7)
    decode(model, b, 5, 8)
    assert shared_positions(b, a) == 6  # the prompt and token 5
    assert b.copy_from(a, keep=6) == 2  # positions of 6 and 7
    n = a.length
    assert b.length == n and (b.tokens[:n] == a.tokens[:n]).all()
    assert np.array_equal(b.keys[:, :, :n], a.keys[:, :, :n])
    assert np.array_equal(b.values[:, :, :n], a.values[:, :, :n])
    assert np.array_equal(decode(model, a, 9), decode(model, b, 9))  # and both continue alike


def test_copy_from_refuses_what_does_not_fit(model):
    a = model.new_cache(8)
    model.forward([1, 2, 3], a)
    with pytest.raises(ValueError, match="holds 2 positions"):
        model.new_cache(2).copy_from(a)
    with pytest.raises(ValueError, match="keep=2"):
        model.new_cache(8).copy_from(a, keep=2)  # the target holds nothing to keep


def test_the_prompt_is_prefilled_once_and_each_step_costs_one_forward_per_beam(model, monkeypatch):
    forwards = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, cache, trace=None: forwards.append(len(ids)) or original(ids, cache))
    stats = BeamStats()
    beam_search(model, list(range(1, 25)), 12, 4, model.generation_config.eos_token_ids, stats=stats)
    assert forwards[0] == 24 and all(n == 1 for n in forwards[1:])  # the rest are single tokens
    assert len(forwards) - 1 == stats.forwards <= 4 * stats.steps
    assert stats.copied_positions > 0


# ---------------------------------------------------------------- the API


def test_generate_checks_its_arguments_when_called_not_when_iterated(model):
    ids = [1, 40, 41]
    for kwargs in [dict(num_beams=0), dict(num_beams=2, temperature=0.7), dict(num_beams=2, seed=1),
                   dict(length_penalty=2.0), dict(early_stopping=True), dict(max_new_tokens=-1),
                   dict(num_beams=2, max_new_tokens=0), dict(num_beams=2, early_stopping="sometimes")]:
        kwargs = {"max_new_tokens": 5, **kwargs}
        with pytest.raises(ValueError):
            model.generate(ids, **kwargs)  # no iteration: the call itself raises
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([], 5)


def test_beam_search_checks_num_return_sequences_and_the_width(model):
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.beam_search([1, 2], 5, 2, num_return_sequences=3)
    # 3 stop ids: 4 candidates per beam, so 97 beams need 388 > 384 vocabulary ids
    with pytest.raises(ValueError, match="vocabulary"):
        model.beam_search([1, 2], 5, 97)


def test_hypotheses_come_best_first(model):
    hypotheses = model.beam_search([1, 40, 41, 42], 10, 5, num_return_sequences=5)
    scores = [h.score for h in hypotheses]
    assert len(hypotheses) == 5 and scores == sorted(scores, reverse=True)


def test_one_beam_in_generate_is_greedy(model):
    assert list(model.generate([1, 40, 41], 10, num_beams=1)) == list(model.generate([1, 40, 41], 10))


# ---------------------------------------------------------------- the command line


def test_generate_num_beams_prints_the_best_hypothesis(capsys):
    model = minislm.load(BUNDLED_MODEL)
    best = model.beam_search(model.tokenizer.encode("ROMEO:"), 16, 3)[0]
    assert minislm_main(["generate", "--no-chat-template", "-n", "16", "--num-beams", "3", "ROMEO:"]) == 0
    out, err = capsys.readouterr()
    assert out == model.tokenizer.decode(list(best.ids)) + "\n"
    assert "3 beams" in err and f"score {best.score:.4f}" in err


def test_generate_num_return_sequences_prints_each_hypothesis(capsys):
    assert minislm_main(["generate", "--no-chat-template", "-n", "8", "--num-beams", "4",
                         "--num-return-sequences", "3", "--length-penalty", "0.5", "--early-stopping", "ROMEO:"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("=== ")]
    assert len(headers) == 3 and headers[0].startswith("=== 1 of 3, score ")


@pytest.mark.parametrize("flags, message", [
    (["--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences"),
    (["--num-beams", "0"], "--num-beams"),
    (["--num-beams", "2", "--temp", "0.5"], "--temp"),
    (["--num-beams", "2", "--stop", "x"], "--stop"),
    (["--length-penalty", "2"], "--num-beams"),
])
def test_beam_flag_errors_are_one_line(capsys, flags, message):
    assert minislm_main(["generate", *flags, "ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err
