"""The context sweep: decode speed with 128, 1k, 2k and 4k positions already cached.

A decode step reads every weight once *and* the keys and values of every
position its attention sees. At 128 positions the cache is noise; at 4k,
Phi-3-mini's float32 cache would be 3 GB a step, more than its int4 weights.
So each point of the sweep reports decode tok/s and the KV bytes a step read,
as the engine stores them (minislm: its cache dtype; llama.cpp: F16;
transformers: bf16) over the positions it attends to (a sliding window, if the
engine honours it), and the roofline becomes

    tok/s <= bandwidth / (weight bytes per token + KV bytes per token)

Procedure, per engine, in one worker process, in this order:
    warm-up   reset, 8 ids, 2 steps (JIT compilation, first allocations)
    for each context c, ascending:
        extend the cache to c positions with random ids (prefill chunks of at
        most CHUNK ids; timed separately: prefill speed at that depth)
        `tokens` greedy decode steps, timed one by one, each extending the cache
The cache grows from one context to the next, so the whole sweep prefills the
largest context once. A context larger than the model's allows is lowered to
what fits, and the table says the context it measured.
"""

import time

import numpy as np

from .measure import PROMPT_ID_LIMIT

CHUNK = 512  # ids per extend while filling the cache (llama.cpp's default batch)
WARMUP_IDS, WARMUP_STEPS = 8, 2


def fill(decoder, rng, n: int, high: int):
    """Extend the cache by n random ids in chunks; return the last logits and the seconds."""
    logits, start = None, time.perf_counter()
    for begin in range(0, n, CHUNK):
        logits = decoder.extend(rng.integers(3, high, size=min(CHUNK, n - begin)).tolist())
    return logits, time.perf_counter() - start


def sweep(decoder, contexts, tokens: int, vocab_size: int, max_positions: int, seed: int = 0) -> list[dict]:
    """Decode tok/s and KV bytes per step at each context (see the module docstring)."""
    rng = np.random.default_rng(seed)
    high = min(vocab_size, PROMPT_ID_LIMIT)
    decoder.reset()
    logits, _ = fill(decoder, rng, WARMUP_IDS, high)
    for _ in range(WARMUP_STEPS):
        logits = decoder.extend([int(np.argmax(logits))])
    decoder.reset()
    cached, points = 0, []
    for wanted in sorted(set(contexts)):
        context = min(wanted, max_positions - tokens)
        if context <= cached:
            continue
        logits, fill_s = fill(decoder, rng, context - cached, high)
        filled = context - cached
        seconds, kv = 0.0, 0
        for i in range(tokens):
            token = int(np.argmax(logits))
            start = time.perf_counter()
            logits = decoder.extend([token])
            seconds += time.perf_counter() - start
            kv += decoder.kv_bytes(context + i + 1)
        cached = context + tokens
        points.append({
            "context": int(wanted), "measured_at": int(context), "decode_tok_s": tokens / seconds,
            "kv_bytes_per_token": int(kv / tokens), "fill_tokens": int(filled), "fill_tok_s": filled / fill_s,
        })
    return points
