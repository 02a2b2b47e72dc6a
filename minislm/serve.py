"""`python -m minislm serve`: one model behind an OpenAI-compatible HTTP API.

    client threads (one per connection)                      the scheduler (one thread)
    read body -> check JSON -> tokenize -> submit  ---->  waiting -> a slot -> batched steps
                  write JSON / SSE  <-  text  <-  tokens  <----  one token per sequence per step

The HTTP layer is the standard library's `ThreadingHTTPServer`: a thread per
connection, so a slow client never blocks the others while they read, check and
tokenize their requests; HTTP/1.1 keep-alive for the `openai` package's connection
pool; and streamed answers written as server-sent events in chunked transfer
encoding, each event one write. That is all an OpenAI-compatible server with one
model needs (docs/serve.md says more), so no web framework.

Threads share one interpreter, so "never blocks the others" also needs the heavy
work of a request to let go of Python's GIL: the tokenizer does (`Tokenizer.encode`),
the chat template renders in a child process, and a text too long for the context
is refused from its length alone (`Tokenizer.fewest_tokens`), before it is tokenized.
What a connection may hold is bounded too: a deadline for each request to arrive,
an idle timeout between requests, and a cap on open connections.

The model is driven by one thread, the scheduler (minislm/batch.py): up to
--max-batch requests decode together, one forward per step over the next token of
each, and a new request's prompt is prefilled a chunk per step between them; more
requests wait their turn in the order they arrived. Each request's handler thread
turns its tokens into text (stop strings included) and writes them out, and tells
the scheduler to stop when its client has gone. A slot's KV cache outlives its
request: the next one keeps the longest prefix it shares with what is cached, so a
chat follow-up whose messages extend the previous ones feeds only the new turn
through the model, as `minislm chat` does (the `X-Minislm-Reused-Tokens` header and
`usage.prompt_tokens_details.cached_tokens` say how many tokens were reused).

A reasoning model's chat reply is split into its thinking and its answer on the way
out (`reasoning_content` and `content`, minislm/reasoning.py), each choice on its own;
the tokens and the cache are the same either way.

Pictures and sounds (`image_url` data URLs, `input_audio`; Phi-4-multimodal and
Phi-3-vision) are decoded and checked in the handler's thread (minislm/serve_media.py),
encoded on the scheduler's, and decode alone under the adapter they choose; a slot's
cache is reused only by a request under the adapter it was computed with.
"""

import hmac
import io
import json
import queue
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

from . import openai_api as api
from .commands import load_draft_model, load_model, model_argument
from .errors import MinislmError
from .batch import PREFILL_CHUNK, Admitted, Busy, Failed, Finished, Request, Scheduler, Token
from .generate import GenerationStats, TextStream
from .load import BUNDLED_MODEL
from .logprobs import Logprobs, token_bytes, token_text
from .runtime import json_grammar, make_drafter, sampling_settings
from .serve_media import media_prompt
from .openai_api import ApiError, ApiRequest, TokenInfo
from .reasoning import ReasoningStream, has_thinking, prompt_opens_thinking, split_reasoning
from .tokenizer import StreamingDetokenizer

# A request body larger than this is refused (413). 8 MiB holds a 128k-token prompt
# as JSON several times over; the limit exists so one request cannot exhaust memory.
MAX_BODY_BYTES = 8 * 2**20
# How much of an oversized body is still read (and discarded) so the client receives
# the 413 instead of a reset connection; past this the connection is simply closed.
MAX_DISCARD_BYTES = 64 * 2**20
# Requests allowed to wait for the model; more get a 503 (the server is not a queue
# of unbounded length).
MAX_WAITING = 64
# Sequences that decode together (KV cache slots). Each slot holds --ctx-size positions,
# allocated as they are used.
MAX_BATCH = 4
# Open connections, each a thread; past this a new one gets a 503 and is closed (and past
# twice this it is closed unanswered). The openai package keeps a few per client.
MAX_CONNECTIONS = 128
# A client that sends nothing, or reads nothing, for this long is disconnected. It also
# bounds how long an idle keep-alive connection holds its thread.
IDLE_TIMEOUT_S = 60
# From the first byte of a request to the last byte of its body, however steadily the
# bytes trickle in: a client sending one byte every few seconds is cut off here (408).
REQUEST_DEADLINE_S = 60
# Before closing a connection whose client may still be sending (a body refused unread:
# 401, 413, 503), read and drop its bytes for this long, so it reads our answer instead of
# a reset connection.
LINGER_S = 2
LINGER_BYTES = 2**20
# How long to wait, when a waiting request's turn comes, to tell a client that only
# half-closed its connection from one that left (see Handler.client_gone).
PROBE_WAIT_S = 0.2
# How often a request that waits (for its turn, or for its next token) looks at its
# connection, to stop generating for a client that has left.
CHECK_CLIENT_S = 0.1
# The one thing HTTP lets a server send before the final status of its answer: an interim
# response, which every HTTP/1.1 client must read past.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
STOP_DISCONNECTED = "client disconnected"


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the server's `url` says which)
    api_key: str | None = None  # if set, every request needs "Authorization: Bearer <key>"
    model_id: str = "minislm"  # the name /v1/models lists and responses carry
    ctx_size: int = 4096  # KV cache positions: prompt + completion must fit
    max_batch: int = MAX_BATCH  # sequences decoding together; more requests wait
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens fed per step while others decode
    max_body_bytes: int = MAX_BODY_BYTES
    max_waiting: int = MAX_WAITING
    max_connections: int = MAX_CONNECTIONS
    idle_timeout_s: float = IDLE_TIMEOUT_S
    request_deadline_s: float = REQUEST_DEADLINE_S
    speculate: str | None = None  # "lookup": speculative decoding with prompt lookup for every request
    draft_model: object = None  # a loaded Model: speculative decoding with it for every request
    num_draft: int = 4
    reasoning_format: str = "deepseek"  # one of REASONING_FORMATS: chat replies' <think> section apart, or not


