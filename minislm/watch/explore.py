"""`python -m minislm explore`: a live page on this machine, served by the runtime.

Type a prompt and the page shows its forward pass (the views of `explain`: tokens,
attention per layer and head, the logit lens with its measures, the next-token
distribution, the step table, PhiMoE's routing); press "next token" and the sampler's
stages, the chosen id and one decode step follow, with the KV cache as it fills and
attention's arithmetic for any query and head; "speculative step" guesses a few ids
by prompt lookup and shows which of them the model accepted. session.py holds the state and does
the work; this file is the HTTP side, kept small and strict:

- it listens on 127.0.0.1 unless told otherwise, on a free port it prints;
- the model (and, for Phi-3-vision, the images) are the ones named at start: no
  request names a file (the only files it serves are the page and the few source
  files its links point into, by fixed name);
- requests that come through a name other than this machine's (a DNS-rebinding page
  in another tab) are refused;
- bodies, text, steps, layers, heads and positions are bounded and checked, and every
  refusal is a 4xx with a JSON body, `serve`'s error shape (minislm/openai_api.py).

One page, one exploration: requests take turns on one worker thread.
"""

import sys
import time
import traceback
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np

from ..commands import load_model, set_threads
from ..errors import MinislmError
from ..openai_api import ApiError
from ..runtime import sampling_settings
from ..serve import is_loopback, json_bytes, parse_json
from . import session
from ..sampling import Sampler
from ..speculative import DEFAULT_NUM_DRAFT, judge
from .arithmetic import arithmetic, source_link, source_page
from .explain import HERE, attention_data, image_data, model_data, render
from .inputs import check_reads_images, encode_prompt, pieces, prompt_images
from .steps import step_rows

PAGE = HERE / "explore.html"
MAX_BODY_BYTES = 64 * 1024  # a prompt of MAX_TEXT_CHARS and the settings, with room to spare
MAX_TEXT_CHARS = 4000
REQUEST_TIMEOUT_S = 30
JSON, HTML = "application/json", "text/html; charset=utf-8"


