"""The OpenAI wire format, with no socket and no model in sight.

Two directions, both pure functions:

* request JSON -> `ApiRequest`: every field minislm reads is checked for its type
  and range here, so the server answers each mistake with a 400 whose message
  names the field, in OpenAI's error shape
  `{"error": {"message", "type", "param", "code"}}`;
* a finished (or streamed) generation -> the JSON objects OpenAI's clients parse:
  `chat.completion`, `chat.completion.chunk`, `text_completion`, `list` of models.

Clients send more fields than minislm implements. A field whose value asks for
nothing (`best_of: 1`, `logprobs: false`, `frequency_penalty: 0`, `user`, ...) is
accepted and ignored, so the official `openai` package and the libraries built on it
work unchanged; a value that asks for something minislm does not do (`best_of: 3`,
tools, a JSON response format) is refused by name rather than silently ignored.
Fields nobody has heard of are ignored, as most OpenAI-compatible servers do.

`n` asks for several samples of one prompt: the answer holds n choices, each with its
`index` (streamed chunks carry it too, interleaved as the choices grow).

Three extra sampling fields, as vLLM and llama.cpp's server accept them (the
`openai` client sends them with `extra_body=`): `top_k`, `min_p` and
`repetition_penalty`.

Beyond plain text: `response_format` (json_object, json_schema: the reply follows the
schema, minislm/grammar.py), `logprobs`/`top_logprobs` (chat) and `logprobs` (legacy
completions, an integer), and `prediction` (text the reply is expected to repeat: its
tokens become guesses for speculative decoding, and `usage.completion_tokens_details`
counts the accepted and rejected ones, as OpenAI's predicted outputs do). A chat
message may also hold pictures and sounds (`image_url` parts with data URLs,
`input_audio` parts): their shape is checked here, their bytes by the server
(minislm/serve_media.py), which knows whether its model reads them.

Reasoning models (Phi-4-reasoning, Phi-4-mini-reasoning) think between `<think>` and
`</think>` before they answer. A chat reply that has such a section comes back split,
as llama-server and DeepSeek's API return it: the thinking in the message's
`reasoning_content`, the answer in `content` (streamed: `delta.reasoning_content`
chunks, then `delta.content` chunks). A reply without one has no `reasoning_content`
key at all. `reasoning_format: "none"` in a request (or `serve --reasoning-format none`)
keeps the raw text in `content`; `/v1/completions` always returns the raw text.
"""

from dataclasses import dataclass

# OpenAI's own bounds where it states them; stop strings are bounded so a request
# cannot make the stop-string search arbitrarily slow.
MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 16
# Samples of one prompt (`n`); the server allows at most its --max-batch.
MAX_CHOICES = 128
# /v1/completions' default max_tokens in OpenAI's API; chat has none (until the context is full).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MESSAGE_ROLES = ("system", "developer", "user", "assistant")
# Content parts that carry a picture or a sound (OpenAI's names), beside "text".
MEDIA_PARTS = ("image_url", "input_audio")
# OpenAI's bounds: top_logprobs 0..20 in chat, logprobs 0..5 in completions.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# How a chat reply's <think> section comes back (llama-server's --reasoning-format names):
# "deepseek": in reasoning_content, apart from the answer; "none": left in content.
REASONING_FORMATS = ("deepseek", "none")