# ---------------------------------------------------------------- the model side


@dataclass
class Job:
    """A checked, tokenized request; once submitted, `batch` is its place in the
    scheduler. Per choice (n of them): the text's end and the tokens behind the text."""

    request: ApiRequest
    ids: list[int]
    batch: Request
    reused: int = 0  # prompt tokens served from the cache
    reasons: list[str] = field(default_factory=list)  # why each choice ended ("" while it runs)
    generated: list[int] = field(default_factory=list)  # tokens behind each choice's text
    speculative: bool = False  # decoded with a drafter: the usage reports its guesses
    split_reasoning: bool = False  # a chat reply's <think> section goes to reasoning_content
    opened: bool = False  # the chat template ended the prompt with <think>: replies start inside it

    def __post_init__(self):
        self.reasons = [""] * self.batch.n
        self.generated = [0] * self.batch.n

    @property
    def finished(self) -> bool:
        return all(self.reasons)

    @property
    def disconnected(self) -> bool:
        return STOP_DISCONNECTED in self.reasons

    def disconnect(self) -> None:
        """The client left: every choice still running ends here, and generation stops."""
        self.reasons = [r or STOP_DISCONNECTED for r in self.reasons]
        self.batch.cancel()

    @property
    def stats(self) -> GenerationStats:
        """For the log: the first choice's timings, every choice's tokens."""
        first = self.batch.choices[0].stats if self.batch.choices else GenerationStats()
        return GenerationStats(len(self.ids) - self.reused, first.prefill_seconds, sum(self.generated),
                               first.decode_seconds, " / ".join(dict.fromkeys(r for r in self.reasons if r)),
                               first.drafted_tokens, first.accepted_tokens)


def grammars(model, schema, first):
    """Makes each choice's own automaton for a request's schema (its state is per
    sequence): `first`, compiled while checking the request, then fresh ones."""
    made = [first]
    return lambda: made.pop() if made else json_grammar(model, schema)


