"""The server's `reasoning_content`: a reasoning model's chat reply comes back as its
thinking and its answer, as llama-server (`--reasoning-format deepseek`, its default
behaviour) and DeepSeek's API return them; streamed, `delta.reasoning_content` chunks
come before `delta.content` chunks. Driven with the official `openai` client.

The model is tests/steered_model.py's: a real Phi-3 checkpoint and tokenizer with
Phi-4-mini-reasoning's chat template, whose reply is known in advance (greedy, and
sampled too: the intended token leads every other by 16 logits). Its closing tag
arrives cut over two tokens ("\\n</th" + "ink>"), as BPE cuts it.
"""

import pytest

import minislm
from minislm.cli import main as minislm_main
from served import client, raw, running
from steered_model import PLAIN_REPLY, THINKING_REPLY, write_steered_model

ASK = [{"role": "user", "content": "What is 2 + 2?"}]
RAW = "".join(THINKING_REPLY[:-1])
REASONING = "\nThe user asks for 2 + 2. Two plus two is four.\n"
ANSWER = "2 + 2 = 4."
SAMPLED = dict(temperature=1.0, seed=5)


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    model = minislm.load(write_steered_model(tmp_path_factory.mktemp("thinking"), THINKING_REPLY))
    with running(model) as server:
        yield server


def chat(server, **options):
    return client(server).chat.completions.create(model="x", messages=ASK, **options)


def streamed(server, n=1, **options):
    """Per choice: the joined reasoning_content deltas, the joined content deltas, the
    order the two kinds came in ("r", "c"), the finish reason; and all chunks."""
    chunks = list(chat(server, stream=True, n=n, **options))
    parts = [{"reasoning": "", "content": "", "order": [], "finish": None} for _ in range(n)]
    for c in chunks:
        choice = c.choices[0]
        part, delta = parts[choice.index], choice.delta
        reasoning = (delta.model_extra or {}).get("reasoning_content")
        if reasoning:
            part["reasoning"] += reasoning
            part["order"].append("r")
        if delta.content:
            part["content"] += delta.content
            part["order"].append("c")
        part["finish"] = choice.finish_reason or part["finish"]
    return parts, chunks


def reasoning_of(message):
    return (message.model_extra or {}).get("reasoning_content")


def test_the_thinking_comes_back_apart_from_the_answer(thinking):
    choice = chat(thinking).choices[0]
    assert choice.message.content == ANSWER
    assert choice.message.reasoning_content == REASONING  # the openai client reads the field as it is
    assert choice.finish_reason == "stop"


def test_streamed_reasoning_then_content_join_to_the_whole_answer(thinking):
    whole = chat(thinking).choices[0]
    [part], chunks = streamed(thinking)
    assert part["reasoning"] == reasoning_of(whole.message) and part["content"] == whole.message.content
    assert part["order"] == sorted(part["order"], reverse=True)  # every "r" before every "c"
    assert part["order"].count("r") >= 2 and "c" in part["order"]  # the thinking streamed as it came
    assert part["finish"] == "stop"
    assert not any("</" in (reasoning_of(c.choices[0].delta) or "") for c in chunks)  # the cut tag never leaks


def test_the_raw_text_is_the_reasoning_in_its_tags_then_the_answer(thinking):
    """reasoning_format "none" (per request, as llama-server takes it) and /v1/completions
    on the same rendered prompt both give the text the model wrote."""
    split = chat(thinking).choices[0].message
    unsplit = chat(thinking, extra_body={"reasoning_format": "none"}).choices[0].message
    assert reasoning_of(unsplit) is None and unsplit.content == RAW
    assert RAW == f"<think>{reasoning_of(split)}</think>\n\n{split.content}"
    prompt = thinking.served.model.tokenizer.render_chat(ASK)  # what the chat request's prompt was
    completion = client(thinking).completions.create(model="x", prompt=prompt, max_tokens=20)
    assert completion.choices[0].text == RAW  # /v1/completions stays raw


