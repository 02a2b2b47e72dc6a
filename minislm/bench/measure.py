"""One timing procedure for every engine, so every clock starts and stops at the same place.

An engine is reduced to one function, `generate(prompt_ids, n, stats)`, that
yields n greedy token ids and fills a `GenerationStats` exactly as minislm's
own `generate_tokens` does: the prefill clock runs around the prompt's forward
and the logits of its last position; the decode clock around each later
forward and its logits; sampling (an argmax) is outside both. Decode tok/s
counts the n - 1 tokens that needed a decode forward.

Per engine we then run, in this order, in one process:
    warm-up   8-token prompt, 2 tokens, discarded (JIT compilation, first-call
              allocations, thread pools starting)
    prompt L1 (default 128): TTFT, prefill tok/s, then decode tok/s over n new tokens
    prompt L2 (default 512) and more: prefill tok/s and TTFT, one token each
Prompts are random ids from a seeded generator: every engine gets the same ones.
"""

import time

import numpy as np

from ..generate import GenerationStats

WARMUP_PROMPT, WARMUP_TOKENS = 8, 2
PROMPT_ID_LIMIT = 32000  # ordinary SentencePiece ids; no special tokens in the prompt


def greedy_tokens(prefill, step, prompt_ids, n: int, stats: GenerationStats):
    """`generate_tokens`' timing contract for engines other than minislm.

    prefill(ids) -> logits of the last prompt position, from an empty cache;
    step(token) -> logits of the next position, extending the cache.
    """
    stats.prompt_tokens = len(prompt_ids)
    start = time.perf_counter()
    logits = prefill(prompt_ids)
    stats.prefill_seconds = time.perf_counter() - start
    for i in range(n):
        token = int(np.argmax(logits))
        stats.generated_tokens += 1
        yield token
        if i == n - 1:
            return
        start = time.perf_counter()
        logits = step(token)
        stats.decode_seconds += time.perf_counter() - start


def prompts(lengths, vocab_size: int, seed: int = 0) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    high = min(vocab_size, PROMPT_ID_LIMIT)
    return {n: rng.integers(3, high, size=n).tolist() for n in lengths}


def measure(generate, prompt_lengths, new_tokens: int, vocab_size: int) -> dict:
    """Run the procedure above; return the timings (seconds, tok/s) as a dict."""
    lengths = list(prompt_lengths)
    ids = prompts([WARMUP_PROMPT, *lengths], vocab_size)
    start = time.perf_counter()
    warmup = generate(ids[WARMUP_PROMPT], WARMUP_TOKENS, GenerationStats())
    next(warmup)
    first_token_s = time.perf_counter() - start  # a short prompt's first token, compiling included
    for _ in warmup:
        pass
    result = {"warmup_s": time.perf_counter() - start, "warmup_first_token_s": first_token_s,
              "prefill_tok_s": {}, "ttft_ms": {}}
    for i, length in enumerate(lengths):
        stats = GenerationStats()
        start = time.perf_counter()
        tokens = generate(ids[length], new_tokens if i == 0 else 1, stats)
        first = next(tokens)
        result["ttft_ms"][str(length)] = (time.perf_counter() - start) * 1e3
        generated = [first, *tokens]
        result["prefill_tok_s"][str(length)] = stats.prefill_tokens_per_second
        if i == 0:
            result["decode_tok_s"] = stats.decode_tokens_per_second
            result["decode_prompt"] = length
            result["generated_tokens"] = len(generated)
    return result


def decode_bytes(tensor_bytes: dict[str, int], vocab_size: int, experts_read: float = 1.0) -> int:
    """Bytes of weights one decode step must read, from {tensor name: bytes stored}.

    Every matrix is read once, except:
    - the embedding table: one row per token (unless it doubles as the lm_head,
      a tied model, which then reads it all);
    - MoE experts: only the router's top-k of each layer, so a fraction
      `experts_read` = top_k / n_experts of the expert tensors (exact for one
      token: the router always picks k distinct experts).
    Names cover minislm/hub (`embed_tokens`, `lm_head`, `.experts.`), GGUF
    (`token_embd`, `output.weight`, `_exps.`) and transformers 5 (`.experts.`).
    """
    tied = not any(name in tensor_bytes for name in ("lm_head.weight", "output.weight"))
    total = 0.0
    for name, nbytes in tensor_bytes.items():
        if ("embed_tokens" in name or "token_embd" in name) and not tied:
            total += nbytes / vocab_size
        elif ".experts." in name or "_exps." in name:
            total += nbytes * experts_read
        else:
            total += nbytes
    return int(total)

def experts_fraction(config: dict) -> float:
    """Share of the expert weights one decoded token reads: top_k of n experts (1.0 if dense)."""
    experts = config.get("num_local_experts")
    return config["num_experts_per_tok"] / experts if experts else 1.0