class ExploreServer(ThreadingHTTPServer):
    """The listening socket, the one exploration the page drives, and the one thread
    that touches the model.

    Connections get a thread each (a browser opens several), but every request's work
    runs on `worker`, one at a time, in the order they came: Numba's thread pool and
    the `--threads` setting belong to the thread that runs the kernels, so one thread
    keeps them (a pool per connection thread would be made again for every request,
    and two would spin against each other on a small machine).
    """

    daemon_threads = True

    def __init__(self, model, host: str = "127.0.0.1", port: int = 0, log=None, threads: int | None = None,
                 pictures=(), num_crops: int | None = None):
        self.model = model
        self.pictures, self.num_crops = list(pictures), num_crops  # Phi-3-vision: --image, fixed at start
        self.worker = ThreadPoolExecutor(1, "explore-model", initializer=set_threads, initargs=(threads,))
        self.run = None  # session.Exploration, once a prompt has been typed
        self.page = render(PAGE).encode()
        self.write_log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        super().__init__((host, port), ExploreHandler)
        self.host = host

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def allowed_hosts(self) -> set[str]:
        port = self.server_address[1]
        return {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", self.host)}

    def server_close(self):
        super().server_close()
        self.worker.shutdown(wait=False, cancel_futures=True)


class ExploreHandler(BaseHTTPRequestHandler):
    server: ExploreServer
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self):
        self.answer("GET")

    def do_POST(self):
        self.answer("POST")

    def answer(self, method: str) -> None:
        start = time.perf_counter()
        path = urlsplit(self.path).path
        status = 500
        try:
            self.check_host()
            body = self.read_json() if method == "POST" else None
            status, data, kind = self.server.worker.submit(route, self.server, method, path, body).result()
            self.send_bytes(status, data, kind)
        except ApiError as e:
            status = e.status
            self.send_json(e.status, e.body())
        except MinislmError as e:  # a setting or a prompt the model refuses: one line, as the CLI says it
            status = 400
            self.send_json(400, ApiError(400, str(e)).body())
        except (BrokenPipeError, ConnectionResetError):
            status = 499
        except Exception:  # a bug of ours: the log gets the traceback, the page a message
            self.server.write_log(traceback.format_exc().rstrip())
            self.send_json(500, ApiError(500, "internal error (see the explorer's log)", kind="server_error").body())
        self.server.write_log(f"{method} {path} {status} {1000 * (time.perf_counter() - start):.0f} ms")

    def check_host(self) -> None:
        if is_loopback(self.server.host) and self.headers.get("Host", "") not in self.server.allowed_hosts():
            raise ApiError(421, "this explorer answers only requests addressed to this machine (127.0.0.1 or localhost)")

    def read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "send the body with a Content-Length header")
        length = self.headers.get("Content-Length", "")
        if not (length.isascii() and length.isdigit()):
            raise ApiError(411 if not length else 400, f"a POST needs a Content-Length, got {length[:40]!r}")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {length} bytes; the explorer accepts at most {MAX_BODY_BYTES}")
        try:
            data = self.rfile.read(int(length))
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {REQUEST_TIMEOUT_S} s") from None
        body = parse_json(data)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def send_json(self, status: int, payload: dict) -> None:
        self.send_bytes(status, json_bytes(payload), JSON)

    def send_bytes(self, status: int, data: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        """Silenced: `answer` logs one line per request."""


# ---------------------------------------------------------------- the endpoints, on the worker thread


def route(server: ExploreServer, method: str, path: str, body) -> tuple[int, bytes, str]:
    """(status, the answer's bytes, its Content-Type) of one request."""
    if method == "GET" and path == "/":
        return 200, server.page, HTML
    if method == "GET" and path.startswith("/source/"):
        page = source_page(path[len("/source/") :])
        if page is None:
            raise ApiError(404, "no such source file here", code="not_found")
        return 200, page.encode(), HTML
    routes = {("GET", "/api/model"): describe, ("POST", "/api/prompt"): new_prompt,
              ("POST", "/api/step"): next_tokens, ("POST", "/api/speculate"): speculative_step,
              ("POST", "/api/sampling"): resample,
              ("POST", "/api/attention"): attention_of_layer, ("POST", "/api/arithmetic"): arithmetic_of}
    handler = routes.get((method, path))
    if handler is None:
        if any(p == path for _, p in routes):
            raise ApiError(405, f"{method} is not allowed on {path}")
        raise ApiError(404, f"no endpoint {path[:100]}; the page is at /", code="not_found")
    return 200, json_bytes(handler(server, body or {})), JSON



def describe(server: ExploreServer, body: dict) -> dict:
    """The model, the policy's default settings (the sliders' first positions), the bounds."""
    model = server.model
    defaults = sampling_settings(model)
    return model_data(model) | {
        "defaults": {"temperature": defaults.temperature, "top_k": defaults.top_k or 0, "top_p": defaults.top_p,
                     "min_p": defaults.min_p, "repetition_penalty": defaults.repetition_penalty, "seed": 0},
        "chat_template": bool(model.tokenizer.chat_template),
        "sampler_source": source_link(Sampler.processed),
        "speculative_source": source_link(judge),
        "limits": {"tokens": min(session.MAX_EXPLORE_TOKENS, model.config.max_position_embeddings),
                   "steps": session.MAX_STEPS, "text": MAX_TEXT_CHARS, "draft": session.MAX_DRAFT},
        "num_draft": DEFAULT_NUM_DRAFT,
    }


def new_prompt(server: ExploreServer, body: dict) -> dict:
    text = field(body, "text", str)
    if not text or len(text) > MAX_TEXT_CHARS:
        raise ApiError(400, f"text: give 1 to {MAX_TEXT_CHARS} characters, got {len(text)}", param="text")
    chat = field(body, "chat", bool, False)
    model = server.model
    if chat and not model.tokenizer.chat_template:
        raise ApiError(400, "chat: this model has no chat template", param="chat")
    settings, seed = settings_of(model, body)
    layer = layer_of(model, body)
    if server.pictures:  # Phi-3-vision: the images given at start, with every prompt
        prompt = model.image_prompt(text, server.pictures, server.num_crops, chat=chat)
        server.run = session.start(model, prompt.ids, settings, seed, image_features=prompt.features)
        server.run.images = image_data(prompt.ids, prompt.images)
    else:
        ids = encode_prompt(model.tokenizer, Namespace(prompt=text, chat=chat, system=None, no_bos=False), model.path)
        server.run = session.start(model, ids, settings, seed)
    return state(server.run, layer)


def next_tokens(server: ExploreServer, body: dict) -> dict:
    run = current(server)
    n = field(body, "n", int, 1)
    if not 1 <= n <= session.MAX_STEPS:
        raise ApiError(400, f"n: 1 to {session.MAX_STEPS} tokens a request, got {n}", param="n")
    session.retune(run, *settings_of(server.model, body))
    for _ in range(n):
        session.step(run)
        if run.ended:
            break
    return state(run, layer_of(server.model, body))


def speculative_step(server: ExploreServer, body: dict) -> dict:
    """One speculative round with prompt lookup: `num_draft` guesses verified in one forward."""
    run = current(server)
    k = field(body, "num_draft", int, DEFAULT_NUM_DRAFT)
    if not 1 <= k <= session.MAX_DRAFT:
        raise ApiError(400, f"num_draft: 1 to {session.MAX_DRAFT} guesses a step, got {k}", param="num_draft")
    session.retune(run, *settings_of(server.model, body))
    session.speculative_step(run, k)
    return state(run, layer_of(server.model, body))


def resample(server: ExploreServer, body: dict) -> dict:
    """The sampling panel for new slider positions: no forward, no draw."""
    run = current(server)
    session.retune(run, *settings_of(server.model, body))
    return {"sampling": None if run.ended else session.sampling_view(run)}


def attention_of_layer(server: ExploreServer, body: dict) -> dict:
    """Another layer: its attention maps and the last forward's steps in it."""
    run = current(server)
    layer = layer_of(server.model, body)
    return {"attention": layer_attention(run, layer), "steps": step_rows(session.step_table(run, layer))}


def arithmetic_of(server: ExploreServer, body: dict) -> dict:
    run = current(server)
    config = server.model.config
    layer = layer_of(server.model, body)
    head = field(body, "head", int, 0)
    query = field(body, "query", int, run.cache.length - 1)
    if not 0 <= head < config.num_attention_heads:
        raise ApiError(400, f"head: 0 to {config.num_attention_heads - 1}, got {head}", param="head")
    if not 0 <= query < run.cache.length:
        raise ApiError(400, f"query: a position 0 to {run.cache.length - 1}, got {query}", param="query")
    return arithmetic(run, layer, head, query)


# ---------------------------------------------------------------- checking what the page sends


def field(body: dict, name: str, kind: type, default=None):
    """body[name] of JSON type `kind` (a bool is not an int here), or `default` if absent."""
    if name not in body or body[name] is None:
        if default is None:
            raise ApiError(400, f"{name}: missing", param=name)
        return default
    value = body[name]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ApiError(400, f"{name}: expected {kind.__name__}, got {type(value).__name__}", param=name)
    return value


def layer_of(model, body: dict) -> int:
    layer = field(body, "layer", int, 0)
    if not 0 <= layer < model.config.num_hidden_layers:
        raise ApiError(400, f"layer: 0 to {model.config.num_hidden_layers - 1}, got {layer}", param="layer")
    return layer


def settings_of(model, body: dict):
    """The sliders, checked by the sampler's own rules (sampling.SETTING_RANGES)."""
    values = body.get("settings", {})
    if not isinstance(values, dict):
        raise ApiError(400, "settings: expected an object", param="settings")
    unknown = set(values) - {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"}
    if unknown:
        raise ApiError(400, f"settings: unknown {sorted(unknown)[0]!r}", param="settings")
    return session.settings_from(model, values)


def current(server: ExploreServer):
    if server.run is None:
        raise ApiError(409, "type a prompt first (POST /api/prompt)")
    return server.run


# ---------------------------------------------------------------- what the page receives


def layer_attention(run, layer: int) -> dict:
    S = run.cache.length
    return attention_data([session.attention_rows(run, layer, np.arange(S))], [layer])


def state(run, layer: int) -> dict:
    """Everything the page redraws after a prompt or a step."""
    model, S = run.model, run.cache.length
    tokenizer = model.tokenizer
    last = run.steps[-1] if run.steps else None
    return {
        "tokens": [{"id": int(i), "piece": p, "generated": n >= run.prompt_length}
                   for n, (i, p) in enumerate(zip(run.ids, pieces(tokenizer, run.ids)))],
        "prompt_length": run.prompt_length,
        "positions": S,
        "attention": layer_attention(run, layer),
        "lens": session.lens_view(run),
        "next": [[{"id": i, "piece": piece, "p": round(p, 5)} for i, piece, p in run.next[t]] for t in range(S)],
        "steps": step_rows(session.step_table(run, layer)),
        "forward_ms": round(run.forward_ms, 1),
        "routing": None if model.config.model_type != "phimoe" else {
            "experts": run.experts[:, :S].tolist(), "weights": np.round(run.expert_weights[:, :S], 4).tolist(),
            "num_experts": model.config.num_local_experts},
        "kv": session.kv_view(run),
        "sampling": None if run.ended else session.sampling_view(run),
        "last_pick": None if last is None else session.sampling_view(run, last.stages, last.token),
        "history": [{"index": s.index, "token": s.token, "piece": tokenizer.token_piece(s.token),
                     "forward_ms": round(s.forward_ms, 1), "reprefilled": s.reprefilled} for s in run.steps],
        "speculative": session.speculative_view(run),
        "ended": run.ended,
        "images": run.images or None,
    }


# ---------------------------------------------------------------- the command


def run_explore(args) -> int:
    pictures = prompt_images(args)
    model = load_model(args)
    check_reads_images(model, pictures)
    if pictures and model.config.phi4mm is not None:
        raise MinislmError("--image: the explorer takes Phi-3-vision's images; for Phi-4-multimodal's pictures and "
                           "sound use `minislm explain --image/--audio` or `minislm trace --image/--audio`")
    try:
        server = ExploreServer(model, args.host, args.port, threads=args.threads, pictures=pictures,
                               num_crops=args.num_crops)
    except OSError as e:
        raise MinislmError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror})") from None
    if not is_loopback(args.host):
        print(f"minislm: warning: listening on {args.host}: anyone who can reach this port can drive the model",
              file=sys.stderr)
    print(f"minislm explore: {model.path.name if model.path else 'model'} at {server.url} ; open it in a browser, "
          "Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
