"""Log-probabilities of the generated tokens, from the distribution they were drawn from.

For each generated token the generation loop hands `Logprobs.record` the sampler's
stages (minislm/sampling.py); what is recorded is log_softmax of the *last* stage:
after the allowed-ids mask, the JSON-schema mask, the repetition penalty, the
temperature and the filters. So at temperature 0.7 the numbers are those of
logits / 0.7, and an id that top-p filtered out has no entry at all: these are the
probabilities the token really had. (OpenAI's API does not say which distribution
it reports; vLLM reports the raw one by default. The issue that asked for logprobs
asks for the one the sampler saw, so greedy decoding reports the model's
distribution after the repetition penalty, and sampling the one it drew from.)

The top alternatives are the `top` most likely ids of that same distribution, most
likely first; ids with probability 0 (-inf) are never listed, so there may be fewer.
"""

from dataclasses import dataclass

import numpy as np

from .sampling import Stage, log_probabilities


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # natural log of the probability the token had when it was chosen
    top: tuple[tuple[int, float], ...]  # (id, logprob) of the most likely ids, most likely first


class Logprobs:
    """What the generation loop records into, one `TokenLogprob` per generated token."""

    def __init__(self, top: int = 0):
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
            raise ValueError(f"logprobs: the number of top alternatives must be an integer >= 0, got {top!r}")
        self.top = int(top)
        self.entries: list[TokenLogprob] = []

    def record(self, token: int, stages: list[Stage]) -> TokenLogprob:
        entry = token_logprob(token, stages[-1].logits, self.top)
        self.entries.append(entry)
        return entry


def token_logprob(token: int, logits: np.ndarray, top: int) -> TokenLogprob:
    """`token`'s log-probability under softmax(logits), and the `top` most likely ids."""
    logp = log_probabilities(logits)  # (V,)
    best = []
    if top:
        candidates = np.argpartition(-logp, top - 1)[:top] if top < logp.size else np.arange(logp.size)
        candidates = candidates[np.isfinite(logp[candidates])]
        order = candidates[np.lexsort((candidates, -logp[candidates]))]  # most likely first, ties by id
        best = [(int(i), float(logp[i])) for i in order]
    return TokenLogprob(int(token), float(logp[token]), tuple(best))