class ServedModel:
    """The loaded model behind its scheduler, and the checks a request passes first."""

    def __init__(self, model, settings: ServeSettings):
        self.model = model
        self.settings = settings
        self.capacity = min(settings.ctx_size, model.config.max_position_embeddings)
        self.scheduler = Scheduler(model, self.capacity, settings.max_batch, settings.max_waiting,
                                   settings.prefill_chunk)
        model.tokenizer.piece_bound  # read tokenizer.json's pipeline now, not during the first request

    def start(self) -> None:
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.stop()

    def prepare(self, request: ApiRequest) -> Job:
        """Tokenize and check a request against the context; needs no slot (only the
        tokenizer, which is safe to share between threads, and for pictures and sounds
        Pillow, libsndfile and NumPy; their encoders run later, on the scheduler's thread)."""
        media = self.media_prompt(request) if request.has_media else None
        ids, opened = (media.ids, False) if media is not None else self.prompt_ids(request)
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens)", param="prompt")
        if len(ids) >= self.capacity:
            raise self.too_long(f"the prompt is {len(ids)} tokens", request)
        room = self.capacity - len(ids)
        if request.max_tokens is not None and request.max_tokens > room:
            raise ApiError(400, f"the context is {self.capacity} tokens, but {len(ids) + request.max_tokens} were "
                           f"requested ({len(ids)} in the prompt, {request.max_tokens} for the completion)",
                           param=request.max_tokens_field, code="context_length_exceeded")
        if request.n > self.scheduler.max_batch:
            raise ApiError(400, f"n = {request.n}: this server decodes at most {self.scheduler.max_batch} sequences "
                           "together (--max-batch), and the n samples of a request decode together", param="n")
        try:
            settings = sampling_settings(self.model, **request.sampling())
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        max_new_tokens = request.max_tokens if request.max_tokens is not None else room
        grammar = top_logprobs = None
        if request.json_schema is not None:
            try:  # compiled now, so that a schema llguidance refuses is this request's 400
                grammar = grammars(self.model, request.json_schema, json_grammar(self.model, request.json_schema))
            except MinislmError as e:
                raise ApiError(400, f"response_format: {e}", param="response_format") from None
        if request.logprobs:
            top_logprobs = request.top_logprobs
        prediction = self.encode(request.prediction, request, add_bos=False) if request.prediction else []
        drafter = self.drafter(prediction, media is not None)
        if drafter is not None and request.n > 1:
            raise ApiError(400, f"n = {request.n}: speculative decoding (--speculate, --draft-model or a prediction) "
                           "follows one sequence; ask for n = 1", param="n")
        if media is not None and request.n > 1:
            raise ApiError(400, f"n = {request.n}: a request with pictures or sound decodes alone, one sequence; "
                           "ask for n = 1", param="n")
        batch = Request(ids, max_new_tokens, settings, request.seed, request.n, grammar=grammar,
                        top_logprobs=top_logprobs, drafter=drafter, num_draft=self.settings.num_draft,
                        encode=None if media is None else media.encode,
                        adapter=None if media is None else media.adapter)
        reasoning_format = request.reasoning_format or self.settings.reasoning_format
        return Job(request, ids, batch, speculative=drafter is not None,
                   split_reasoning=request.chat and reasoning_format != "none", opened=opened)

    def drafter(self, prediction: list[int], media: bool = False):
        """What makes a request's guesser from its sampler: speculative decoding as `serve
        --speculate lookup / --draft-model` asks, or prompt lookup in the request's
        `prediction` when it has one; None (plain decoding, batched) otherwise. A draft
        model cannot see pictures or hear sounds: a request with media skips it."""
        speculate = self.settings.speculate
        draft_model = None if media else self.settings.draft_model
        if speculate is None and draft_model is None:
            if not prediction:
                return None
            speculate = "lookup"
        return lambda sampler: make_drafter(self.model, sampler, self.capacity, speculate, draft_model,
                                            extra=prediction)

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job.batch)
        except Busy as e:
            raise ApiError(503, f"server busy: {e}; retry later", kind="server_error", code="server_busy") from None

    def media_prompt(self, request: ApiRequest):
        """A chat whose messages hold pictures or sounds: ids with placeholders, their
        vectors, and the adapter they choose (minislm/serve_media.py)."""
        def fits(n_tokens: int) -> None:
            if n_tokens >= self.capacity:
                raise self.too_long(f"the prompt is {n_tokens} tokens with its pictures and sounds", request)

        return media_prompt(self.model, request.messages, fits)

    def prompt_ids(self, request: ApiRequest) -> tuple[list[int], bool]:
        """Chat: the model's chat template (rendered in the tokenizer's sandbox), as
        `minislm generate`/`chat` do. Completions: the text as is (BOS per the
        tokenizer config), as `minislm generate --no-chat-template` does; or ids.
        With the ids: whether a chat template ended the prompt with <think>."""
        tokenizer = self.model.tokenizer
        try:
            if request.chat:
                if not tokenizer.chat_template:
                    raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
                text = tokenizer.render_chat(list(request.messages))
                return self.encode(text, request, add_bos=False), prompt_opens_thinking(text)
            if isinstance(request.prompt, str):
                add_bos = tokenizer.add_bos and tokenizer.bos_id is not None
                return self.encode(request.prompt, request, add_bos=add_bos), False
            return self.checked_ids(request), False
        except MinislmError as e:
            raise ApiError(400, str(e), param="messages" if request.chat else "prompt") from None

    def encode(self, text: str, request: ApiRequest, add_bos: bool) -> list[int]:
        """The ids of a text, unless its length alone shows it cannot fit the context:
        then it is refused without being tokenized."""
        fewest = self.model.tokenizer.fewest_tokens(text) + add_bos
        if fewest >= self.capacity:
            raise self.too_long(f"the prompt is {len(text)} characters, at least {fewest} tokens", request)
        return self.model.tokenizer.encode(text, add_bos=add_bos)

    def checked_ids(self, request: ApiRequest) -> list[int]:
        """A prompt of token ids, each one the model has an embedding for. Checked here,
        one by one, because JSON numbers have no size limit (2**63 fits no int64)."""
        ids, vocab = request.prompt, self.model.config.vocab_size
        if len(ids) >= self.capacity:
            raise self.too_long(f"the prompt is {len(ids)} tokens", request)
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token ids must lie in [0, {vocab}), got {str(ids[bad])[:40]} at index {bad}",
                           param="prompt")
        return list(ids)

    def too_long(self, what: str, request: ApiRequest) -> ApiError:
        return ApiError(400, f"{what}; this server's context is {self.capacity} (--ctx-size, at most the model's "
                        "max_position_embeddings), so nothing can be generated",
                        param="messages" if request.chat else "prompt", code="context_length_exceeded")


