"""`minislm serve` against what stalls or breaks a server: texts far too long for the
context, input that once gave a 500, slow and half-closing clients, too many
connections; and the compatibility details clients rely on. Real sockets and the
official `openai` client, deterministic assertions (the speeds are in
tools/bench_serve.py)."""

import http.client
import json
import re
import socket
import threading
import time

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minislm
from minislm.load import BUNDLED_MODEL
from served import CHAT, client, connect, final_response, post_bytes, raw, read_all, running, wait_for_log


@pytest.fixture(scope="module")
def model():
    return minislm.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def server(model):
    with running(model) as server:
        yield server


def status_of(server, method, path, data: bytes, headers=None) -> tuple[int, bytes]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    connection.request(method, path, body=data, headers=headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, payload


# ---------------------------------------------------------------- a text too long for the context


class NoTokenizing:
    """A tokenizer backend that fails the test if anything tokenizes with it, and counts
    nothing else: every other attribute is the real backend's."""

    def __init__(self, backend):
        self.backend = backend
        self.calls = []

    def encode(self, *args, **kwargs):
        self.calls.append("encode")
        raise AssertionError("the text was tokenized")

    def encode_batch(self, *args, **kwargs):
        self.calls.append("encode_batch")
        return self.backend.encode_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_a_text_longer_than_the_context_can_hold_is_refused_without_tokenizing(server, model, monkeypatch):
    """No token stands for more than L bytes (the longest piece), so L bytes per
    position of the context are more than it can hold, whatever the text."""
    spy = NoTokenizing(model.tokenizer.backend)
    longest, _ = model.tokenizer.piece_bound
    monkeypatch.setattr(model.tokenizer, "backend", spy)
    too_long = "x" * (longest * server.served.capacity)
    c = client(server)
    with pytest.raises(openai.BadRequestError) as completion:
        c.completions.create(model="x", prompt=too_long, max_tokens=1)
    with pytest.raises(openai.BadRequestError) as chat:
        c.chat.completions.create(model="x", messages=[{"role": "user", "content": too_long}], max_tokens=1)
    for error in (completion, chat):
        assert error.value.code == "context_length_exceeded" and "at least" in error.value.message
    assert spy.calls == []
    assert c.completions.create(model="x", prompt="x" * 100, max_tokens=1).choices  # a text that fits is tokenized
    assert spy.calls == ["encode_batch"]


# ---------------------------------------------------------------- no input gets a 500


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"prompt": "ROMEO\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": ["\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}',
     "messages[0].content"),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}], "max_tokens": 2}',
     "messages[0].content"),
])
def test_a_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    status, _, reply = raw(server, "POST", path, body, {"Content-Type": "application/json"})
    assert status == 400 and reply["error"]["param"] == param and "surrogate" in reply["error"]["message"]


@pytest.mark.parametrize("ids", [[2**63], [1, 2**64 + 5], [2**200], [-1, 5], [1, -2**63 - 1]])
def test_token_ids_outside_the_vocabulary_are_400_however_large(server, ids):
    status, _, reply = raw(server, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 1})
    assert status == 400 and reply["error"]["param"] == "prompt" and "token ids" in reply["error"]["message"]


@pytest.mark.parametrize("length", ["²", "1²", "¹0", "+5", "-1", "0x10", "5 5"])
def test_a_content_length_that_is_not_ascii_digits_is_400(server, length):
    """Header bytes are read as Latin-1, where byte 0xB2 is "²": a digit to str.isdigit()."""
    with connect(server) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode("latin-1"))
        status, body = final_response(read_all(s))
    assert status == 400 and "Content-Length" in json.loads(body)["error"]["message"]


def test_two_different_content_lengths_are_400(server):
    with connect(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
        status, _ = final_response(read_all(s))
    assert status == 400


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["messages", "prompt", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
          "stream", "stream_options", "n", "logprobs", "top_logprobs", "model", "response_format", "prediction",
          "tools", "user", "logit_bias"]
PROMPTS = st.one_of(
    st.text(max_size=40), st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=6), JSON,
)
MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 5]),
                                    "content": st.one_of(st.text(max_size=40), JSON)}), max_size=3),
    JSON,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(chat=st.booleans(), prompt=PROMPTS, messages=MESSAGES, extra=st.dictionaries(st.sampled_from(FIELDS), JSON),
       max_tokens=st.one_of(st.integers(-3, 3), JSON.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))))
def test_no_request_body_gets_a_500(server, chat, prompt, messages, extra, max_tokens):
    """Arbitrary values in every field the server reads (and some it ignores): each
    request is answered with a 2xx or a 4xx, and the log holds no traceback."""
    body = {"messages": messages} if chat else {"prompt": prompt}
    body.update(extra)
    body["max_tokens"] = max_tokens  # at most 3 tokens, or not a valid count: every example stays quick
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, _ = status_of(server, "POST", path, json.dumps(body).encode())
    assert status < 500, body
    assert not any("Traceback" in line for line in server.lines)


# ---------------------------------------------------------------- the sampler's edge, through the server