# Fields whose listed values ask for nothing beyond plain text generation. null
# (None) is always neutral. Any other value is refused: minislm does not do it.
NEUTRAL_VALUES = {
    "best_of": (1,),
    "echo": (False,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "modalities": (["text"],),
    "audio": (),
}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body.

    `close` asks the server to close the connection after answering, for errors that
    leave the request's bytes unread (an oversized or malformed body).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind
        self.close = close

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ApiRequest:
    """One checked request to /v1/chat/completions (messages) or /v1/completions (prompt).

    None in a sampling field means "the model's default" (generation_config.json, as
    `minislm generate` decides it); `max_tokens` None means "until the context is full".
    """

    chat: bool
    messages: tuple[dict, ...] | None = None  # chat: {"role", "content"}: text, or parts with media
    prompt: str | tuple[int, ...] | None = None  # completions: text, or token ids
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None  # None or -1: a random seed
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    n: int = 1  # samples of the prompt: choice i samples with seed + i
    max_tokens_field: str = "max_tokens"  # the name the client sent it under, for error messages
    logprobs: bool = False  # return each token's log-probability
    top_logprobs: int = 0  # ... and this many most likely alternatives
    json_schema: dict | None = None  # response_format: the reply must be valid under this schema
    prediction: str | None = None  # text the reply is expected to repeat (speculative guesses)
    reasoning_format: str | None = None  # chat: one of REASONING_FORMATS; None: the server's

    @property
    def has_media(self) -> bool:
        """A chat request with pictures or sound in its messages."""
        return self.chat and any(isinstance(m["content"], list) for m in self.messages)

    def sampling(self) -> dict:
        """The keyword arguments of `commands.sampling_settings`."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty)


# ---------------------------------------------------------------- requests


def parse_chat_request(body) -> ApiRequest:
    body = request_object(body)
    # max_tokens is the older name; the openai package sends either, and errors name the one sent
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = positive_max_tokens(field(body, name, int), name)
    logprobs = field(body, "logprobs", bool) or False
    top = field(body, "top_logprobs", int)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs")
    if top and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return ApiRequest(chat=True, messages=parse_messages(body.get("messages")), max_tokens=max_tokens,
                      max_tokens_field=name, logprobs=logprobs, top_logprobs=top or 0,
                      reasoning_format=parse_reasoning_format(field(body, "reasoning_format", str)),
                      **common_fields(body))


def parse_completion_request(body) -> ApiRequest:
    body = request_object(body)
    max_tokens = field(body, "max_tokens", int)
    max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else positive_max_tokens(max_tokens, "max_tokens")
    top = field(body, "logprobs", int)  # the legacy API: how many alternatives, 0..5
    if top is not None and not 0 <= top <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must be from 0 to {MAX_COMPLETION_LOGPROBS}, got {top}", param="logprobs")
    return ApiRequest(chat=False, prompt=parse_prompt(body.get("prompt")), max_tokens=max_tokens,
                      logprobs=top is not None, top_logprobs=top or 0, **common_fields(body))


def request_object(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {json_type(body)}")
    for name, neutral in NEUTRAL_VALUES.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(n) and value == n for n in neutral):
            raise ApiError(400, f"minislm does not support {name}={value!r:.60}", param=name, code="unsupported_parameter")
    field(body, "model", str)  # any name is served by the one loaded model, but it must be a string
    return body


def common_fields(body: dict) -> dict:
    """The fields chat and completions share: sampling, seed, stop strings, streaming."""
    temperature = field(body, "temperature", float)
    if temperature is not None and not 0 <= temperature <= MAX_TEMPERATURE:
        raise ApiError(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}", param="temperature")
    top_p = field(body, "top_p", float)
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = field(body, "top_k", int)
    if top_k is not None and top_k < 0:
        raise ApiError(400, f"top_k must be >= 0 (0 = off), got {top_k}", param="top_k")
    min_p = field(body, "min_p", float)
    if min_p is not None and not 0 <= min_p <= 1:
        raise ApiError(400, f"min_p must be in [0, 1], got {min_p}", param="min_p")
    penalty = field(body, "repetition_penalty", float)
    if penalty is not None and not penalty > 0:
        raise ApiError(400, f"repetition_penalty must be > 0, got {penalty}", param="repetition_penalty")
    seed = field(body, "seed", int)
    if seed is not None and not -1 <= seed < 2**64:
        raise ApiError(400, f"seed must be in [0, 2**64), or -1 for a random one, got {seed}", param="seed")
    n = field(body, "n", int)
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be in [1, {MAX_CHOICES}], got {n}", param="n")
    stream = field(body, "stream", bool) or False
    options = field(body, "stream_options", dict) or {}
    include_usage = field(options, "include_usage", bool, name="stream_options.include_usage") or False
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=penalty,
                seed=seed, stop=parse_stop(body.get("stop")), stream=stream, include_usage=include_usage and stream,
                json_schema=parse_response_format(body.get("response_format")),
                prediction=parse_prediction(body.get("prediction")), n=n or 1)


def parse_reasoning_format(value: str | None) -> str | None:
    """llama-server's per-request `reasoning_format`: "none", "deepseek", or "auto" (and
    null): the server's own setting."""
    if value is None or value == "auto":
        return None
    if value not in REASONING_FORMATS:
        raise ApiError(400, f"reasoning_format must be auto, {' or '.join(REASONING_FORMATS)}, got {value!r:.40}",
                       param="reasoning_format")
    return value


