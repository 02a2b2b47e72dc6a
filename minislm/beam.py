"""Beam search: keep the N best partial continuations instead of one.

Greedy decoding takes the most likely token at every step and never looks back. But
the most likely *sequence* may begin with a token that was only second best at its
step. Beam search keeps `num_beams` (N) partial continuations, the beams, alive. At
each step every beam is extended by every token; a candidate's score is its total
log-probability (its beam's score plus the new token's log-probability); the N best
candidates that have not ended become the next beams. A candidate that ends (a stop
id, or the length limit) becomes a finished *hypothesis*, whose score is its total
log-probability divided by its length to the power `length_penalty`: 1.0 compares
hypotheses by their mean log-probability per token, so a long one is not beaten just
for being long; 0 compares plain sums, which favours short ones.

The rules are those of transformers' `generate(num_beams=N, do_sample=False)`, which
minislm reproduces token for token:

* each step ranks max(2, 1 + number of stop ids) * N candidates: enough that N of
  them have not ended even if every beam's best tokens are stop ids;
* only candidates among the N best of a step may become hypotheses, and the N best
  hypotheses are kept;
* the search ends at the length limit; or, once N hypotheses are kept, when the best
  beam can no longer beat the worst of them (`early_stopping=False`: judged by its
  score as if it ended now; "never": as if it ended at the length limit, which only
  differs when length_penalty > 0 rewards length); `early_stopping=True` ends as soon
  as N hypotheses are kept;
* log-probabilities are the float32 log-softmax of the logits, then the logits
  processors (the repetition penalty of generation_config.json) act on them, and
  scores add up in float32, so near-ties break the same way.

The KV cache: every beam has its own (`KVCache`), filled to the same length. The
prompt is prefilled once; the other beams receive copies of it, not a forward of
their own. After each step, a beam that is continued hands its cache to its first
successor as it is; a second successor of the same beam needs the same history, and
gets it copied into the cache of a beam nobody continued: only the positions after
the tokens the two caches already share (`shared_positions`), usually all but the
last few. Then each new beam runs its one new token through the model:
N single-token forwards per step.
"""

import time
from dataclasses import dataclass

import numpy as np