def test_a_temperature_that_underflows_answers_as_greedy(server):
    """1e-310 divides the logits into infinities; the sampler reads that as the coldest
    possible temperature: the greedy text, not NaN probabilities and a padding id."""
    c = client(server)
    cold = c.completions.create(model="x", prompt="ROMEO:", max_tokens=20, temperature=1e-310, seed=3)
    greedy = c.completions.create(model="x", prompt="ROMEO:", max_tokens=20, temperature=0)
    assert cold.choices[0].text and cold.choices[0].text == greedy.choices[0].text
    assert cold.usage.completion_tokens == 20


# ---------------------------------------------------------------- slow, silent and half-closing clients


def test_a_request_that_trickles_in_is_cut_off_at_its_deadline(model):
    """One header byte every 0.2 s keeps a per-read timeout from ever firing; the deadline
    counts from the request's first byte, so the server answers 408 and closes."""
    with running(model, request_deadline_s=1.0) as server, connect(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        stop = threading.Event()

        def trickle():
            for byte in b"X-Slow: " + b"a" * 200:
                if stop.wait(0.2):
                    return
                try:
                    s.send(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            status, body = final_response(read_all(s))
        finally:
            stop.set()
            sender.join()
    assert status == 408 and "took more than 1 s" in json.loads(body)["error"]["message"]


def test_a_body_that_trickles_in_is_cut_off_at_its_deadline(model):
    with running(model, request_deadline_s=1.0) as server, connect(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        for _ in range(60):  # up to 12 s of one byte per 0.2 s, far past the deadline
            time.sleep(0.2)
            try:
                s.send(b" ")
            except OSError:
                break
        status, body = final_response(read_all(s))
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"


def test_connections_past_the_cap_get_503(model):
    with running(model, max_connections=2) as server:
        idle = [connect(server), connect(server)]  # accepted in this order, before the next one
        try:
            with connect(server) as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                status, body = final_response(read_all(s))
            assert status == 503 and json.loads(body)["error"]["code"] == "server_busy"
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30  # once those two are gone, a new connection is served
        while server.open_connections > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert raw(server, "GET", "/v1/models")[0] == 200


def test_the_api_key_is_checked_before_the_body_is_read(model):
    """The headers announce a 100 kB body that never comes: a wrong key is answered at
    once, without waiting for (or reading) the body."""
    with running(model, api_key="sekret") as server, connect(server, timeout=20) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                  b"Content-Length: 100000\r\n\r\n")
        status, body = final_response(read_all(s))
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("header", ["bearer sekret", "BEARER sekret", "Bearer  sekret"])
def test_the_bearer_scheme_is_case_insensitive(model, header):
    with running(model, api_key="sekret") as server:
        assert raw(server, "GET", "/v1/models", headers={"Authorization": header})[0] == 200
        assert raw(server, "GET", "/v1/models", headers={"Authorization": "Basic sekret"})[0] == 401


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_half_closes_after_its_request_gets_the_answer(server, stream):
    """`shutdown(SHUT_WR)` once the request is out, as some clients and `nc -N` do: the
    client still reads, so the whole answer comes (after an interim 100 Continue)."""
    with connect(server) as s:
        s.sendall(post_bytes("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 12, "stream": stream}))
        s.shutdown(socket.SHUT_WR)
        status, body = final_response(read_all(s))
    assert status == 200
    if stream:
        assert body.rstrip().endswith(b"0") and b"data: [DONE]" in body
    else:
        reply = json.loads(body)
        assert reply["usage"]["completion_tokens"] == 12 and reply["choices"][0]["text"]


def test_a_client_that_closes_before_its_answer_stops_generation(server, model):
    """Not streamed: nothing is written until the end, so the server's probe (a 100
    Continue) is what meets the reset of a closed socket."""
    room = model.config.max_position_embeddings - 20
    with connect(server) as s:
        s.sendall(post_bytes("/v1/completions", {"prompt": "JULIET:", "max_tokens": room}))
    line = wait_for_log(server, r"POST /v1/completions 499 .*stop: client disconnected")[-1]
    generated = int(re.search(r"generated (\d+) token", line).group(1))
    assert generated < room, line


# ---------------------------------------------------------------- what clients expect


def test_retrieve_the_model_by_its_id(server):
    c = client(server)
    assert c.models.retrieve("shakespeare").id == "shakespeare"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")


def test_the_root_points_to_v1(server):
    status, payload = status_of(server, "GET", "/", None)
    assert status == 200 and b"\n" not in payload.strip() and json.loads(payload)["api"] == "/v1"


def test_seed_minus_one_means_random_as_in_the_cli(server):
    c = client(server)
    reply = c.completions.create(model="x", prompt="ROMEO:", max_tokens=4, seed=-1, temperature=1.0)
    assert reply.usage.completion_tokens == 4
    status, _, body = raw(server, "POST", "/v1/completions", {"prompt": "A", "seed": -2})
    assert status == 400 and body["error"]["param"] == "seed"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_the_context_error_names_the_max_tokens_field_the_client_sent(server, model, name):
    body = {"messages": CHAT, name: model.config.max_position_embeddings}
    status, _, reply = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == name and reply["error"]["code"] == "context_length_exceeded"


def test_the_log_says_1_token_and_no_rate_for_it(server):
    client(server).completions.create(model="x", prompt="KING:", max_tokens=1)
    line = wait_for_log(server, r"POST /v1/completions 200 .*generated 1 token")[-1]
    assert "1 tokens" not in line and "tok/s" not in line.split("generated 1 token")[1], line
