"""minislm.reasoning: a reasoning model's <think> section apart from its answer, as
llama-server's `reasoning_content` and DeepSeek's API separate them."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.reasoning import ReasoningStream, has_thinking, prompt_opens_thinking, split_reasoning


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        ("<think>\n17*23: 340 + 51.\n</think>\n\n391.", False, ("\n17*23: 340 + 51.\n", "391.")),
        ("  \n<think>a</think>b", False, ("a", "b")),  # whitespace before <think> belongs to neither
        ("No thinking here.", False, ("", "No thinking here.")),
        ("  plain answer with <think> later", False, ("", "  plain answer with <think> later")),
        ("<think>ran out of tokens while thi", False, ("ran out of tokens while thi", "")),
        ("already inside</think> answer", True, ("already inside", "answer")),
        ("<think></think>", False, ("", "")),
        ("<think>a</think>b</think>c", False, ("a", "b</think>c")),  # only the first close counts
    ],
)
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, opened) == expected


def stream(text: str, cuts: list[int], opened: bool = False) -> tuple[str, str]:
    s = ReasoningStream(opened)
    pieces, start = [], 0
    for cut in sorted(set(c % (len(text) + 1) for c in cuts)) + [len(text)]:
        pieces.append(s.add(text[start:cut]))
        start = max(start, cut)
    pieces.append(s.flush())
    return "".join(r for r, _ in pieces), "".join(a for _, a in pieces)


def test_tags_cut_anywhere_are_still_tags():
    text = "<think>x</think> y"
    for cut in range(len(text) + 1):
        assert stream(text, [cut]) == ("x", "y")
    assert stream(text, list(range(len(text)))) == ("x", "y")  # one character at a time


def test_reasoning_streams_before_the_answer_is_complete():
    s = ReasoningStream()
    assert s.add("<think>first ") == ("first ", "")
    assert s.add("thoughts</th") == ("thoughts", "")  # "</th" held back
    assert s.add("ink>\n\nThe answer") == ("", "The answer")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "th", "ink>", " ", "\n", "a", "é", "🦙"]), max_size=12),
    st.lists(st.integers(0, 200), max_size=6),
    st.booleans(),
)
def test_streaming_equals_the_whole_split_however_it_is_cut(parts, cuts, opened):
    text = "".join(parts)
    assert stream(text, cuts, opened) == split_reasoning(text, opened)


def test_a_prompt_that_ends_inside_think():
    assert prompt_opens_thinking("<|im_start|>assistant<|im_sep|><think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant<|im_sep|>")
    assert not prompt_opens_thinking("<think>old</think><|im_start|>assistant<|im_sep|>")
    assert not prompt_opens_thinking("<|user|>what does <think> mean?<|end|><|assistant|>")  # only the end counts
    assert prompt_opens_thinking("<｜Assistant｜><think>\n")


@pytest.mark.parametrize(
    "text, opened, expected",
    [("<think></think>answer", False, True), ("\n <think>unclosed", False, True), ("answer <think>", False, False),
     ("", False, False), ("", True, True), ("answer", True, True)],
)
def test_has_thinking_tells_an_empty_section_from_none(text, opened, expected):
    assert has_thinking(text, opened) == expected
    s = ReasoningStream(opened)
    s.add(text)
    s.flush()
    assert s.thought == expected


def test_the_stream_says_whether_it_is_still_thinking():
    s = ReasoningStream()
    s.add("<think>still")
    assert s.thought and s.thinking
    s.add("</think> done")
    assert s.thought and not s.thinking
