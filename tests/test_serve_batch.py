"""`minislm serve` decoding several requests together, through real HTTP clients.

Each server runs in this process with the shipped model (float32 weights, where a plain
matmul would break batch invariance) and, for the packed kernels, the same model in int4.
`model.decode_step` is watched to see how many sequences each step carried, so a test
knows the requests really shared steps. Servers that are compared are fresh ones, so no
answer depends on what an earlier request left in a slot's cache.
"""

import threading
from contextlib import contextmanager

import pytest

import minislm
from minislm.cli import main as minislm_main
from minislm.load import BUNDLED_MODEL
from served import client, raw, running

SAMPLED = dict(temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module", params=[None, "int4"], ids=["float32", "int4"])
def model(request):
    return minislm.load(BUNDLED_MODEL, quant=request.param)


@contextmanager
def watched(model, **settings):
    """A server whose steps are counted: `server.batch_sizes` lists the rows of every
    decode step, and nothing runs until `server.go` is set (so requests sent at once
    are all waiting when the first step comes)."""
    with running(model, **settings) as server:
        sizes, go = [], threading.Event()
        scheduler = server.served.scheduler
        step, decode_step = scheduler.step, model.decode_step

        def counted_step():
            go.wait()
            step()

        def counted_decode(ids, caches):
            sizes.append(len(ids))
            return decode_step(ids, caches)

        scheduler.step, model.decode_step = counted_step, counted_decode
        server.batch_sizes, server.go = sizes, go
        try:
            yield server
        finally:
            go.set()
            del model.decode_step


def prompts(n: int) -> list[list[int]]:
    """Token-id prompts of different lengths whose first ids differ: no two share a
    cached prefix."""
    return [[10 + k] + [(37 * k + 11 * j) % 200 + 3 for j in range(3 + 9 * k)] for k in range(n)]


def ask_all(server, requests: list[dict]) -> list:
    """Send the requests at once, each from its own client thread, then let the
    scheduler start: the answers (streamed ones as their joined text)."""
    answers, failures = [None] * len(requests), []

    def ask(i):
        try:
            body = dict(model="x", **requests[i])
            if body.get("stream"):
                answers[i] = "".join(c.choices[0].text for c in client(server).completions.create(**body))
            else:
                answers[i] = [c.text for c in client(server).completions.create(**body).choices]
        except Exception as e:  # recorded, so the assertion says what went wrong
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    while len(server.served.scheduler.waiting) < len(requests) and not failures:
        threading.Event().wait(0.01)
    server.go.set()
    for t in threads:
        t.join(timeout=300)
    assert failures == []
    return answers


def test_concurrent_requests_decode_together_and_each_gets_its_answer_alone(model):
    """4 streamed and 2 non-streamed requests, greedy and seeded, prompts of 4 to 49
    tokens, with --max-batch 4: at most 4 share a step, 4 did, and every answer equals
    what the same request gets from a server serving it alone."""
    requests = [dict(prompt=p, max_tokens=40 + 7 * k, stream=k % 3 != 2, **(dict(seed=k, **SAMPLED) if k % 2 else {}))
                for k, p in enumerate(prompts(6))]
    with watched(model, max_batch=4, prefill_chunk=16) as server:
        together = ask_all(server, requests)
        assert max(server.batch_sizes) == 4
    for request, answer in zip(requests, together):
        with watched(model) as server:
            assert ask_all(server, [request]) == [answer]
            assert max(server.batch_sizes) == 1


def test_max_batch_1_serves_one_request_at_a_time(model):
    with watched(model, max_batch=1) as server:
        answers = ask_all(server, [dict(prompt=p, max_tokens=10) for p in prompts(3)])
        assert set(server.batch_sizes) == {1} and all(answers)


def test_n_samples_are_the_requests_with_seed_plus_i(model):
    prompt = prompts(2)[1]
    with watched(model) as server:
        server.go.set()
        answer = client(server).completions.create(model="x", prompt=prompt, n=3, seed=7, max_tokens=12, **SAMPLED)
        assert max(server.batch_sizes) == 3  # the three samples decode together
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.completion_tokens == 3 * 12
    for i, choice in enumerate(answer.choices):
        with watched(model) as server:
            server.go.set()
            single = client(server).completions.create(model="x", prompt=prompt, seed=7 + i, max_tokens=12, **SAMPLED)
            assert choice.text == single.choices[0].text


def test_streamed_n_samples_interleave_by_index_and_equal_the_whole_answer(model):
    messages = [{"role": "user", "content": "Speak, Juliet."}]
    common = dict(model="x", messages=messages, n=2, seed=3, max_tokens=16, **SAMPLED)
    with watched(model) as server:
        server.go.set()
        whole = client(server).chat.completions.create(**common)
    with watched(model) as server:
        server.go.set()
        chunks = list(client(server).chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                             **common))
    texts, reasons, roles = ["", ""], [None, None], []
    for c in chunks[:-1]:
        choice = c.choices[0]
        roles += [choice.index] if choice.delta.role else []
        texts[choice.index] += choice.delta.content or ""
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert roles == [0, 1]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("flag", ["--max-batch", "--prefill-chunk"])
def test_serve_flags_below_1_are_refused(flag, capsys):
    assert minislm_main(["serve", flag, "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err


def test_slots_that_could_not_all_fill_are_refused_at_start(capsys):
    assert minislm_main(["serve", "--max-batch", "100000", "--ctx-size", "4096", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch" in err and "--ctx-size" in err and "GiB" in err and "Traceback" not in err


def test_a_request_whose_n_exceeds_max_batch_is_400(model):
    with running(model, max_batch=2) as server:
        status, _, reply = raw(server, "POST", "/v1/completions", {"prompt": "A", "n": 3})
    assert status == 400 and reply["error"]["param"] == "n" and "--max-batch" in reply["error"]["message"]


def test_logprobs_and_response_format_per_choice_as_single_requests_give_them(model):
    """n = 2 with logprobs and a JSON schema: each choice carries its own logprobs and
    its own valid document, equal to the single request with seed + i; streamed
    chunks carry the same logprobs as the whole answer."""
    import json

    schema = {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}
    common = dict(model="x", messages=[{"role": "user", "content": "One word?"}], seed=4, max_tokens=30,
                  logprobs=True, top_logprobs=2,
                  response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}, **SAMPLED)
    with watched(model) as server:
        server.go.set()
        both = client(server).chat.completions.create(n=2, **common)
    with watched(model) as server:  # a fresh one: nothing reused from the cache, as in the first
        server.go.set()
        streamed = list(client(server).chat.completions.create(n=2, stream=True, **common))
    for i, choice in enumerate(both.choices):
        if choice.finish_reason == "stop":
            assert json.loads(choice.message.content)["word"] is not None
        assert len(choice.logprobs.content) > 0
        with watched(model) as server:
            server.go.set()
            single = client(server).chat.completions.create(**{**common, "seed": 4 + i}).choices[0]
        assert choice.message.content == single.message.content
        assert [t.logprob for t in choice.logprobs.content] == [t.logprob for t in single.logprobs.content]
        from_stream = [t for c in streamed if c.choices and c.choices[0].index == i and c.choices[0].logprobs
                       for t in c.choices[0].logprobs.content]
        assert [(t.token, t.logprob) for t in from_stream] == [(t.token, t.logprob) for t in choice.logprobs.content]


def test_a_prediction_speculates_alone_and_answers_as_plain_decoding(model):
    prompt = prompts(3)[2]
    with watched(model) as server:
        server.go.set()
        plain = client(server).completions.create(model="x", prompt=prompt, max_tokens=20)
    with watched(model) as server:
        server.go.set()
        guessed = client(server).completions.create(model="x", prompt=prompt, max_tokens=20,
                                                    extra_body={"prediction": {"type": "content",
                                                                               "content": plain.choices[0].text}})
        assert server.batch_sizes == []  # the speculative loop, not the batched step
    assert guessed.choices[0].text == plain.choices[0].text
    details = guessed.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
