"""From next-token logits to one token id.

The order is transformers' order: repetition penalty, then temperature, then the
filters top-k, top-p and min-p, then one draw. Temperature 0 means greedy
(argmax), with no randomness at all. All randomness comes from one
`numpy.random.Generator` made from the seed: same seed, same tokens.

What the sampler promises whatever the numbers: it returns an id below
`allowed_ids` (one the tokenizer can decode) whose probability is a real number
above zero, or it raises. Floating point tries to break that twice. A tiny
temperature (1e-310) or repetition penalty turns finite logits into infinities
when divided, and inf - inf is NaN: such a setting is as cold as a temperature
can be, so it acts as greedy, which is what the distribution tends to as the
temperature goes to 0. And NaN logits (a damaged model) have no argmax and no
softmax: they are refused rather than read as some id.

`Sampler.stages` shows the logits after each step (a list of `Stage`), and the
token is a draw from the last one, or its argmax when greedy: logprobs, the
speculative decoder's rejection rule and the explorer
read the same distribution the token came from.
"""

import math
from dataclasses import dataclass

import numpy as np

from .errors import MinislmError


# The legal value of every sampling setting, in one place: SamplingSettings, the
# CLI flags and generation_config.json are all checked against this table, each
# naming itself (`--temp`, `generation_config.json: 'temperature'`) in the message.
# NaN fails every test here, and infinities are refused where they would turn the
# arithmetic into NaN (logits / inf).
SETTING_RANGES = {
    "temperature": (lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
    "repetition_penalty": (lambda v: 0 < v < math.inf, "a finite number > 0 (1 = off)"),
    "seed": (lambda v: v >= -1, "an integer >= 0, or -1 for a random seed"),
}
INTEGER_SETTINGS = ("top_k", "seed")


def check_setting(name: str, value, label: str | None = None) -> None:
    """Raise MinislmError (a ValueError) unless `value` is legal for setting `name`.
    None means "not set" and is always legal. `label` is what the user wrote."""
    if value is None:
        return
    label = label or name
    integer = name in INTEGER_SETTINGS
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise MinislmError(f"{label} must be {kind}, got {value!r}")
    legal, description = SETTING_RANGES[name]
    if not legal(value):
        raise MinislmError(f"{label} must be {description}, got {value!r}")


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely ids (None or 0 = off)
    top_p: float | None = None  # keep the smallest set whose probability reaches p (nucleus)
    min_p: float | None = None  # drop ids less likely than min_p * (probability of the best id)
    repetition_penalty: float | None = None  # > 1 discourages ids already in the sequence

    def __post_init__(self):
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
            check_setting(name, getattr(self, name))


@dataclass(frozen=True)
class Stage:
    """The logits after one step of the sampler: `probabilities(stage.logits)` is the
    distribution at that point. -inf marks an id the step filtered out.

    Names, in the order they apply: "logits" (the model's, with the ids past the
    tokenizer masked), "grammar" (ids a JSON schema forbids masked), then
    "repetition_penalty", "temperature", "top_k", "top_p", "min_p". A processor
    the settings turn off is left out, so greedy settings end at "logits",
    "grammar" or "repetition_penalty", and the token is the last stage's argmax;
    when "temperature" is there (even at 1.0), the token is a draw from the last
    stage.
    """

    name: str
    logits: np.ndarray  # (V,) float64


# The stages after which the token is drawn at random rather than taken as the argmax.
SAMPLED_STAGES = ("temperature", "top_k", "top_p", "min_p")


class Sampler:
    """Settings plus the random generator; call it with logits to get an id.

    `stages` shows the distribution after each processor, once, for whoever needs more
    than the id: logprobs (the last stage), the speculative decoder's rejection rule
    (p and q are last stages) and the explorer's sampling panel.
    """

    def __init__(self, settings: SamplingSettings, seed: int | None = None, allowed_ids: int | None = None):
        check_setting("seed", seed)
        self.settings = settings
        # None or -1 (llama.cpp's convention): fresh entropy from the OS, a different text each run.
        self.rng = np.random.default_rng(None if seed == -1 else seed)
        # Ids >= allowed_ids exist as embedding rows but not in the tokenizer (Phi-3 pads
        # 32011 real ids to 32064 rows); they are never sampled.
        self.allowed_ids = allowed_ids

    def __call__(self, logits: np.ndarray, previous_ids=(), grammar_mask: np.ndarray | None = None) -> int:
        return self.choose(self.stages(logits, previous_ids, grammar_mask))

    def choose(self, stages: list[Stage]) -> int:
        """The id the stages decide: a draw from the last one when sampling, else its argmax."""
        if is_sampled(stages):
            return draw(probabilities(stages[-1].logits), self.rng)
        return greedy(stages[-1].logits)

    def stages(self, logits: np.ndarray, previous_ids=(), grammar_mask: np.ndarray | None = None) -> list[Stage]:
        """Every stage that applies, in transformers' order (see `Stage`).

        `grammar_mask` (V,) bool, True where an id keeps the text valid under a JSON
        schema (minislm/grammar.py): the one place that mask meets the logits.
        """
        logits = np.array(logits, dtype=np.float64)  # (V,), a copy we may edit
        if np.isnan(logits).any():
            raise MinislmError(f"the logits hold NaN at ids {np.flatnonzero(np.isnan(logits))[:8].tolist()}: "
                               "the model's weights or inputs are damaged")
        if self.allowed_ids is not None:
            logits[self.allowed_ids :] = -np.inf
        if not (logits > -np.inf).any():
            raise MinislmError("every id's logit is -inf (or beyond allowed_ids): there is nothing to sample")
        stages = [Stage("logits", logits)]
        if grammar_mask is not None:
            masked = np.where(grammar_mask[: logits.size], logits, -np.inf)
            if not (masked > -np.inf).any():
                raise MinislmError("the JSON schema allows no token the model can produce here")
            stages.append(Stage("grammar", masked))
        with np.errstate(over="ignore"):  # overflows are handled here, not warned about
            stages.extend(self.processed(stages[-1].logits, previous_ids))
        return stages

    def processed(self, logits: np.ndarray, previous_ids) -> list[Stage]:
        """The processors in transformers' order, on logits already checked (no NaN) and masked."""
        s, out = self.settings, []
        if s.repetition_penalty is not None and s.repetition_penalty != 1.0:
            penalized = repetition_penalty(logits, previous_ids, s.repetition_penalty)
            if not (penalized > -np.inf).any():  # every id overflowed to -inf: keep their order
                return out
            logits = penalized
            out.append(Stage("repetition_penalty", logits))
        if s.temperature == 0 or np.isposinf(logits).any():
            return out  # greedy: the argmax of the last stage
        scaled = logits / s.temperature
        if np.isinf(scaled[np.isfinite(logits)]).any():  # the temperature underflows: as cold as can be
            return out
        logits = scaled
        out.append(Stage("temperature", logits))
        if s.top_k:
            logits = top_k_filter(logits, s.top_k)
            out.append(Stage("top_k", logits))
        if s.top_p is not None and s.top_p < 1.0:
            logits = top_p_filter(logits, s.top_p)
            out.append(Stage("top_p", logits))
        if s.min_p is not None and s.min_p > 0:
            logits = min_p_filter(logits, s.min_p)
            out.append(Stage("min_p", logits))
        return out


def is_sampled(stages: list[Stage]) -> bool:
    """Whether the token is drawn from the last stage (True) or is its argmax (False)."""
    return stages[-1].name in SAMPLED_STAGES


def greedy(logits: np.ndarray) -> int:
    """The most likely id; with several +inf logits (a repetition penalty near 0 can make
    them), the first of those."""
    return int(np.argmax(logits))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """softmax; 0 where a logit is -inf. Several +inf logits (a repetition penalty near
    0 makes them) share all the probability, since no finite logit competes with them."""
    if np.isposinf(logits).any():
        return np.isposinf(logits) / np.count_nonzero(np.isposinf(logits))
    e = np.exp(logits - np.max(logits))
    return e / e.sum()


def log_probabilities(logits: np.ndarray) -> np.ndarray:
    """log_softmax, the log of `probabilities` computed without losing the small ones
    (-inf where a logit is -inf): what logprobs report."""
    if np.isposinf(logits).any():
        with np.errstate(divide="ignore"):
            return np.log(probabilities(logits))
    shifted = logits - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def repetition_penalty(logits: np.ndarray, previous_ids, penalty: float) -> np.ndarray:
    """CTRL's penalty: divide positive logits (multiply negative ones) of seen ids."""
    seen = np.unique(np.asarray(previous_ids, dtype=np.int64))
    if seen.size == 0:
        return logits
    out = logits.copy()
    values = out[seen]
    out[seen] = np.where(values > 0, values / penalty, values * penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep ids whose logit is at least the k-th largest (ties at the boundary stay)."""
    if k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the most likely ids until their total probability reaches p (at least one)."""
    order = np.argsort(-logits, kind="stable")
    sorted_probs = probabilities(logits)[order]
    # an id stays if the ids more likely than it do not yet reach p
    keep_sorted = (np.cumsum(sorted_probs) - sorted_probs) < p
    keep = np.zeros(logits.size, dtype=bool)
    keep[order[keep_sorted]] = True
    return np.where(keep, logits, -np.inf)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop ids whose probability is below min_p times that of the most likely id."""
    probs = probabilities(logits)
    return np.where(probs >= min_p * probs.max(), logits, -np.inf)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF sampling: one uniform number, one search.

    The id found is one whose probability is above zero: the search lands where the
    cumulative sum steps up. Rounding can put the uniform number at the very end of
    the sum; then the last id that has any probability is taken, never a zero one
    past it (such as a padding id)."""
    if not (np.isfinite(probs).all() and (probs >= 0).all() and probs.sum() > 0):
        raise MinislmError("the sampler's probabilities are not a distribution (NaN, inf, negative or all zero)")
    cumulative = np.cumsum(probs)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    if index >= probs.size or probs[index] == 0:
        index = int(np.flatnonzero(probs)[-1])
    return index