class LogprobReader:
    """A job's recorded logprobs as the API shows them (minislm/openai_api.py's TokenInfo),
    each token once, in order: all at the end of a plain answer, or those read since
    the previous chunk of a streamed one. The scheduler records an entry before it hands
    the token over, so the first `upto` entries exist when `upto` tokens have arrived."""

    def __init__(self, tokenizer, logprobs: Logprobs | None):
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.text_length = 0  # characters of the reply before the next token (text_offset)
        self.sent = 0

    def take(self, upto: int) -> list[TokenInfo] | None:
        """The entries of tokens sent..upto-1 (those whose text has been read)."""
        if self.logprobs is None:
            return None
        tokenizer, out = self.tokenizer, []
        for entry in self.logprobs.entries[self.sent : upto]:
            top = tuple((token_text(tokenizer, t), token_bytes(tokenizer, t), lp) for t, lp in entry.top)
            out.append(TokenInfo(token_text(tokenizer, entry.token), token_bytes(tokenizer, entry.token), entry.logprob,
                                 top, self.text_length))
            self.text_length += len(self.detokenizer.add(entry.token))
        self.sent += len(out)
        return out


# ---------------------------------------------------------------- HTTP


@dataclass
class RequestLog:
    """What the one log line of a request says."""

    method: str
    path: str
    status: int = 0
    job: Job | None = None
    started: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        parts = [f"{self.method} {self.path} {self.status}"]
        if self.job is not None:
            stats = self.job.stats
            parts.append(f"prompt {len(self.job.ids)} tokens ({self.job.reused} reused)")
            if self.job.batch.features is not None:
                parts.append(f"{len(self.job.batch.features)} media vectors, adapter {self.job.batch.adapter}")
            parts.append(generated(stats) if self.job.batch.n == 1 else f"generated {stats.generated_tokens} tokens "
                         f"in {self.job.batch.n} choices")
            parts.append(f"stop: {stats.stop_reason or 'none'}")
        parts.append(f"{time.perf_counter() - self.started:.2f} s")
        return " | ".join(parts)


def generated(stats: GenerationStats) -> str:
    """'generated 40 tokens, 30.7 tok/s'. The decode rate counts the tokens after the
    first (which the prefill produced), so one token has none."""
    n = stats.generated_tokens
    if n == 1:
        return "generated 1 token (no decode rate for one token)"
    return f"generated {n} tokens, {stats.decode_tokens_per_second:.1f} tok/s"


class RequestTimeout(Exception):
    """A request's line, headers and body did not all arrive within the deadline."""


class RequestReader(io.RawIOBase):
    """A connection's incoming bytes, read under two clocks.

    Between requests a client may stay silent for `idle` seconds (keep-alive). Once a
    request's first byte has arrived, `deadline` holds: its line, headers and body must
    all be in by then. A per-read timeout alone restarts on every byte, so a client
    sending one byte every few seconds would hold the connection for ever.
    """

    def __init__(self, sock: socket.socket, idle: float):
        self.sock, self.idle = sock, idle
        self.deadline: float | None = None  # time.monotonic() value, while a request is being read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout = self.idle
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise RequestTimeout
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv_into(buffer)
        except TimeoutError:
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise RequestTimeout from None
            raise

    def request_read(self) -> None:
        """The request is in: no deadline, and the idle timeout again for the answer's writes."""
        self.deadline = None
        self.sock.settimeout(self.idle)


