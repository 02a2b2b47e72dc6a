"""`generate --hide-reasoning` and `chat --hide-reasoning`: a reasoning model's <think>
section stays off stdout, stderr says how much was hidden, and without the flag the
output is the model's text unchanged.

The model is tests/steered_model.py's: a real Phi-3 checkpoint and tokenizer with
Phi-4-mini-reasoning's chat template, whose greedy reply is known in advance.
"""

import io
import sys

import pytest

from minislm.cli import main as minislm_main
from steered_model import PLAIN_REPLY, THINKING_REPLY, write_steered_model

RAW = "".join(THINKING_REPLY[:-1])  # the reply's text (<|end|> has none)
REASONING = "\nThe user asks for 2 + 2. Two plus two is four.\n"
ANSWER = "2 + 2 = 4."


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    return str(write_steered_model(tmp_path_factory.mktemp("thinking"), THINKING_REPLY))


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    """The template ends the prompt with <think>; the model writes the rest."""
    return str(write_steered_model(tmp_path_factory.mktemp("opened"), THINKING_REPLY[1:], opened=True))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return str(write_steered_model(tmp_path_factory.mktemp("plain"), PLAIN_REPLY))


def run(capsys, *args, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = minislm_main(list(args))
    out, err = capsys.readouterr()
    assert status == 0, err
    return out, err


def hidden_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("[reasoning hidden")]


def test_the_steered_model_thinks_before_it_answers(capsys, thinking):
    """Without the flag, stdout is the whole reply: tags, thinking and answer."""
    out, err = run(capsys, "generate", "-m", thinking, "What is 2 + 2?")
    assert out == RAW + "\n"
    assert RAW == f"<think>{REASONING}</think>\n\n{ANSWER}" and not hidden_lines(err)


def test_generate_hide_reasoning_prints_only_the_answer(capsys, thinking):
    out, err = run(capsys, "generate", "-m", thinking, "What is 2 + 2?", "--hide-reasoning")
    assert out == ANSWER + "\n"
    assert hidden_lines(err) == [f"[reasoning hidden: {len(REASONING)} characters]"]


def test_a_template_that_opens_think_starts_the_reply_inside_it(capsys, opened):
    out, _ = run(capsys, "generate", "-m", opened, "What is 2 + 2?")
    assert out == RAW.removeprefix("<think>") + "\n"  # the model never wrote <think> itself
    out, err = run(capsys, "generate", "-m", opened, "What is 2 + 2?", "--hide-reasoning")
    assert out == ANSWER + "\n"
    assert hidden_lines(err) == [f"[reasoning hidden: {len(REASONING)} characters]"]


def test_a_reply_cut_off_while_thinking_is_all_reasoning(capsys, thinking):
    out, err = run(capsys, "generate", "-m", thinking, "What is 2 + 2?", "--hide-reasoning", "-n", "3")
    assert out == "\n"
    thought = "".join(THINKING_REPLY[1:3])
    assert hidden_lines(err) == [f"[reasoning hidden: {len(thought)} characters; the reply ended before </think>, "
                                 "so it has no answer]"]
    assert "stop: length" in err


def test_a_reply_without_thinking_is_unchanged(capsys, plain):
    shown, _ = run(capsys, "generate", "-m", plain, "What is 2 + 2?")
    hidden, err = run(capsys, "generate", "-m", plain, "What is 2 + 2?", "--hide-reasoning")
    assert shown == hidden == "".join(PLAIN_REPLY[:-1]) + "\n"
    assert not hidden_lines(err)


def test_beam_search_hides_reasoning_too(capsys, thinking):
    out, err = run(capsys, "generate", "-m", thinking, "What is 2 + 2?", "--num-beams", "2", "--hide-reasoning")
    assert out == ANSWER + "\n"
    assert hidden_lines(err) == [f"[reasoning hidden: {len(REASONING)} characters]"]


def test_chat_hide_reasoning(capsys, monkeypatch, thinking):
    """Two turns: each prints its answer alone. The conversation keeps the whole reply,
    so the second turn reuses the cache of the first (its thinking included)."""
    out, err = run(capsys, "chat", "-m", thinking, "--hide-reasoning", stdin="What is 2 + 2?\nAnd again?\n/bye\n",
                   monkeypatch=monkeypatch)
    assert out == f">>> {ANSWER}\n>>> {ANSWER}\n>>> "
    assert hidden_lines(err) == [f"[reasoning hidden: {len(REASONING)} characters]"] * 2
    stats = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert "reused from the cache" in stats[1]


def test_chat_without_the_flag_shows_the_thinking(capsys, monkeypatch, thinking):
    out, err = run(capsys, "chat", "-m", thinking, stdin="What is 2 + 2?\n/bye\n", monkeypatch=monkeypatch)
    assert out == f">>> {RAW}\n>>> "
    assert not hidden_lines(err)
