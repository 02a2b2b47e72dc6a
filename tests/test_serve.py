"""`minislm serve`, driven the way its users drive it: the official `openai` package as
the client, raw HTTP for what a well-behaved client never sends, and a crowd of
clients at once. The server runs the shipped Shakespeare model on a free loopback port.
"""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import openai  # the test extra installs it; the server itself does not need it
import pytest

import minislm
from minislm.cli import main as minislm_main
from minislm.load import BUNDLED_MODEL
from minislm.serve import ServeSettings
from served import CHAT, client, raw, running, wait_for_log

# Sampled requests: the shipped model's generation_config.json asks for greedy decoding,
# so these set a temperature of their own.
SAMPLED = dict(temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def model():
    return minislm.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def server(model):
    with running(model) as server:
        yield server


# ---------------------------------------------------------------- the openai client


def test_models_lists_the_one_loaded_model(server):
    assert [m.id for m in client(server).models.list()] == ["shakespeare"]


def test_chat_completion(server, model):
    response = client(server).chat.completions.create(model="shakespeare", messages=CHAT, max_tokens=20)
    choice = response.choices[0]
    assert response.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    prompt_ids = model.tokenizer.encode_chat(CHAT)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= response.usage.completion_tokens <= 20
    assert response.usage.total_tokens == len(prompt_ids) + response.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer(server):
    """Greedy (the model's default): the deltas of a stream join to the non-streamed text."""
    c = client(server)
    whole = c.chat.completions.create(model="shakespeare", messages=CHAT, max_completion_tokens=30)
    chunks = list(c.chat.completions.create(model="shakespeare", messages=CHAT, max_completion_tokens=30,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_streamed_and_not(server):
    c = client(server)
    whole = c.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=24)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 24
    assert whole.choices[0].finish_reason == "length"
    pieces = list(c.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=24, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"


def test_same_seed_same_text(server):
    c = client(server)

    def ask(seed):
        return c.completions.create(model="x", prompt="JULIET:", max_tokens=30, seed=seed, **SAMPLED).choices[0].text

    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_stop_string_ends_the_text_before_it(server):
    c = client(server)
    full = c.completions.create(model="x", prompt="ROMEO:", max_tokens=40).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    assert stop.strip(), full
    cut = c.completions.create(model="x", prompt="ROMEO:", max_tokens=40, stop=[stop, "@@@"]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_extra_sampling_fields_and_ignored_client_fields_are_accepted(server):
    """What the openai package and the libraries on it send: n=1, user, logprobs=false,
    penalties of 0; and the vLLM-style extras top_k / min_p / repetition_penalty."""
    response = client(server).chat.completions.create(
        model="gpt-4o", messages=CHAT, max_tokens=8, n=1, user="someone", logprobs=False, presence_penalty=0,
        frequency_penalty=0, seed=1, temperature=0.7, extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert response.model == "shakespeare" and response.choices[0].message.content


def test_server_greedy_text_equals_minislm_generate(server, capsys):
    """The same prompt and settings through `minislm generate` and through the server."""
    for args, call in [
        (["--no-chat-template", "ROMEO:"], lambda c: c.completions.create(model="x", prompt="ROMEO:", max_tokens=50)
         .choices[0].text),
        (["Speak, Juliet."], lambda c: c.chat.completions.create(model="x", messages=CHAT, max_tokens=50)
         .choices[0].message.content),
    ]:
        assert minislm_main(["generate", "-n", "50", *args]) == 0
        printed = capsys.readouterr().out
        assert printed.endswith("\n") and len(printed) > 20
        assert call(client(server)) == printed[:-1]


def test_chat_follow_up_reuses_the_cached_conversation(server, model):
    c = client(server)
    first = c.chat.completions.create(model="x", messages=CHAT, max_tokens=16)
    follow_up = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And then?"}]
    response = c.chat.completions.with_raw_response.create(model="x", messages=follow_up, max_tokens=16)
    reused = int(response.headers["x-minislm-reused-tokens"])
    assert reused >= len(model.tokenizer.encode_chat(CHAT))  # at least the whole first prompt
    assert response.parse().usage.prompt_tokens_details.cached_tokens == reused
    assert wait_for_log(server, rf"POST /v1/chat/completions 200 \| prompt \d+ tokens \({reused} reused\)")


def test_one_log_line_per_request(server):
    before = len(server.lines)
    client(server).completions.create(model="x", prompt="KING:", max_tokens=5)
    deadline = time.monotonic() + 30  # the line is written just after the answer
    while len(server.lines) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(server.lines) == before + 1
    line = server.lines[-1]
    assert line.startswith("POST /v1/completions 200 | ") and re.search(r"prompt \d+ tokens .* generated 5 tokens, [\d.]+ tok/s \| stop: length", line), line


def test_api_key_is_required_when_set(model):
    with running(model, api_key="sekret") as server:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        status, _, body = raw(server, "GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert client(server, api_key="sekret").completions.create(model="x", prompt="A", max_tokens=2).choices


# ---------------------------------------------------------------- raw HTTP: what clients get wrong


@pytest.mark.parametrize("body, param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": CHAT, "max_tokens": "8"}, "max_tokens"),
    ({"messages": CHAT, "max_tokens": True}, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT, "temperature": "hot"}, "temperature"),
    ({"messages": CHAT, "temperature": -1}, "temperature"),
    ({"messages": CHAT, "top_p": 0}, "top_p"),
    ({"messages": CHAT, "seed": 1.5}, "seed"),
    ({"messages": CHAT, "stream": "yes"}, "stream"),
    ({"messages": CHAT, "stop": 5}, "stop"),
    ({"messages": CHAT, "n": 0}, "n"),
    ({"messages": CHAT, "n": 5}, "n"),  # more than --max-batch (4): the samples decode together
    ({"messages": CHAT, "n": "2"}, "n"),
    ({"messages": CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": CHAT, "model": 3}, "model"),
])
def test_wrong_field_types_are_400_naming_the_field(server, body, param):
    status, _, reply = raw(server, "POST", "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("data, message", [
    (b'{"messages": [', "invalid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"prompt": "a", "temperature": NaN}', "NaN"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[" * 100_000, "invalid JSON"),
    (b"", "invalid JSON"),
])
def test_malformed_bodies_are_400(server, data, message):
    status, _, reply = raw(server, "POST", "/v1/completions", data, {"Content-Type": "application/json"})
    assert status == 400 and message in reply["error"]["message"]


def test_oversized_body_is_413(server):
    too_big = json.dumps({"prompt": "x" * ServeSettings().max_body_bytes}).encode()
    status, _, reply = raw(server, "POST", "/v1/completions", too_big)
    assert status == 413 and reply["error"]["code"] == "request_too_large"


def test_too_many_tokens_are_400_context_length_exceeded(server, model):
    context = model.config.max_position_embeddings
    status, _, reply = raw(server, "POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": context})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, _, reply = raw(server, "POST", "/v1/completions", {"prompt": "the " * context, "max_tokens": 1})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    status, _, reply = raw(server, "POST", "/v1/completions", {"prompt": [1, 10**9]})
    assert status == 400 and "token ids" in reply["error"]["message"]


def test_unknown_paths_methods_and_broken_http_are_json_errors(server):
    assert raw(server, "GET", "/v2/nothing")[0] == 404
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"GET /v1/models HTTP/1.1 extra words\r\n\r\n")
        reply = b""
        while data := s.recv(65536):  # until the server closes the connection
            reply += data
        reply = reply.decode()
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "error" in json.loads(body)


def test_keep_alive_serves_requests_on_one_connection(server):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    for body in [{"prompt": "A", "max_tokens": 2}, {"prompt": 5}, {"prompt": "B", "max_tokens": 2}]:
        connection.request("POST", "/v1/completions", body=json.dumps(body))
        response = connection.getresponse()
        assert response.status == (400 if body["prompt"] == 5 else 200)
        json.loads(response.read())
    connection.close()


def test_disconnect_mid_stream_stops_generation_and_frees_the_model(server, model):
    room = model.config.max_position_embeddings - 20
    request = json.dumps({"prompt": "ROMEO:", "max_tokens": room, "stream": True}).encode()
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(request), request))
        received = b""
        while b"data: " not in received:
            received += s.recv(4096)
    line = wait_for_log(server, r"stop: client disconnected")[-1]
    generated = int(re.search(r"generated (\d+) tokens", line).group(1))
    assert generated < room, line
    start = time.monotonic()
    assert client(server).completions.create(model="x", prompt="A", max_tokens=2).choices
    assert time.monotonic() - start < 30  # the slot was freed, not held until `room` tokens


