"""PhiMoE's mixture of experts: how a token is routed, and which weights that touches.

Each PhiMoE layer replaces Phi-3's one MLP by E expert MLPs (E = 16 on
Phi-3.5-MoE) and a router, `block_sparse_moe.gate`, a (E, D) matrix that scores
every expert for every token. The layer's output for a token is

    w_a * expert_a(x) + w_b * expert_b(x)

for the two experts a, b the router picks. `sparsemixer` below is that choice,
exactly as transformers' `sparsemixer` makes it at inference; `group_by_expert` is
the dispatch plan that lets `model.moe` run each chosen expert once, on just its
tokens. The rest of the layer (attention, norms) is dense.

Shapes: T tokens, E experts, D hidden size.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def sparsemixer(scores: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Pick two experts per token and a weight for each, from router scores (T, E).

    Returns experts (T, 2) int64 and weights (T, 2) float32, first choice first.

        round 1: a = argmax(s)
                 keep only experts close to the best:  (s_a - s_j) / max(|s_j|, s_a) <= 2*eps
                 w_a = softmax(kept scores)[a]
        round 2: the same with a removed: b = the argmax of the rest, experts are kept
                 when close to s_b, and w_b = softmax(kept scores without a)[b]

    With eps = 0.01 (Phi-3.5-MoE's `router_jitter_noise`) an expert survives only if its
    score is within 2% of the best, so most weights are 1.0 or close to it: unlike
    Mixtral's top-2 softmax, the two weights are not renormalised to sum to 1.
    (During training, sparsemixer samples instead of taking the argmax; we only infer.)
    """
    rows = np.arange(scores.shape[0])
    first, first_weight = sparsemixer_round(scores, scores, jitter_eps)
    others = scores.copy()
    others[rows, first] = -np.inf  # expert a is out of round 2
    second, second_weight = sparsemixer_round(others, scores, jitter_eps)
    experts = np.stack([first, second], axis=-1)  # (T, 2)
    weights = np.stack([first_weight, second_weight], axis=-1)  # (T, 2)
    return experts, weights


def sparsemixer_round(candidates: np.ndarray, scores: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """One round: the best candidate (T,) and its weight (T,).

    candidates: (T, E) scores with the experts already chosen set to -inf.
    The closeness test compares the best candidate with the ORIGINAL `scores`, as
    transformers does; an expert chosen earlier passes that test but stays -inf.
    """
    best = np.argmax(candidates, axis=-1)  # (T,) the first of equal maxima, as torch.max
    top = np.take_along_axis(candidates, best[:, None], axis=-1)  # (T, 1)
    # 0/0 (top = s = 0) gives NaN and NaN > x is False: kept, as in torch. Division by 0
    # (or overflow) only happens in round 2, for round 1's expert (s about 0, top < 0):
    # -inf, not masked, but that expert is -inf among the candidates anyway.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        gap = (top - scores) / np.maximum(np.abs(scores), top)  # (T, E) relative distance to the best
    kept = np.where(gap > 2 * jitter_eps, -np.inf, candidates)  # (T, E)
    # softmax(kept) at the best expert: its exp(s - top) is exp(0) = 1, so the weight is 1 / sum.
    weight = 1.0 / np.sum(np.exp(kept - top), axis=-1)  # (T,)
    return best, weight


def group_by_expert(experts: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The dispatch plan: for each expert some token chose, in increasing order,
    (expert, rows, slots) — the tokens routed to it, (n,), and whether it was their
    first (0) or second (1) choice, (n,).

    Experts nobody chose do not appear, so their weights are never read: a decode step
    (T = 1) runs exactly 2 experts per layer. A token's two experts differ, so `rows`
    never repeats a token.
    """
    for expert in np.unique(experts):
        rows, slots = np.nonzero(experts == expert)
        yield int(expert), rows, slots


@dataclass(frozen=True)
class TokenRouting:
    """The experts behind one generated token: the routing, layer by layer, of the
    position whose logits it was sampled from (`routing_per_token`)."""

    token: int
    experts: np.ndarray  # (layers, 2) int64, first choice first
    weights: np.ndarray  # (layers, 2) float32


def routing_per_token(trace, tokens) -> list[TokenRouting]:
    """What a generation's recorder saw, as one TokenRouting per generated token.

    `trace` recorded "experts" and "expert_weights" through `generate_tokens`: forward
    pass n gave the logits token n was drawn from, and its last position is the one
    whose routing chose it.
    """
    return [
        TokenRouting(
            int(token),
            np.stack([e[-1] for e in trace.per_layer("experts", forward=n)]),  # (layers, 2)
            np.stack([w[-1] for w in trace.per_layer("expert_weights", forward=n)]),  # (layers, 2)
        )
        for n, token in enumerate(tokens)
    ]


def expert_prefix(layer: str, expert: int) -> str:
    """Hub name prefix of one expert's matrices: w1 (gate), w3 (up), w2 (down)."""
    return f"{layer}block_sparse_moe.experts.{expert}."
