"""`python -m minislm lens PROMPT`: the logit lens.

The residual stream after each layer is a vector of the same size as the one
the last layer hands to the final norm, so we can ask what the model would
predict if it stopped there: `lm_head(norm(x))` on the stream after the
embedding and after every layer. Early layers usually predict something crude
(often the input token itself, or a frequent token); the prediction sharpens
layer by layer into the real one. After the last layer the lens *is* the model:
its logits equal `Model.logits` bit for bit (tests/test_watch.py).
"""

from dataclasses import dataclass

import numpy as np

from ..model import final_norm_name, norm
from ..trace import Recorder
from .inputs import for_picture, model_and_prompt, pieces, shown_path

# Recording budget: the embedding plus one (T, D) stream per layer; a 128-token
# prompt through Phi-3-mini's 32 layers of 3072 floats takes 52 MB.


def lens_logits(model, stream: np.ndarray) -> np.ndarray:
    """(T, D) residual stream -> (T, V) logits: the model's final norm and lm_head,
    the same two functions its last layer's output goes through."""
    return model.lm_head(norm(model.config, model.weights, final_norm_name(model.config), stream))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """softmax over the vocabulary in float64 (T, V)."""
    return np.exp(log_probabilities(logits))


def log_probabilities(logits: np.ndarray) -> np.ndarray:
    """log softmax over the vocabulary in float64 (T, V): exact where a probability
    underflows, so entropies and KL divergences stay finite."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Lens:
    """What each stream predicts. Rows: the embedding, then layers 0..L-1; columns:
    positions 0..T-1. `next_rank[r, t]` is where the actual next token ids[t + 1]
    stands in row r's ranking at position t (1 = its top choice; 0 when ids[t + 1]
    is an image placeholder, which no vocabulary entry predicts)."""

    rows: list[str]  # "embed", "layer 0", ...
    top_ids: np.ndarray  # (R, T) int64
    top_probs: np.ndarray  # (R, T)
    next_ranks: np.ndarray  # (R, T - 1) int64
    next_probs: np.ndarray  # (R, T - 1)
    top_pieces: list[list[str]]  # (R, T) the tokenizer's piece of each top id
    logits: np.ndarray  # (T, V) the model's own logits (= the last row's)
    last_logits: np.ndarray  # (T, V) what the lens computed from the last layer's stream
    entropy: np.ndarray  # (R, T) nats: how unsure each row's distribution is
    kl_to_final: np.ndarray  # (R, T) nats: KL(final || row), what the row still lacks of the model's answer


def logit_lens(model, ids: np.ndarray) -> Lens:
    """One forward over `ids`, then the lens on every recorded stream."""
    trace = Recorder(names=("embed", "resid_post", "logits"))
    model.logits(ids, trace)
    return lens_from_trace(model, ids, trace)


def lens_from_trace(model, ids: np.ndarray, trace: Recorder) -> Lens:
    """The lens of a recording that kept "embed", every layer's "resid_post" and "logits"."""
    logits = trace.get("logits")
    streams = [trace.get("embed")] + trace.per_layer("resid_post")
    rows = ["embed"] + [f"layer {i}" for i in range(len(streams) - 1)]
    nxt = np.append(np.asarray(ids[1:]), -1)  # the last position's next token is not known
    final = log_probabilities(logits)  # (T, V)
    measured = []
    for stream in streams:
        row_logits = lens_logits(model, stream)  # (T, V); after the loop, the last layer's
        measured.append(measures(log_probabilities(row_logits), final, nxt))
    top_ids, top_probs, entropy, kl, next_ranks, next_probs = (np.array(m) for m in zip(*measured))
    top_pieces = [pieces(model.tokenizer, row) for row in top_ids]
    return Lens(
        rows, top_ids, top_probs, next_ranks[:, :-1], next_probs[:, :-1], top_pieces, logits, row_logits, entropy, kl,
    )


