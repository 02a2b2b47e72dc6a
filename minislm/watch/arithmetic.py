"""Attention's arithmetic for one query and one head, in the order the code computes it.

    q, k        after RoPE: each dimension pair (i, i + d/2) turned by position * inv_freq[i]
    scores      q . k for every cached key, times the model's scale (1/sqrt(hd); Phi-3-small: its muP scale)
    mask        which keys the query may read: causal, a sliding window, Phi-3-small's blocks
    softmax     exp(score - max) / sum over the allowed keys
    output      sum over keys of probability * v

The inputs are what the forward really used: the query the recorder kept from the
forward that computed it, the keys and values as the cache stores them (widened from
float16 or int8 the way the plain path reads them), and the mask from the model's own
`attention_mask`. The page shows each line next to what the library computes (the
probabilities of `model.attention_probabilities`, the output of the fast kernel in the
forward), and links each to the function that computes it, with line numbers read
from the source so they cannot go stale.
"""

import inspect
from pathlib import Path

import numpy as np

from .. import model as spine
from .. import sampling, speculative
from ..blocksparse import is_dense_layer, token_mask
from ..kernels import attention as kernel
from .session import attention_rows

def source_link(function) -> str:
    """'model.py#L220': where `function` starts, for the explorer's /source/ pages."""
    path = Path(inspect.getsourcefile(function)).resolve()
    name = SOURCE_FILES_BY_PATH.get(path)
    return f"{name}#L{inspect.getsourcelines(function)[1]}" if name else ""

# The only files the explorer serves (under /source/NAME): the ones its links point into.
SOURCE_FILES = {"model.py": Path(spine.__file__).resolve(), "kernels/attention.py": Path(kernel.__file__).resolve(),
                "sampling.py": Path(sampling.__file__).resolve(), "speculative.py": Path(speculative.__file__).resolve()}
SOURCE_FILES_BY_PATH = {path: name for name, path in SOURCE_FILES.items()}

def arithmetic(run, layer: int, head: int, query: int) -> dict:
    """Every intermediate number of one head's attention for the query at position
    `query`, over the keys cached now (those after the query are masked, as they were
    not there or not allowed when it was computed)."""
    config, cache = run.model.config, run.cache
    S = cache.length
    G = config.num_attention_heads // config.num_key_value_heads
    kv = head // G
    rope = config.rope
    long = bool(cache.rope_long)
    q = run.q[layer][head, query].astype(np.float64)  # (hd,) after RoPE
    keys, values = cache.read(layer, S)  # (KV, S, hd)
    k = keys[kv].astype(np.float64)  # (S, hd)
    v = values[kv].astype(np.float64)
    raw = k @ q  # (S,)
    scale = spine.attention_scale(config)
    scores = raw * scale
    allowed = spine.attention_mask(np.array([query]), S, config.sliding_window)[0]  # (S,)
    if config.phi3small is not None and not is_dense_layer(config, layer):
        allowed = token_mask(config, np.array([query]), S)[head, 0]
    masked = np.where(allowed, scores, -np.inf)
    e = np.exp(masked - masked.max())
    p = e / e.sum()
    out = p @ v  # (hd,)
    angles = spine.rope_angles(rope, np.arange(S), long)[:, : rope.rotary_dim // 2]  # (S, d/2) radians, every position
    scales = rope.long_scale if long else rope.short_scale
    return {
        "layer": layer, "head": head, "kv_head": kv, "query": query, "keys": S, "head_dim": config.head_dim,
        "q": q.tolist(), "k": k.tolist(), "v": v.tolist(),
        "rope": {"angles": angles[query].tolist(), "key_angles": angles.tolist(), "rotary_dim": rope.rotary_dim,
                 "scale": float(scales),
                 "inv_freq": spine.rope_inv_freq(rope, long).astype(np.float64).tolist(), "long": long},
        "raw": raw.tolist(), "scale": float(scale), "scores": scores.tolist(),
        "allowed": allowed.tolist(), "probabilities": p.tolist(),
        "library": attention_rows(run, layer, [query])[head, 0].astype(np.float64).tolist(),
        "output": out.tolist(),
        "kernel_output": run.heads[layer][query, head * config.head_dim : (head + 1) * config.head_dim].astype(np.float64).tolist(),
        "cache_dtype": cache.dtype,
        "source": {
            "rope": source_link(spine.apply_rope), "angles": source_link(spine.rope_angles),
            "scores": source_link(spine.attention_probabilities), "scale": source_link(spine.attention_scale),
            "mask": source_link(spine.attention_mask), "softmax": source_link(spine.softmax),
            "output": source_link(spine.plain_attention), "kernel": source_link(kernel.attend_cached),
        },
    }

def source_page(name: str) -> str | None:
    """One of SOURCE_FILES as HTML with numbered, linkable lines; None for any other name
    (the page can never name a file of its own choosing)."""
    import html

    path = SOURCE_FILES.get(name)
    if path is None:
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    body = "\n".join(f'<span id="L{n}"><a href="#L{n}">{n:>4}</a>  {html.escape(line)}</span>'
                     for n, line in enumerate(lines, 1))
    return ("<!doctype html><meta charset='utf-8'><title>minislm/" + html.escape(name) + "</title>"
            "<style>body{font:13px/1.4 ui-monospace,monospace;margin:1em}a{color:#999;text-decoration:none}"
            "span:target{background:#ffe58a;display:block}</style><pre>" + body + "</pre>")