from .cache import KVCache
from .generate import check_context
from .sampling import repetition_penalty as penalize_repetitions


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam: what `beam_search` returns, best first."""

    ids: tuple[int, ...]  # generated ids, ending with the stop id that ended it, if one did
    score: float  # sum of the ids' log-probabilities / len(ids) ** length_penalty


@dataclass
class Beam:
    """A continuation still being extended."""

    ids: list[int]  # generated so far
    score: np.float32  # sum of the log-probabilities of `ids`
    cache: KVCache  # the prompt and `ids` (all but the newest, whose forward gave `logits`)
    logits: np.ndarray  # (V,) logits of the token after `ids`
    parent: int = 0  # the beam of the previous step that this one extends
    copied: int = 0  # cache positions copied to give this beam its parent's history (0: handed over)


@dataclass(frozen=True)
class Candidate:
    """A beam extended by one token."""

    score: np.float32
    beam: int  # which beam it extends
    token: int


@dataclass
class BeamStats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    steps: int = 0  # tokens added to the longest beam
    forwards: int = 0  # single-token forwards: up to N per step
    copied_positions: int = 0  # cache positions copied from one beam to another
    search_seconds: float = 0.0  # everything after the prefill
    stop_reason: str = ""  # "length", "context", "early stopping" or "no better beam"


def check_beam_arguments(model, num_beams, max_new_tokens, stop_ids, length_penalty=1.0, early_stopping=False,
                         num_return_sequences=1) -> None:
    """Every argument of `beam_search`, checked before any work is done."""
    if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if not isinstance(num_return_sequences, (int, np.integer)) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if max_new_tokens < 1:
        raise ValueError(f"beam search needs max_new_tokens >= 1, got {max_new_tokens}")
    width = candidates_per_step(num_beams, stop_ids)
    if width > model.config.vocab_size:
        raise ValueError(f"num_beams={num_beams} ranks {width} candidates per step, more than the "
                         f"{model.config.vocab_size} ids of the vocabulary")


def candidates_per_step(num_beams: int, stop_ids) -> int:
    return max(2, 1 + len(set(stop_ids))) * num_beams


def beam_search(
    model,
    prompt_ids,
    max_new_tokens: int,
    num_beams: int,
    stop_ids=(),
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    repetition_penalty: float = 1.0,
    allowed_ids: int | None = None,
    stats: BeamStats | None = None,
    on_step=None,
) -> list[Hypothesis]:
    """The `num_return_sequences` best hypotheses after `prompt_ids`, best first.

    `allowed_ids`: ids from this one up are never chosen (the CLI passes the
    tokenizer's size, as it does for sampling; transformers has no such limit).
    Generation also ends at the model's context length. `on_step(length, beams,
    finished)`, if given, sees every step's outcome: the beams that go on (none after
    the last step) and the hypotheses kept so far (tools/beam_walkthrough.py prints them).
    """
    check_beam_arguments(model, num_beams, max_new_tokens, stop_ids, length_penalty, early_stopping,
                         num_return_sequences)
    prompt = model.check_ids(prompt_ids)
    if prompt.size == 0:
        raise ValueError("the prompt needs at least one token id")
    context = model.config.max_position_embeddings
    check_context(len(prompt), 0, context)
    stats = stats if stats is not None else BeamStats()
    stats.prompt_tokens = len(prompt)
    max_new = min(max_new_tokens, context - len(prompt))
    stop_ids = set(int(t) for t in stop_ids)
    width = candidates_per_step(num_beams, stop_ids)

    start = time.perf_counter()
    cache = model.new_cache(len(prompt) + max_new)
    beams = [Beam([], np.float32(0.0), cache, model.lm_head(model.forward(prompt, cache)[-1:])[0])]
    stats.prefill_seconds = time.perf_counter() - start

    finished: list[Hypothesis] = []  # best first, at most num_beams
    for length in range(1, max_new + 1):  # `length`: generated tokens after this step
        stats.steps = length
        candidates = best_candidates(beams, prompt, width, repetition_penalty, allowed_ids)
        last = length == max_new
        ended = [last or c.token in stop_ids for c in candidates]

        new = [Hypothesis(tuple(beams[c.beam].ids + [c.token]), float(c.score / np.float32(length**length_penalty)))
               for c, end in zip(candidates[:num_beams], ended) if end]
        finished = sorted(finished + new, key=lambda h: -h.score)[:num_beams]  # stable: older first on ties
        survivors = [c for c, end in zip(candidates, ended) if not end][:num_beams]
        reason = search_over(last, finished, survivors, num_beams, length, max_new, length_penalty, early_stopping)
        beams = [] if reason else extend(model, beams, survivors, stats)
        if on_step is not None:
            on_step(length, beams, finished)
        if reason:
            stats.stop_reason = "context" if reason == "length" and max_new < max_new_tokens else reason
            break
    stats.search_seconds = time.perf_counter() - start - stats.prefill_seconds
    return finished[:num_return_sequences]


def search_over(last: bool, finished: list[Hypothesis], survivors: list[Candidate], num_beams: int, length: int,
                max_new: int, length_penalty: float, early_stopping) -> str:
    """Why the search ends after this step ("" if it goes on)."""
    if last:
        return "length"
    if len(finished) < num_beams:
        return ""
    if early_stopping is True:
        return "early stopping"
    # The best a beam can still hope for: its score now, at its length now, or (with
    # "never" and a penalty that rewards length) at the longest length it could reach.
    hoped_length = max_new if early_stopping == "never" and length_penalty > 0 else length
    if survivors[0].score / np.float32(hoped_length**length_penalty) <= finished[-1].score:
        return "no better beam"
    return ""


def best_candidates(beams: list[Beam], prompt, width: int, repetition_penalty: float, allowed_ids) -> list[Candidate]:
    """The `width` best one-token extensions of all beams, best first (ties: lower beam,
    then lower id, first)."""
    scores = np.stack([
        beam.score + next_token_log_probs(beam, prompt, repetition_penalty, allowed_ids) for beam in beams
    ])  # (beams, V) float32
    vocab = scores.shape[1]
    flat = scores.reshape(-1)
    top = np.argpartition(-flat, width - 1)[:width]
    top = top[np.lexsort((top, -flat[top]))]
    return [Candidate(flat[i], int(i // vocab), int(i % vocab)) for i in top]


def next_token_log_probs(beam: Beam, prompt, repetition_penalty: float, allowed_ids) -> np.ndarray:
    """log-softmax of the beam's logits, then the repetition penalty on the log-probs, as
    transformers' beam search applies its logits processors."""
    shifted = beam.logits.astype(np.float32) - np.max(beam.logits)
    log_probs = shifted - np.log(np.sum(np.exp(shifted)))  # (V,) float32
    if repetition_penalty != 1.0:
        log_probs = penalize_repetitions(log_probs, np.concatenate([prompt, np.asarray(beam.ids, dtype=np.int64)]),
                                         repetition_penalty)
    if allowed_ids is not None:
        log_probs[allowed_ids:] = -np.inf
    return log_probs


def extend(model, beams: list[Beam], survivors: list[Candidate], stats: BeamStats) -> list[Beam]:
    """The survivors become the next beams, each with the cache of the beam it extends.

    First every cache is assigned (a beam's own cache to its first successor, copies for
    the others, into the caches of beams nobody continues), and only then does any
    forward write to one: a copy must see its source before the source moves on.
    """
    continued = {c.beam for c in survivors}
    spare = [beam.cache for i, beam in enumerate(beams) if i not in continued]
    caches, copies, handed_over = [], [], set()
    for c in survivors:
        source = beams[c.beam].cache
        if c.beam not in handed_over:
            handed_over.add(c.beam)
            caches.append(source)
            copies.append(0)
        else:
            cache = spare.pop() if spare else model.new_cache(source.capacity)
            copies.append(cache.copy_from(source, keep=shared_positions(cache, source)))
            caches.append(cache)
    stats.copied_positions += sum(copies)
    new_beams = []
    for c, cache, copied in zip(survivors, caches, copies):
        logits = model.lm_head(model.forward(np.array([c.token]), cache))[0]  # (V,)
        stats.forwards += 1
        new_beams.append(Beam(beams[c.beam].ids + [c.token], c.score, cache, logits, c.beam, copied))
    return new_beams


def shared_positions(a: KVCache, b: KVCache) -> int:
    """How many leading positions two beams' caches hold for the same tokens.

    Within one search those positions hold the same bits (see `KVCache.copy_from`),
    unless one side was computed with the other LongRoPE factor set. One assumption:
    when beams cross LongRoPE's switch point, each recomputes its whole sequence in one
    forward (`Model.forward`), all of the same length, and equal rows of the inputs are
    taken to give equal rows of the outputs, as a matrix product computes each row on
    its own.
    """
    if a.rope_long != b.rope_long:
        return 0
    n = min(a.length, b.length)
    differs = np.flatnonzero(a.tokens[:n] != b.tokens[:n])
    return int(differs[0]) if differs.size else n