def parse_response_format(value) -> dict | None:
    """{"type": "text"} (or none): plain text. {"type": "json_object"}: any JSON object.
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}: that schema.
    Whether the schema compiles is checked later, against the model's vocabulary."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, f"response_format must be an object, got {json_type(value)}", param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = field(value, "json_schema", dict, name="response_format.json_schema")
        if spec is None:
            raise ApiError(400, "response_format.json_schema is required with type json_schema", param="response_format")
        schema = field(spec, "schema", dict, name="response_format.json_schema.schema")
        return schema if schema is not None else {"type": "object"}
    raise ApiError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r:.40}",
                   param="response_format")


def parse_prediction(value) -> str | None:
    """OpenAI's predicted output: {"type": "content", "content": text or text parts}."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "content":
        raise ApiError(400, 'prediction must be {"type": "content", "content": ...}', param="prediction")
    return unicode_text(message_text(value.get("content"), "user", "prediction.content"), "prediction.content")


def field(body: dict, key: str, kind: type, name: str | None = None):
    """body[key] if present and not null, checked to be `kind`; None otherwise.

    JSON has one number type: a float field takes 1 as well as 1.0, an int field
    takes no 1.5. true/false are not numbers here, although Python's bool is an int.
    """
    value = body.get(key)
    if value is None:
        return None
    name = name or key
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, bool, dict, list) and isinstance(value, kind):
        return value
    expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false",
                dict: "an object", list: "an array"}[kind]
    raise ApiError(400, f"{name} must be {expected}, got {json_type(value)}", param=name)


def positive_max_tokens(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise ApiError(400, f"{name} must be >= 1, got {value}", param=name)
    return value


def parse_messages(messages) -> tuple[dict, ...]:
    """Chat messages as the chat template wants them: {"role", "content": str}.

    Content may be a string or a list of text parts ({"type": "text", "text": ...}),
    joined with newlines as vLLM does. "developer" is OpenAI's newer name for
    "system" (the templates of Phi models know only "system"). A message with pictures
    or sound (`image_url`, `input_audio` parts) keeps its list of parts: only the server,
    which knows the model, can say whether it reads them (minislm/serve_media.py).
    """
    if messages is None:
        raise ApiError(400, "messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages must be a non-empty array, got {json_type(messages)}", param="messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object, got {json_type(message)}", param=where)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r:.40}",
                           param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            content = media_parts(content, f"{where}.content")
            if not has_media(content):
                content = unicode_text("\n".join(part["text"] for part in content), f"{where}.content")
        else:
            content = unicode_text(message_text(content, role, f"{where}.content"), f"{where}.content")
        parsed.append({"role": "system" if role == "developer" else role, "content": content})
    return tuple(parsed)


def has_media(content) -> bool:
    """Whether a message's content is a list of parts with a picture or a sound in it."""
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in MEDIA_PARTS for p in content)


def media_parts(content: list, where: str) -> list:
    """A list of text, image_url and input_audio parts, with each part's shape checked
    (what is inside a picture or a sound is checked when it is decoded, by the server,
    which knows whether its model reads them)."""
    media = has_media(content)
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}].text must be a string", param=f"{where}[{j}]")
            if media:  # else the joined text is checked, as one
                unicode_text(part["text"], f"{where}[{j}].text")
        elif kind not in MEDIA_PARTS or not isinstance(part.get(kind), dict):
            raise ApiError(400, f"{where}[{j}]: a part is {{\"type\": \"text\", \"text\": ...}}, "
                           '{"type": "image_url", "image_url": {"url": "data:..."}} or '
                           '{"type": "input_audio", "input_audio": {"data": ..., "format": ...}}', param=f"{where}[{j}]")
    return list(content)


