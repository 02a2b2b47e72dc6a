"""The generation loop: prefill the prompt once, then one cached forward per token.

Two layers: `generate_tokens` yields ids (`minislm.runtime.generate_ids` checks the
arguments and calls it, for `Model.generate` and the CLI), `generate_text` turns them
into streamed text and handles stop strings (`TextStream`). Timing lives here too,
measured around the forwards only: prefill and decode separately, and decode speed
counts generated tokens only. The server runs many sequences at once with the same
rules (minislm/batch.py): when a sequence ends is `stop_reason`, for both loops.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .cache import KVCache
from .errors import MinislmError
from .finite import check_logits
from .logprobs import Logprobs
from .sampling import Sampler, Stage
from .tokenizer import StreamingDetokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0  # forwards after the first generated token (drafts included)
    stop_reason: str = ""  # "eos", "length", "context" or "stop string"
    drafted_tokens: int = 0  # speculative decoding: tokens proposed by the draft
    accepted_tokens: int = 0  # ... and kept by the target's verification

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


def check_context(prompt_len: int, cached: int, context: int, what: str = "prompt") -> None:
    if cached + prompt_len >= context:
        raise MinislmError(
            f"{what} is {cached + prompt_len} tokens; the model's context is {context} "
            "(max_position_embeddings), so nothing can be generated"
        )


def stop_reason(token: int, generated: int, max_new_tokens: int, stop_ids, cached: int, limit: int) -> str | None:
    """Why a sequence ends right after its latest token (the `generated`-th), or None.

    A stop id ends it ("eos", the id itself is kept); so does reaching max_new_tokens
    ("length"); and so does a cache of `cached` positions that cannot take the next
    token's forward within `limit` positions ("context").
    """
    if token in stop_ids:
        return "eos"
    if generated >= max_new_tokens:
        return "length"
    if cached + 1 >= limit:  # prompt + generated tokens fill the context
        return "context"
    return None


def generate_tokens(
    model,
    prompt_ids,
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids=(),
    cache: KVCache | None = None,
    history: list[int] | None = None,
    stats: GenerationStats | None = None,
    trace=None,
    image_features=None,
    grammar=None,
    logprobs: Logprobs | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids following `prompt_ids`.

    The arguments come checked (`minislm.runtime.generate_ids` is the way in). With a
    `cache`, `prompt_ids` are the tokens *after* those already cached (the chat REPL
    and the server keep one cache across turns); `history` holds every id of the
    sequence so far, for the repetition penalty. A stop id is yielded, then the loop
    ends. Generation also ends at the model's context length.

    `trace` (a `minislm.trace.Recorder`) sees every forward pass: pass n produced the
    logits that generated token n was sampled from (pass 0 is the prefill), so the
    last position of pass n is the one that chose it (`moe.routing_per_token`).

    Phi-3-vision: `image_features` fill the prompt's image placeholders (negative ids);
    placeholders are positions, not tokens, so the repetition penalty never sees them.

    `grammar` (minislm/grammar.py) masks the ids a JSON schema forbids; `logprobs`
    records each token's log-probability (minislm/logprobs.py).
    """
    cache, stats, history, logits = prefill(model, prompt_ids, max_new_tokens, cache, history, stats, trace,
                                            image_features)
    if logits is None:
        return
    context = model.config.max_position_embeddings
    limit = min(context, cache.capacity)
    for n in range(max_new_tokens):
        token = choose(sampler, logits, history, grammar, logprobs)
        history.append(token)
        stats.generated_tokens += 1
        yield token
        reason = stop_reason(token, n + 1, max_new_tokens, stop_ids, cache.length, limit)
        if reason:
            stats.stop_reason = reason
            return
        start = time.perf_counter()
        logits = model.lm_head(model.forward(np.array([token]), cache, trace), trace)[0]
        stats.decode_seconds += time.perf_counter() - start
        if not np.isfinite(logits).all():
            check_logits(model, logits, history)