# ---------------------------------------------------------------- many clients at once


def test_concurrent_clients_get_exactly_what_each_request_gets_alone(server):
    """8 clients x 5 requests, all at once, retries off: every answer arrives, and each is
    the text the same request gets alone (any interleaving or shared state would change
    the sampled text: every request has its own prompt and seed)."""
    clients, per_client = 8, 5
    speakers = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "KING", "QUEEN", "FOOL", "PORTIA"]

    def ask(c, k, i):
        kind = (k + i) % 3  # chat, completions, streamed completions
        prompt = f"{speakers[k]}:"
        common = dict(model="x", max_tokens=8, seed=100 * k + i, **SAMPLED)
        if kind == 0:
            return c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common) \
                .choices[0].message.content
        if kind == 1:
            return c.completions.create(prompt=prompt, **common).choices[0].text
        return "".join(p.choices[0].text for p in c.completions.create(prompt=prompt, stream=True, **common))

    alone = {(k, i): ask(client(server), k, i) for k in range(clients) for i in range(per_client)}
    together, failures = {}, []
    start = threading.Barrier(clients)

    def run_client(k):
        c = client(server)
        start.wait()
        for i in range(per_client):
            try:
                together[(k, i)] = ask(c, k, i)
            except Exception as e:  # recorded, so the assertion says what went wrong
                failures.append((k, i, repr(e)))

    threads = [threading.Thread(target=run_client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert failures == []
    assert len(together) == clients * per_client
    assert together == alone


# ---------------------------------------------------------------- the command


def test_serve_command_starts_and_answers(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "minislm", "serve", "--port", "0", "--api-key", "k"],
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        banner = process.stderr.readline()
        url = re.search(r"at (http://\S+/v1)", banner).group(1)
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list()] == ["shakespeare"]
        assert c.chat.completions.create(model="shakespeare", messages=CHAT, max_tokens=4).choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()