def message_text(content, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":  # an assistant turn that only called tools
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                               param=f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or an array of content parts, got {json_type(content)}", param=where)


def parse_prompt(prompt) -> str | tuple[int, ...]:
    """One prompt: a string, a one-string array, or an array of token ids."""
    if prompt is None:
        raise ApiError(400, "prompt is required", param="prompt")
    if isinstance(prompt, str):
        return unicode_text(prompt, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return unicode_text(prompt[0], "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    raise ApiError(400, "prompt must be a string or an array of token ids (one prompt per request)", param="prompt")


def unicode_text(value: str, where: str) -> str:
    """`value`, if it is Unicode text. JSON's "\\ud800" escape decodes to a lone surrogate,
    half of a UTF-16 pair, which no UTF-8 encoder (nor the tokenizer) accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where} holds a lone surrogate (\\u{ord(value[e.start]):04x} at character {e.start}), "
                       "which is not text: send each character whole", param=where) from None
    return value


def parse_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
        return tuple(stop)
    raise ApiError(400, f"stop must be a string or an array of strings, got {json_type(stop)}", param="stop")


def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


# ---------------------------------------------------------------- responses


def finish_reason(stop_reason: str) -> str:
    """minislm's stop reasons in OpenAI's two words: "stop" (an end-of-sequence id or a
    stop string) or "length" (max_tokens, or the context is full)."""
    return "stop" if stop_reason in ("eos", "stop string") else "length"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, drafted: int | None = None,
          accepted: int = 0) -> dict:
    """Token counts; `cached_tokens` is OpenAI's name for the prompt prefix served from the
    cache. With speculative decoding (`drafted` not None), the guesses the model kept and
    those it rejected, under the names of OpenAI's predicted outputs."""
    counts = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if drafted is not None:
        counts["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                               "rejected_prediction_tokens": drafted - accepted}
    return counts


@dataclass(frozen=True)
class TokenInfo:
    """What logprobs show of one generated token: its text and bytes, its log-probability,
    the most likely alternatives as (text, bytes, logprob), and where its text starts."""

    text: str
    data: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...]
    offset: int


def chat_logprobs(tokens: list[TokenInfo]) -> dict:
    """A chat choice's `logprobs`: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.data),
                         "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(data)} for text, data, lp in t.top]}
                        for t in tokens], "refusal": None}


def completion_logprobs(tokens: list[TokenInfo]) -> dict:
    """A legacy completion choice's `logprobs`: parallel lists, and a dict of alternatives per token."""
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{text: lp for text, _, lp in t.top} for t in tokens],
            "text_offset": [t.offset for t in tokens]}


def choice_logprobs(request: ApiRequest, tokens: list[TokenInfo] | None) -> dict | None:
    if not request.logprobs or tokens is None:
        return None
    return chat_logprobs(tokens) if request.chat else completion_logprobs(tokens)


def completion(request: ApiRequest, response_id: str, created: int, model: str, texts: list[str],
               reasons: list[str], counts: dict, tokens: list[list[TokenInfo] | None] | None = None,
               reasonings: list[str | None] | None = None) -> dict:
    """The whole answer of a non-streamed request: one choice per text (n of them);
    `tokens[i]` for choice i's logprobs; `reasonings[i]` for a chat choice's thinking
    (None: it had no think section, and its message no reasoning_content)."""
    tokens = tokens or [None] * len(texts)
    reasonings = reasonings or [None] * len(texts)
    if request.chat:
        choices = [{"index": i, "message": assistant_message(text, reasoning),
                    "logprobs": choice_logprobs(request, toks), "finish_reason": reason}
                   for i, (text, reason, toks, reasoning) in enumerate(zip(texts, reasons, tokens, reasonings))]
        kind = "chat.completion"
    else:
        choices = [{"index": i, "text": text, "logprobs": choice_logprobs(request, toks), "finish_reason": reason}
                   for i, (text, reason, toks) in enumerate(zip(texts, reasons, tokens))]
        kind = "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": model, "choices": choices,
            "usage": counts}


def assistant_message(text: str, reasoning: str | None) -> dict:
    message = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def chunk(request: ApiRequest, response_id: str, created: int, model: str, text: str | None = None,
          reason: str | None = None, first: bool = False, index: int = 0,
          tokens: list[TokenInfo] | None = None, reasoning: str | None = None) -> dict:
    """One server-sent event of a streamed answer: new text of choice `index` (`reasoning`:
    new text of its thinking), or (with `reason`) its end. A chat stream's first chunk
    carries the assistant role, as OpenAI's does. `tokens`: the logprobs of that choice's
    tokens read since its previous chunk."""
    logprobs = choice_logprobs(request, tokens) if not first else None
    if request.chat:
        delta = {"role": "assistant", "content": ""} if first else {}
        if reasoning is not None:
            delta["reasoning_content"] = reasoning
        if text is not None and not first:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        kind = "text_completion"
    body = {"id": response_id, "object": kind, "created": created, "model": model, "choices": [choice]}
    if request.include_usage:
        body["usage"] = None  # every chunk but the last, as OpenAI sends them
    return body


def usage_chunk(request: ApiRequest, response_id: str, created: int, model: str, counts: dict) -> dict:
    """stream_options.include_usage: one more chunk, with no choices, after the last one."""
    kind = "chat.completion.chunk" if request.chat else "text_completion"
    return {"id": response_id, "object": kind, "created": created, "model": model, "choices": [], "usage": counts}


def model_object(model_id: str, created: int) -> dict:
    """One model, as GET /v1/models/{id} returns it and /v1/models lists it."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "minislm"}


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_object(model_id, created)]}