class Handler(BaseHTTPRequestHandler):
    """One connection: reads requests and answers them, one after another (keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "minislm"
    # Each streamed chunk is a small write that must leave at once, not wait to be
    # merged with the next one (Nagle's algorithm would hold it for an ACK).
    disable_nagle_algorithm = True
    server: "Server"

    def setup(self):
        settings = self.server.settings
        self.timeout = settings.idle_timeout_s
        super().setup()
        self.rfile.close()  # the socket's own reader; ours adds the request deadline
        self.reader = RequestReader(self.connection, settings.idle_timeout_s)
        self.rfile = io.BufferedReader(self.reader)
        self.over_cap = self.request in self.server.over_cap
        self.headers_sent = self.probed = False
        self.poller = select.poll()
        self.poller.register(self.connection, select.POLLIN)
        self.reset_poller = select.poll()  # reports only errors and hang-ups
        self.reset_poller.register(self.connection, select.POLLERR | select.POLLHUP)

    def handle_one_request(self):
        """Wait (idle) for the next request's first byte, then read the rest of it by the
        request deadline, and answer it."""
        self.reader.deadline = None
        try:
            if not self.rfile.peek(1):  # the client closed the connection between requests
                self.close_connection = True
                return
        except OSError:  # silent for the whole idle timeout, or reset
            self.close_connection = True
            return
        self.reader.deadline = time.monotonic() + self.server.settings.request_deadline_s
        try:
            super().handle_one_request()  # the request line and headers, then do_GET / do_POST
        except RequestTimeout:
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, self.timeout_message())

    def handle_expect_100(self):
        """A client that asks before sending its body (`Expect: 100-continue`, as curl does
        for large ones) hears at once that it is over the connection cap or has the wrong
        key, and sends nothing."""
        try:
            self.admit()
        except ApiError as e:
            self.headers_sent = False
            self.send_api_error(e)
            self.server.log(f"{self.command} {self.path} {e.status} | refused before its body")
            return False
        return super().handle_expect_100()

    def do_GET(self):
        self.handle_api("GET")

    def do_POST(self):
        self.handle_api("POST")

    def handle_api(self, method: str) -> None:
        path = unquote(self.path.split("?", 1)[0]).rstrip("/")
        record = RequestLog(method, path or "/")
        self.headers_sent = self.probed = False
        try:
            try:
                self.admit()  # before the body: nothing is read for a client we refuse
                body = self.read_body()
            finally:
                self.reader.request_read()
            record.status = self.route(method, path)(body, record)
        except ApiError as e:
            record.status = e.status
            self.send_api_error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            record.status = record.status or 499  # nginx's code for "the client closed the connection"
            self.close_connection = True
        except Exception:  # a bug of ours: the log gets the traceback, the client a 500
            record.status = 500
            self.server.log(traceback.format_exc().rstrip())
            self.send_api_error(ApiError(500, "internal error (see the server's log)", kind="server_error"))
        finally:
            self.server.log(record.line())

    def route(self, method: str, path: str) -> Callable[[bytes, RequestLog], int]:
        routes = {
            ("GET", ""): self.root,
            ("GET", "/v1"): self.root,
            ("GET", "/v1/models"): self.list_models,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
        }
        if path.startswith("/v1/models/"):
            routes[("GET", path)] = partial(self.retrieve_model, path[len("/v1/models/") :])
        route = routes.get((method, path))
        if route is None:
            if any(p == path for _, p in routes):
                raise ApiError(405, f"{method} is not allowed on {path}")
            raise ApiError(404, f"no endpoint {path}; this server has /v1/models, /v1/models/{{id}}, "
                           "/v1/chat/completions and /v1/completions", code="not_found")
        return route

    # ------------------------------------------------------------ endpoints

    def root(self, body: bytes, record: RequestLog) -> int:
        self.send_json(200, {"message": "minislm serve: an OpenAI-compatible API; point clients at /v1", "api": "/v1"})
        return 200

    def list_models(self, body: bytes, record: RequestLog) -> int:
        self.send_json(200, api.model_list(self.server.settings.model_id, self.server.started))
        return 200

    def retrieve_model(self, name: str, body: bytes, record: RequestLog) -> int:
        model_id = self.server.settings.model_id
        if name != model_id:
            raise ApiError(404, f"the model {name[:100]!r} does not exist; this server has {model_id!r}",
                           param="model", code="model_not_found")
        self.send_json(200, api.model_object(model_id, self.server.started))
        return 200

    def chat_completions(self, body: bytes, record: RequestLog) -> int:
        return self.complete(api.parse_chat_request(parse_json(body)), record)

    def completions(self, body: bytes, record: RequestLog) -> int:
        return self.complete(api.parse_completion_request(parse_json(body)), record)

    def complete(self, request: ApiRequest, record: RequestLog) -> int:
        served = self.server.served
        job = served.prepare(request)
        served.submit(job)
        record.job = job
        try:
            if not self.wait_for_turn(job):  # it left while waiting: nothing is generated for nobody
                self.close_connection = True
                return 499
            if request.stream:
                self.stream_answer(job)
                return 200
            texts = [""] * request.n
            for choice, text in self.pieces(job):
                texts[choice] += text or ""
            if job.disconnected:
                self.close_connection = True
                return 499
            reasons = [api.finish_reason(r) for r in job.reasons]
            tokens = [LogprobReader(served.model.tokenizer, c.logprobs).take(job.generated[c.index])
                      for c in job.batch.choices]
            reasonings = None
            if job.split_reasoning:
                reasonings, texts = split_replies(texts, job.opened)
            self.send_json(200, api.completion(request, new_id(request), int(time.time()), self.server.settings.model_id,
                                               texts, reasons, counts(job), tokens, reasonings),
                           {"X-Minislm-Reused-Tokens": str(job.reused)})
            return 200
        finally:
            job.batch.cancel()  # done, failed or gone: the scheduler generates nothing more for it

    def wait_for_turn(self, job: Job) -> bool:
        """Wait until the scheduler gives the job a slot (True), looking at the connection
        meanwhile; False if the client has left (the job is then cancelled)."""
        while True:
            try:
                event = job.batch.events.get(timeout=CHECK_CLIENT_S)
            except queue.Empty:
                if self.client_gone():
                    job.disconnect()
                    return False
                continue
            if isinstance(event, Failed):
                raise event.error
            assert isinstance(event, Admitted), event  # the scheduler's first event for a request
            job.reused = event.reused
            if self.client_gone(wait=PROBE_WAIT_S):
                job.disconnect()
                return False
            return True

    def pieces(self, job: Job) -> Iterator[tuple[int, str | None]]:
        """(choice, text) as each choice's text grows, (choice, None) when it has ended
        (`job.reasons` says why), until every choice has ended or the client has left.

        Each choice's tokens become text in its own `TextStream`, which holds back what
        could begin a stop string; at a stop string that choice ends and the scheduler
        stops generating it. Between tokens, one `poll` looks at the connection.
        """
        streams = [TextStream(self.server.served.model.tokenizer, job.request.stop) for _ in range(job.batch.n)]
        while not job.finished:
            try:
                event = job.batch.events.get(timeout=CHECK_CLIENT_S)
            except queue.Empty:
                event = None
            if isinstance(event, Failed):
                raise event.error
            if event is not None and not job.reasons[event.choice]:  # nothing after a choice's end
                i = event.choice
                if isinstance(event, Token):
                    job.generated[i] += 1
                    text, stopped = streams[i].add(event.token)
                    if text:
                        yield i, text
                    if stopped:
                        job.reasons[i] = "stop string"
                        job.batch.cancel(i)
                        yield i, None
                elif isinstance(event, Finished):
                    text = streams[i].finish()
                    if text:
                        yield i, text
                    job.reasons[i] = event.reason
                    yield i, None
            if not job.finished and self.client_gone():
                job.disconnect()

    def stream_answer(self, job: Job) -> None:
        """Server-sent events: `data: {chunk}` per piece of text, then each choice's
        finish reason, then (if asked) the usage, then `data: [DONE]`. With n > 1 the
        choices' chunks interleave, each carrying its index."""
        request, model_id = job.request, self.server.settings.model_id
        response_id, created = new_id(request), int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Minislm-Reused-Tokens", str(job.reused))
        self.end_headers()
        self.headers_sent = True
        logprobs = [LogprobReader(self.server.served.model.tokenizer, c.logprobs) for c in job.batch.choices]
        thinking = [ReasoningStream(job.opened) for _ in range(request.n)] if job.split_reasoning else None
        try:
            if request.chat:
                for i in range(request.n):
                    self.send_event(api.chunk(request, response_id, created, model_id, first=True, index=i))
            for i, text in self.pieces(job):
                if job.disconnected:
                    break
                for reasoning, answer in delta_parts(thinking[i] if thinking else None, text):
                    self.send_event(api.chunk(request, response_id, created, model_id, text=answer, reasoning=reasoning,
                                              index=i, tokens=logprobs[i].take(job.generated[i])))
                if text is None:
                    self.send_event(api.chunk(request, response_id, created, model_id, index=i,
                                              reason=api.finish_reason(job.reasons[i]),
                                              tokens=logprobs[i].take(job.generated[i])))
            if job.disconnected:
                self.close_connection = True
                return
            if request.include_usage:
                self.send_event(api.usage_chunk(request, response_id, created, model_id, counts(job)))
            self.send_event("[DONE]")
            self.write_chunk(b"")  # the end of a chunked body
        except OSError:  # the client left between two pieces: stop generating
            job.disconnect()
            self.close_connection = True

    # ------------------------------------------------------------ reading

    def admit(self) -> None:
        """Refuse, before reading any body, a connection over the cap or a wrong API key.
        The body stays unread, so the connection closes after the answer."""
        if self.over_cap:
            raise ApiError(503, f"server busy: {self.server.settings.max_connections} connections are open; "
                           "retry later", kind="server_error", code="server_busy", close=True)
        self.check_api_key()

    def read_body(self) -> bytes:
        """The request body, within the size limit. An oversized body is read and
        discarded before the 413, so the client is not cut off while still sending."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length header (chunked request bodies are not supported)",
                           close=True)
        lengths = self.headers.get_all("Content-Length") or ["0"]
        length = lengths[0].strip()
        if len(set(lengths)) > 1:
            raise ApiError(400, f"several different Content-Length headers: {', '.join(lengths)[:80]}", close=True)
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True, and int("²") fails
            raise ApiError(400, f"invalid Content-Length {length[:40]!r}", close=True)
        length = int(length)
        limit = self.server.settings.max_body_bytes
        try:
            if length > limit:
                if length <= MAX_DISCARD_BYTES:
                    self.discard(length)
                raise ApiError(413, f"the request body is {length} bytes; this server accepts at most {limit}",
                               code="request_too_large", close=True)
            body = self.rfile.read(length)
        except RequestTimeout:
            raise ApiError(408, self.timeout_message(), code="request_timeout", close=True) from None
        if len(body) < length:
            raise ApiError(400, f"the body ended after {len(body)} of {length} bytes (Content-Length)", close=True)
        return body

    def discard(self, length: int) -> None:
        while length > 0:
            data = self.rfile.read(min(length, 2**16))
            if not data:
                return
            length -= len(data)

    def timeout_message(self) -> str:
        return (f"the request took more than {self.server.settings.request_deadline_s:g} s to arrive "
                "(its line, headers and body, from its first byte)")

    def check_api_key(self) -> None:
        """`Authorization: Bearer <key>`; the scheme's case does not matter (HTTP says so)."""
        key = self.server.settings.api_key
        if key is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # header values arrive decoded as Latin-1: encoding them back gives the bytes sent
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), key.encode())):
            raise ApiError(401, "incorrect API key: send it as 'Authorization: Bearer <key>' (--api-key)",
                           code="invalid_api_key", close=True)

    def client_gone(self, wait: float = 0.0) -> bool:
        """True once the client can no longer receive the answer. Checked between tokens;
        costs one `poll` while the client is quiet.

        End of file on the socket does not tell: a client may shut down its sending side
        once the request is out (a half-close) and still read the answer. The difference
        shows only when we write: a client that closed its socket answers data with a
        reset. A streamed answer writes all the time. When end of file comes before any of
        the answer is out, the server writes one `100 Continue` (an interim response that
        HTTP/1.1 clients read past); a reset comes back within a round trip, and `wait`
        seconds are spent waiting for it.
        """
        events = self.poller.poll(0)  # [(fd, mask)] or []
        mask = events[0][1] if events else 0
        if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):  # reset, or closed both ways
            return True
        if not mask & select.POLLIN:
            return False
        try:
            if self.connection.recv(1, socket.MSG_PEEK):
                return False  # the next request, pipelined
        except OSError:
            return True
        if self.request_version != "HTTP/1.1":  # HTTP/1.0 has no interim responses to probe with
            return True
        if self.headers_sent or self.probed:  # the next write, or the reset it brings, will tell
            return False
        self.probed = True
        try:
            self.wfile.write(CONTINUE)
        except OSError:
            return True
        return bool(wait) and bool(self.reset_poller.poll(wait * 1000))

    # ------------------------------------------------------------ writing

    def send_json(self, status: int, body: dict, headers: dict | None = None, close: bool = False) -> None:
        data = json_bytes(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.headers_sent = True
        self.wfile.write(data)

    def send_api_error(self, error: ApiError) -> None:
        """As JSON while no headers are out; in a started stream as an error event, which
        the `openai` client raises as an APIError."""
        try:
            if not self.headers_sent:
                self.send_json(error.status, error.body(), close=error.close)
            else:
                self.send_event(error.body())
                self.write_chunk(b"")
                self.close_connection = True
        except OSError:
            self.close_connection = True

    def send_event(self, data) -> None:
        text = data.encode() if isinstance(data, str) else json_bytes(data)
        self.write_chunk(b"data: %s\n\n" % text)

    def write_chunk(self, data: bytes) -> None:
        """One piece of a chunked body: its length in hex, CRLF, the bytes, CRLF."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, oversized headers, an
        unknown method) in the same JSON shape as ours. A request line too broken to
        name its HTTP version would otherwise be answered as HTTP/0.9: a body with no
        status line."""
        self.headers_sent = False
        self.request_version = self.protocol_version
        message = message or HTTPStatus(code).phrase
        self.send_api_error(ApiError(code, message, close=True))
        self.server.log(f"{self.command or '-'} {self.path if hasattr(self, 'path') else '-'} {code} | {message}")

    def log_request(self, code="-", size="-"):
        """Silenced: handle_api writes one line per request, with the token counts."""

    def log_message(self, format, *args):
        self.server.log(format % args)


def json_bytes(body) -> bytes:
    """UTF-8 JSON. Should a lone surrogate get this far, it goes out escaped (\\ud800),
    which is still valid JSON, rather than failing the answer."""
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(body).encode()


def parse_json(body: bytes):
    """JSON, or a 400 naming where it broke. NaN and Infinity are not JSON; deep nesting
    (Python's parser recurses) is refused rather than crashing the handler."""

    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON in the request body: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise ApiError(400, f"invalid JSON in the request body: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON in the request body: nested too deeply") from None


def split_replies(texts: list[str], opened: bool) -> tuple[list[str | None], list[str]]:
    """Each chat reply as (its thinking, or None without a think section; its answer)."""
    reasonings, answers = [], []
    for text in texts:
        reasoning, answer = split_reasoning(text, opened) if has_thinking(text, opened) else (None, text)
        reasonings.append(reasoning)
        answers.append(answer)
    return reasonings, answers


def delta_parts(thinking: ReasoningStream | None, text: str | None) -> list[tuple[str | None, str | None]]:
    """The chunks a piece of a choice's text becomes, as (reasoning, answer) with one of
    the two set: the piece as it is without `thinking`; with it, what the piece settles of
    the thinking, then of the answer (`text` None: the choice has ended, so whatever was
    held back). A piece that may still be part of a tag becomes no chunk yet."""
    if thinking is None:
        return [(None, text)] if text is not None else []
    reasoning, answer = thinking.add(text) if text is not None else thinking.flush()
    return [part for part in ((reasoning, None), (None, answer)) if part[0] or part[1]]


def new_id(request: ApiRequest) -> str:
    return ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)