def prefill(model, prompt_ids, max_new_tokens: int, cache: KVCache | None, history, stats: GenerationStats | None,
            trace=None, image_features=None):
    """What every generation loop starts with: a cache (a new one holds the prompt and
    `max_new_tokens`), the statistics, the history the repetition penalty reads, and
    the prompt's forward. -> (cache, stats, history, logits (V,) of the last position,
    or None when nothing is to be generated)."""
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    context = model.config.max_position_embeddings
    if cache is None:
        cache = model.new_cache(min(context, len(prompt) + max_new_tokens))
    if cache.length + len(prompt) > cache.capacity:
        raise ValueError(f"KV cache holds {cache.capacity} positions, {cache.length + len(prompt)} needed")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    history = [int(t) for t in history if t >= 0] if history is not None else []
    history.extend(int(t) for t in prompt if t >= 0)
    if max_new_tokens == 0:
        stats.stop_reason = "length"
        return cache, stats, history, None
    start = time.perf_counter()
    logits = model.lm_head(model.forward(prompt, cache, trace, image_features)[-1:], trace)[0]  # (V,) for the last position
    stats.prefill_seconds = time.perf_counter() - start
    if not np.isfinite(logits).all():  # a damaged checkpoint: say where (minislm/finite.py)
        check_logits(model, logits, history)
    return cache, stats, history, logits


def choose(sampler: Sampler, logits: np.ndarray, history: list[int], grammar=None, logprobs: Logprobs | None = None,
           stages: list[Stage] | None = None) -> int:
    """One token from `logits`: the grammar's mask and the sampler's stages, one draw,
    then the bookkeeping (its log-probability, the grammar's state). `stages` when the
    caller has computed them already (the speculative verifier)."""
    if stages is None:
        stages = sampler.stages(logits, history, None if grammar is None else grammar.mask())
    token = sampler.choose(stages)
    record(token, stages, grammar, logprobs)
    return token


def record(token: int, stages: list[Stage], grammar=None, logprobs: Logprobs | None = None) -> None:
    if logprobs is not None:
        logprobs.record(token, stages)
    if grammar is not None:
        grammar.advance(token)


def generate_text(tokenizer, token_stream: Iterator[int], stop_strings=(), stats: GenerationStats | None = None):
    """Stream the text of `token_stream`, ending before the first stop string.

    Text that could be the beginning of a stop string is held back until it is
    known not to be one, so a stop string is never half-printed.
    """
    text = TextStream(tokenizer, stop_strings)
    for token in token_stream:
        emit, stopped = text.add(token)
        if emit:
            yield emit
        if stopped:
            token_stream.close()
            if stats is not None:
                stats.stop_reason = "stop string"
            return
    emit = text.finish()
    if emit:
        yield emit


class TextStream:
    """Ids in, text out, one id at a time: the text safe to show so far, and whether a
    stop string has been reached. `generate_text` pulls ids through one; the server
    pushes each sequence's ids into its own as they come (minislm/batch.py)."""

    def __init__(self, tokenizer, stop_strings=()):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""  # held back: it could be the start of a stop string

    def add(self, token: int) -> tuple[str, bool]:
        """(text to show now, whether a stop string was found: then nothing more comes)."""
        emit, self.pending, stopped = split_at_stop(self.pending + self.detokenizer.add(token), self.stop_strings)
        return emit, stopped

    def finish(self) -> str:
        """The text still held back, once the ids have ended."""
        emit, _, _ = split_at_stop(self.pending + self.detokenizer.flush(), self.stop_strings, final=True)
        return emit


def split_at_stop(text: str, stop_strings, final: bool = False) -> tuple[str, str, bool]:
    """-> (text safe to print, text to hold back, whether a stop string was found)."""
    hits = [text.find(s) for s in stop_strings if s in text]
    if hits:
        return text[: min(hits)], "", True
    if final:
        return text, "", False
    hold = 0
    for s in stop_strings:  # longest tail of `text` that begins some stop string
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold], text[len(text) - hold :], False
