"""`python -m minislm attention PROMPT --layer L [--head H]`: where each token looks.

Row t of a head's map is the softmax that mixes the values of positions 0..t
into position t's output: each row sums to 1, and everything right of the
diagonal is 0 (the causal mask; a sliding window also zeroes the far left). The
probabilities come from the recorder, which computes them with the plain
definition (`model.attention_probabilities`) for the heads asked for only.

In Phi-3-small's sparse layers each head also skips whole blocks of keys
(minislm/blocksparse.py): the picture shades them, from the same `token_mask` the
recorder's probabilities used, so the staircase of local blocks and the per-head
vertical stripes are what the model computed.
"""

import numpy as np

from ..blocksparse import is_dense_layer, token_mask
from ..errors import MinislmError
from ..trace import Recorder
from .inputs import check_layer, for_picture, model_and_prompt, pieces, shown_path


def attention_maps(model, ids: np.ndarray, layer: int, heads=None) -> np.ndarray:
    """(h, T, T) attention probabilities of one layer over the prompt (all heads by default)."""
    trace = Recorder(names=("attn_probs",), layers=[layer], heads=heads)
    model.logits(ids, trace)
    return trace.get("attn_probs", layer)


def skipped_blocks(model, n_tokens: int, layer: int, heads: list[int]) -> np.ndarray | None:
    """(h, T, T) True where a Phi-3-small sparse layer's pattern skips a key the causal
    mask would allow; None for a dense layer or another model."""
    config = model.config
    if config.phi3small is None or is_dense_layer(config, layer):
        return None
    causal = np.tril(np.ones((n_tokens, n_tokens), bool))
    return causal & ~token_mask(config, np.arange(n_tokens), n_tokens)[heads]


def describe_pattern(model, layer: int, skipped: np.ndarray | None) -> str:
    """One line on the layer's attention pattern (Phi-3-small), with the share of
    causally visible (query, key) pairs the pattern skipped here, computed from the mask."""
    s = model.config.phi3small
    if s is None:
        return ""
    if skipped is None:
        return f"layer {layer} attends densely (dense_attention_every_n_layers = {s.dense_every})"
    T = skipped.shape[1]
    share = skipped.sum() / (len(skipped) * T * (T + 1) / 2)
    return (f"layer {layer} is block-sparse: blocks of {s.block_size}, the last {s.local_blocks} blocks plus every "
            f"{s.vert_stride}th block (shifted per head{'; all heads alike' if s.homo_head else ''}); "
            f"it skips {share:.0%} of the causally visible pairs of this prompt")


def format_rows(probs: np.ndarray, heads: list[int], labels: list[str], top: int) -> str:
    """One line per query position: for one head its `top` most attended keys, for
    several heads each head's most attended key."""
    lines = []
    for t, label in enumerate(labels):
        if len(heads) == 1:
            row = probs[0, t]
            best = np.argsort(-row, kind="stable")[:top]
            cells = [f"{k} {labels[k]!r} {row[k]:.2f}" for k in best if row[k] > 0]
        else:
            cells = [f"h{h}:{int(probs[n, t].argmax())} {probs[n, t].max():.2f}" for n, h in enumerate(heads)]
        lines.append(f"{t:>4} {label!r:<14} -> " + ("  |  " if len(heads) == 1 else "  ").join(cells))
    return "\n".join(lines)


def run_attention(args) -> int:
    model, ids = model_and_prompt(args)
    config = model.config
    layer = check_layer(args.layer, config.num_hidden_layers)
    if args.head is not None and not 0 <= args.head < config.num_attention_heads:
        raise MinislmError(f"--head: head {args.head} does not exist; the model has query heads 0..{config.num_attention_heads - 1}")
    heads = list(range(config.num_attention_heads)) if args.head is None else [args.head]
    if args.png:
        ids = for_picture(ids, "the attention picture")
    probs = attention_maps(model, ids, layer, heads)
    skipped = skipped_blocks(model, len(ids), layer, heads)
    labels = pieces(model.tokenizer, ids)
    group = config.num_attention_heads // config.num_key_value_heads
    print(
        f"{shown_path(model.path)}: layer {layer}, {len(ids)} tokens; "
        + (f"head {heads[0]} (reads key/value head {heads[0] // group})" if len(heads) == 1
           else f"{len(heads)} query heads, {group} per key/value head")
    )
    if model.config.phi3small is not None:
        print(describe_pattern(model, layer, skipped))
    if len(heads) == 1:
        print(f"query -> the {args.top} keys it attends to most (position, piece, probability)")
    else:
        print("query -> for each head h, the key it attends to most (h<head>:<position> <probability>)")
    print(format_rows(probs, heads, labels, max(1, args.top)))
    if args.png:
        from .plots import attention_figure, save

        save(attention_figure(probs, heads, labels, layer, skipped), args.png, "--png")
    return 0

