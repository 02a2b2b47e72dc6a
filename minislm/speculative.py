"""Speculative decoding: more than one token per pass over the target's weights.

A decode step is memory-bound: it streams every weight once to produce one token.
A forward over a handful of tokens streams the weights once too, and costs little
more (docs/performance.md measures it). So guess k tokens cheaply, run the target
once over the last token and the k guesses, and keep the guesses it agrees with:

    draft      d1 d2 d3 d4                  prompt lookup, or a small draft model
    verify     one forward of [last, d1, d2, d3, d4] through the target's cache
               -> the target's distributions p0 .. p4 at those five positions
    accept     d1 under p0, then d2 under p1, ... up to the first rejection, which
               is replaced by a token from what p leaves; when all four pass, p4
               gives a fifth token, the bonus
    roll back  the cache forgets the positions after the last kept guess
               (KVCache.truncate): it holds every token but the newest, as in the
               plain loop of minislm/generate.py

The rule that decides "agrees" keeps the output distributed exactly as the
target's own samples (Leviathan et al. 2023, Chen et al. 2023):

    accept a guess x drawn from the draft's q with probability min(1, p(x) / q(x));
    on rejection, draw from max(0, p - q), normalized.

p and q are the distributions after every processor: the last of each sampler's
stages (minislm/sampling.py), so the repetition penalty, temperature, top-k,
top-p, min-p and a JSON schema's mask all count. Prompt lookup's guess is not drawn
from anything: its q is one-hot at x, so x passes with probability p(x), and a
rejection draws from p without x. Greedy decoding needs no randomness: a guess
passes when it is the target's argmax, so the output is the plain greedy output
token for token, as long as the verify forward's logits equal those of one-token
forwards bit for bit. minislm's packed int4/int8 kernels guarantee that; the
float32 and bf16 paths do not (BLAS and AMX round differently for one row and for
many), and docs/decoding.md says what that allows.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .cache import KVCache
from .finite import check_logits
from .generate import GenerationStats, prefill, record
from .logprobs import Logprobs
from .sampling import Sampler, Stage, draw, is_sampled, probabilities

# How many guesses a step verifies unless told otherwise (--num-draft).
DEFAULT_NUM_DRAFT = 4
# Prompt lookup matches the last 3, else 2, else 1 tokens of the text.
LOOKUP_MAX_NGRAM = 3


@dataclass
class Draft:
    """k guessed ids and, for each, the distribution it was drawn from (q), or None
    where the guess was not drawn at random (prompt lookup, a greedy draft): q is then
    one-hot at the guess."""

    tokens: list[int]
    q: list[np.ndarray | None]


class PromptLookup:
    """Guesses from the text itself (prompt lookup decoding): find the latest earlier
    place where the text's last n tokens occurred, and guess the tokens that followed
    them there. Free, and right whenever the reply copies: edits, summaries, code,
    quotes. `extra`: more ids to look in (a server request's `prediction`)."""

    name = "lookup"

    def __init__(self, max_ngram: int = LOOKUP_MAX_NGRAM, extra=()):
        self.max_ngram = max_ngram
        self.extra = [int(t) for t in extra]

    def propose(self, history: list[int], k: int, grammar=None) -> Draft:
        tokens = lookup(self.extra + history, k, self.max_ngram)
        return Draft(tokens, [None] * len(tokens))


def lookup(ids: list[int], k: int, max_ngram: int) -> list[int]:
    """Up to k ids that followed the latest earlier occurrence of the last n ids, for the
    longest n <= max_ngram that occurred before; [] when none did."""
    seq = np.asarray(ids, dtype=np.int64)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every earlier n-gram
        starts = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if starts.size:
            follow = starts[-1] + n
            return seq[follow : follow + k].tolist()
    return []


class DraftModel:
    """Guesses from a smaller model with the same vocabulary (Phi-3-mini for
    Phi-3-medium), one token at a time through its own cache, sampled with the target's
    settings by its own sampler: q is the last stage of that sampler."""

    name = "draft model"

    def __init__(self, model, sampler: Sampler, capacity: int):
        self.model = model
        self.sampler = sampler
        self.cache: KVCache = model.new_cache(capacity)

    def propose(self, history: list[int], k: int, grammar=None) -> Draft:
        # The cache holds the text up to an earlier round's guesses; keep what still matches.
        keep = min(self.cache.shared_prefix(np.asarray(history)), len(history) - 1)
        self.cache.truncate(keep)
        logits = self.next_logits(history[keep:])
        tokens, qs = [], []
        for i in range(k):
            stages = self.sampler.stages(logits, history + tokens, None if grammar is None else grammar.mask())
            token = self.sampler.choose(stages)
            tokens.append(token)
            qs.append(probabilities(stages[-1].logits) if is_sampled(stages) else None)
            if grammar is not None:
                grammar.advance(token)
            if i < k - 1:
                logits = self.next_logits([token])
        if grammar is not None:
            grammar.rollback(len(tokens))
        return Draft(tokens, qs)

    def next_logits(self, ids) -> np.ndarray:
        hidden = self.model.forward(np.asarray(ids, dtype=np.int64), self.cache)
        return self.model.lm_head(hidden[-1:])[0]  # (V,)


def verify(sampler: Sampler, stages: list[Stage], guess: int, q: np.ndarray | None) -> tuple[bool, int]:
    """(accepted, token) for one guess under the target's stages at its position.

    Greedy: the guess passes when it is the argmax. Sampling: it passes with probability
    min(1, p(x) / q(x)); otherwise the token is drawn from max(0, p - q), normalized
    (q one-hot at the guess when None). Either way the token is distributed as p."""
    if not is_sampled(stages):
        token = sampler.choose(stages)
        return token == guess, token
    p = probabilities(stages[-1].logits)  # (V,)
    q_guess = 1.0 if q is None else q[guess]
    if sampler.rng.random() < min(1.0, p[guess] / q_guess):
        return True, guess
    residual = p.copy()
    if q is None:
        residual[guess] = 0.0
    else:
        residual = np.maximum(residual - q, 0.0)
    if not residual.sum() > 0:  # only rounding can empty it: p(x) < q(x) leaves mass elsewhere
        residual = p
    return False, draw(residual, sampler.rng)


# What `judge` says of each token it yields.
ACCEPTED = "accepted"  # a guess the target agrees with
CORRECTED = "corrected"  # the target's token in place of the first rejected guess
BONUS = "bonus"  # every guess passed: the last row gives one more token


def judge(sampler: Sampler, rows: np.ndarray, draft: Draft, history: list[int], grammar=None,
          logprobs: Logprobs | None = None) -> Iterator[tuple[int, str, list[Stage]]]:
    """One round's verdicts, in order: (token, ACCEPTED / CORRECTED / BONUS, the stages
    it came from) for the guesses the target agrees with, then the token in place of
    the first rejected one, or the bonus after the last. `rows` (1 + guesses, V): the
    target's logits before each guess and after the last. Each token joins `history` (and the grammar's state and
    `logprobs`) before it is yielded, so a caller may stop at any of them (a stop id);
    the guesses after a rejection are never looked at. The one accept loop of
    speculative decoding: `speculative_tokens` and the explorer's step both run it."""
    for i in range(len(draft.tokens) + 1):
        stages = sampler.stages(rows[i], history, None if grammar is None else grammar.mask())
        if i < len(draft.tokens):
            accepted, token = verify(sampler, stages, draft.tokens[i], draft.q[i])
            verdict = ACCEPTED if accepted else CORRECTED
        else:  # every guess passed (or none was made): the last row gives one more token
            token, verdict = sampler.choose(stages), BONUS
        record(token, stages, grammar, logprobs)
        history.append(token)
        yield token, verdict, stages
        if verdict != ACCEPTED:
            return


def speculative_tokens(
    model,
    prompt_ids,
    max_new_tokens: int,
    sampler: Sampler,
    drafter,
    num_draft: int,
    stop_ids=(),
    cache: KVCache | None = None,
    history: list[int] | None = None,
    stats: GenerationStats | None = None,
    image_features=None,
    grammar=None,
    logprobs: Logprobs | None = None,
) -> Iterator[int]:
    """`minislm.generate.generate_tokens` with up to `num_draft` guesses verified per
    forward; the same arguments, checked the same way (`runtime.generate_ids`), the same
    tokens out for greedy decoding, the same distribution for sampling. `drafter` is a
    `PromptLookup` or a `DraftModel`; `stats` counts drafted and accepted guesses."""
    cache, stats, history, logits = prefill(model, prompt_ids, max_new_tokens, cache, history, stats, None,
                                            image_features)
    if logits is None:
        return
    stop_ids = set(int(t) for t in stop_ids)
    limit = min(model.config.max_position_embeddings, cache.capacity)

    def finished(token: int) -> bool:
        """The plain loop's three stops, after `token` was yielded."""
        if token in stop_ids:
            stats.stop_reason = "eos"
        elif stats.generated_tokens == max_new_tokens:
            stats.stop_reason = "length"
        elif cache_length + 1 >= limit:  # the text, with `token` not yet in the cache, fills the context
            stats.stop_reason = "context"
        return bool(stats.stop_reason)

    # The prefill is round 0: its last row decides the first token, and no guess was made.
    rows, draft, before = logits[None], Draft([], []), cache.length - 1
    while True:
        produced = 0
        try:
            for token, verdict, _ in judge(sampler, rows, draft, history, grammar, logprobs):
                stats.accepted_tokens += verdict == ACCEPTED
                stats.generated_tokens += 1
                produced += 1
                cache_length = before + produced
                yield token
                if finished(token):
                    return
        finally:
            # Keep [last, the guesses kept before the newest token]: every token but the newest.
            cache.truncate(before + produced)
        # Room for k guesses: k + 1 new tokens at most, and the forward of [last, guesses]
        # must leave the text within the context, as the plain loop's one-token steps do.
        k = min(num_draft, max_new_tokens - stats.generated_tokens - 1, limit - cache.length - 2)
        start = time.perf_counter()
        draft = drafter.propose(history, k, grammar) if k > 0 else Draft([], [])
        before = cache.length
        rows = model.lm_head(model.forward(np.array([token] + draft.tokens), cache))  # (1 + guesses, V)
        stats.decode_seconds += time.perf_counter() - start
        check_rows(model, rows, history)
        stats.drafted_tokens += len(draft.tokens)


def check_rows(model, logits: np.ndarray, history) -> None:
    if not np.isfinite(logits).all():  # a damaged checkpoint: say where (minislm/finite.py)
        for row in logits:
            check_logits(model, row, history)