def test_a_reply_that_never_closes_think_is_all_reasoning(thinking):
    choice = chat(thinking, max_tokens=3).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "" and reasoning_of(choice.message) == "".join(THINKING_REPLY[1:3])
    [part], _ = streamed(thinking, max_tokens=3)
    assert part == {"reasoning": "".join(THINKING_REPLY[1:3]), "content": "", "order": ["r", "r"], "finish": "length"}


def test_each_choice_is_split_on_its_own(thinking):
    """n = 2, sampled: both choices think and answer; streamed, their chunks interleave
    by index and each joins to its own split."""
    whole = chat(thinking, n=2, **SAMPLED)
    assert [(reasoning_of(c.message), c.message.content) for c in whole.choices] == [(REASONING, ANSWER)] * 2
    parts, _ = streamed(thinking, n=2, **SAMPLED)
    assert [(p["reasoning"], p["content"]) for p in parts] == [(REASONING, ANSWER)] * 2


def test_streamed_logprobs_cover_every_token_once(thinking):
    """Text held back while a tag may be forming carries its tokens' logprobs into the
    next chunk: no token is lost or repeated."""
    whole = chat(thinking, logprobs=True)
    _, chunks = streamed(thinking, logprobs=True)
    tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in whole.choices[0].logprobs.content]
    assert len(tokens) == whole.usage.completion_tokens == len(THINKING_REPLY)


def test_a_reply_without_thinking_has_no_reasoning_content(tmp_path):
    model = minislm.load(write_steered_model(tmp_path / "plain", PLAIN_REPLY))
    with running(model) as server:
        status, _, body = raw(server, "POST", "/v1/chat/completions", {"messages": ASK})
        [part], chunks = streamed(server)
    plain = "".join(PLAIN_REPLY[:-1])
    assert status == 200 and body["choices"][0]["message"] == {"role": "assistant", "content": plain}
    assert part["content"] == "".join(PLAIN_REPLY[:-1]) and part["order"] == ["c"] * (len(PLAIN_REPLY) - 1)
    assert not any("reasoning_content" in (c.choices[0].delta.model_extra or {}) for c in chunks if c.choices)


def test_a_template_that_opens_think_splits_the_reply_it_began(tmp_path):
    """The template ends the prompt with <think>: the model writes no <think> of its own,
    and its reply still comes back split."""
    model = minislm.load(write_steered_model(tmp_path / "opened", THINKING_REPLY[1:], opened=True))
    with running(model) as server:
        message = chat(server).choices[0].message
        [part], _ = streamed(server)
        unsplit = chat(server, extra_body={"reasoning_format": "none"}).choices[0].message
    assert (reasoning_of(message), message.content) == (REASONING, ANSWER)
    assert (part["reasoning"], part["content"]) == (REASONING, ANSWER)
    assert unsplit.content == RAW.removeprefix("<think>")


def test_serve_reasoning_format_none_keeps_the_raw_text(tmp_path):
    model = minislm.load(write_steered_model(tmp_path / "thinking", THINKING_REPLY))
    with running(model, reasoning_format="none") as server:
        message = chat(server).choices[0].message
        [part], _ = streamed(server)
        asked = chat(server, extra_body={"reasoning_format": "deepseek"}).choices[0].message  # a request may still ask
    assert reasoning_of(message) is None and message.content == RAW
    assert part["content"] == RAW and part["reasoning"] == ""
    assert (reasoning_of(asked), asked.content) == (REASONING, ANSWER)


def test_an_unknown_reasoning_format_is_400(thinking):
    status, _, body = raw(thinking, "POST", "/v1/chat/completions", {"messages": ASK, "reasoning_format": "yes"})
    assert status == 400 and body["error"]["param"] == "reasoning_format"


def test_serve_flag_takes_deepseek_or_none(capsys):
    assert minislm_main(["serve", "--reasoning-format", "legacy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reasoning-format" in err and "deepseek" in err