def counts(job: Job) -> dict:
    drafted = job.stats.drafted_tokens if job.speculative else None
    return api.usage(len(job.ids), sum(job.generated), job.reused, drafted, job.stats.accepted_tokens)


class Server(ThreadingHTTPServer):
    """The listening socket, a thread per connection, and what the handlers share."""

    daemon_threads = True  # Ctrl-C does not wait for idle keep-alive connections

    def __init__(self, model, settings: ServeSettings, log: Callable[[str], None] | None = None):
        if ":" in settings.host:
            self.address_family = socket.AF_INET6
        self.settings = settings
        self.served = ServedModel(model, settings)
        self.started = int(time.time())
        self.log_lock = threading.Lock()
        self.write_log = log or print_log
        self.connections_lock = threading.Lock()
        self.open_connections = 0
        self.over_cap = set()  # sockets accepted past max_connections: their handler answers 503
        super().__init__((settings.host, settings.port), Handler)
        self.served.start()  # the scheduler's thread, once the port is ours

    def server_close(self):
        super().server_close()
        self.served.close()

    def process_request(self, request, client_address):
        """A thread for the new connection, unless too many are open. Past the cap the
        thread only answers 503 (the client learns why instead of hanging); past twice
        the cap the connection is closed at once, so a flood cannot pile up threads."""
        with self.connections_lock:
            if self.open_connections >= 2 * self.settings.max_connections:
                request.close()
                return
            self.open_connections += 1
            if self.open_connections > self.settings.max_connections:
                self.over_cap.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.open_connections -= 1
                self.over_cap.discard(request)

    def shutdown_request(self, request):
        """Close a connection without losing the last answer: stop sending, then read and
        drop what the client may still be sending (a body we refused unread), for up to
        LINGER_S. Closing a socket with unread bytes resets the connection, and a reset
        can destroy the answer before the client has read it."""
        try:
            request.shutdown(socket.SHUT_WR)
            deadline, left = time.monotonic() + LINGER_S, LINGER_BYTES
            while left > 0 and time.monotonic() < deadline:
                request.settimeout(deadline - time.monotonic())
                data = request.recv(min(left, 2**16))
                if not data:
                    break
                left -= len(data)
        except (OSError, ValueError):  # reset, timed out, or a negative timeout at the deadline
            pass
        self.close_request(request)

    def log(self, line: str) -> None:
        with self.log_lock:  # whole lines, never two interleaved
            self.write_log(line)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"


def print_log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the command


def run_serve(args) -> int:
    model = load_model(args)
    settings = ServeSettings(host=args.host, port=args.port, api_key=args.api_key, model_id=model_id(args),
                             ctx_size=args.ctx_size, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                             speculate=args.speculate, draft_model=load_draft_model(args, model),
                             num_draft=args.num_draft, reasoning_format=args.reasoning_format)
    try:
        server = Server(model, settings)
    except OSError as e:
        raise MinislmError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror})") from None
    if not is_loopback(args.host) and args.api_key is None:
        print(f"minislm: warning: listening on {args.host} without --api-key: anyone who can reach this port "
              "can use the model", file=sys.stderr)
    print(f"minislm serve: {settings.model_id} at {server.url} (context {server.served.capacity} tokens, "
          f"up to {settings.max_batch} sequences decoding together); Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def model_id(args) -> str:
    """The name clients see: the --model argument, or the shipped model's folder name."""
    argument = model_argument(args)
    if Path(argument) == BUNDLED_MODEL or Path(argument).is_dir():
        return Path(argument).resolve().name
    return argument


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