def measures(log_p: np.ndarray, final: np.ndarray, next_ids: np.ndarray):
    """What lens rows say at each position, from their log-probabilities (..., T, V) and
    the model's own (final, (T, V)): the top id and its probability, the entropy (nats),
    the KL divergence KL(final || row) (nats), and the rank (1 = top) and probability of
    `next_ids` (T,), the token that really came next (rank 0 and probability 0 where it
    is not known, -1, or is an image placeholder, < 0). Each result has the shape (..., T)."""
    T = log_p.shape[-2]
    p = np.exp(log_p)
    top = p.argmax(axis=-1)
    known = next_ids >= 0
    nxt = np.where(known, next_ids, 0)
    at = (np.arange(T), nxt)
    actual = log_p[..., at[0], at[1]]  # (..., T); log-softmax keeps the logits' order
    ranks = np.where(known, 1 + np.count_nonzero(log_p > actual[..., None], axis=-1), 0)
    finite = np.maximum(log_p, np.finfo(np.float64).min)  # 0 * log 0 counts as 0, not NaN
    final_p, final_finite = np.exp(final), np.maximum(final, np.finfo(np.float64).min)
    entropy = -np.einsum("...v,...v->...", p, finite)
    # KL(final || row) = sum final_p * final - sum final_p * row, one pass over the rows
    kl = np.einsum("tv,tv->t", final_p, final_finite) - np.einsum("tv,...tv->...t", final_p, finite)
    kl = np.maximum(kl, 0.0)  # >= 0 by definition; rounding may land at -1e-16 for equal rows
    top_p = np.take_along_axis(p, top[..., None], axis=-1)[..., 0]
    return top, top_p, entropy, kl, ranks, np.where(known, p[..., at[0], at[1]], 0.0)


def most_likely(p: np.ndarray, k: int) -> np.ndarray:
    """(T, V) probabilities -> (T, k) ids, most likely first (ties: the smaller id first).
    argpartition finds the k, so a long prompt's rows are never sorted whole."""
    k = min(k, p.shape[-1])
    best = np.argpartition(-p, k - 1, axis=-1)[:, :k]  # (T, k), unordered
    order = np.lexsort((best, -np.take_along_axis(p, best, axis=-1)), axis=-1)
    return np.take_along_axis(best, order, axis=-1)


def top_k(logits_row: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely ids after one position, with their probabilities."""
    p = probabilities(logits_row[None, :])[0]
    best = np.argsort(-p, kind="stable")[:k]
    return [(int(i), float(p[i])) for i in best]


def format_lens(lens: Lens, labels: list[str], last: int) -> str:
    """Rows = streams, columns = the last `last` positions: each cell is the top token,
    its probability, and #rank of the token that really comes next."""
    T = lens.top_ids.shape[1]
    cols = list(range(max(0, T - last), T))
    table = [
        ["position"] + [str(t) for t in cols],
        ["input"] + [repr(labels[t]) for t in cols],
        ["next"] + [repr(labels[t + 1]) if t + 1 < T else "?" for t in cols],
    ]
    for r, name in enumerate(lens.rows):
        table.append([name] + [
            f"{lens.top_pieces[r][t]!r} {lens.top_probs[r, t]:.2f}" + (f" #{lens.next_ranks[r, t]}" if t < T - 1 else "")
            for t in cols
        ])
    widths = [max(len(row[c]) for row in table) + 2 for c in range(len(table[0]))]
    lines = ["top prediction of each layer's residual stream (probability, #rank of the actual next token)"]
    lines += ["".join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in table]
    if len(cols) < T:
        lines.append(f"(the last {len(cols)} of {T} positions; --last N shows more)")
    return "\n".join(lines)


def run_lens(args) -> int:
    model, ids = model_and_prompt(args)
    if args.png:
        ids = for_picture(ids, "the lens picture")
    lens = logit_lens(model, ids)
    labels = pieces(model.tokenizer, ids)
    print(f"{shown_path(model.path)}: {len(ids)} tokens, {len(lens.rows) - 1} layers")
    print(format_lens(lens, labels, max(1, args.last)))
    print()
    print("next token after the prompt (the model's own probabilities, before any sampling setting):")
    for token, p in top_k(lens.logits[-1], max(1, args.top_k)):
        print(f"  {p:7.4f}  {model.tokenizer.token_piece(token)!r} (id {token})")
    if args.png:
        from .plots import lens_figure, save

        save(lens_figure(lens, labels), args.png, "--png")
    return 0
