"""The Phi-3 decoder in NumPy, read top to bottom like the paper.

    tokens -> embed -> N x [ x += attention(norm(x)); x += feed_forward(norm(x)) ]
           -> norm -> lm_head -> logits

Two members of the family share this spine and differ in three places, each an
`if config.model_type == "phimoe"` you can see:

    Phi-3 ("phi3")           norm = RMSNorm,  one fused qkv_proj,     feed-forward = one SwiGLU MLP
    Phi-3.5-MoE ("phimoe")   norm = LayerNorm, q/k/v/o_proj + biases, feed-forward = 2 of E experts

`forward()` is the spine; everything it calls is a small pure function named
after the paper's term. Weights are a dict keyed by the checkpoint's own tensor
names (`model.layers.0.self_attn.qkv_proj.weight`), so what you read here is what
is in the file. All math is float32, as in transformers' float32 reference.

Shapes: T = tokens in this forward, S = tokens in the cache after it,
D = hidden_size, H / KV = query / key-value heads, hd = head_dim, F = ffn size,
E = experts per layer (PhiMoE).
"""

from collections.abc import Iterator

import numpy as np

from .cache import KVCache
from .config import GenerationConfig, ModelConfig, RopeConfig
from .errors import MinislmError
from .moe import expert_prefix, group_by_expert, sparsemixer

# Queries are processed in blocks of this many so that the (heads, T, S) score
# matrix of a long prompt never needs more than ~heads * 256 * S floats at once.
QUERY_BLOCK = 256


# ---------------------------------------------------------------- building blocks


def linear(x: np.ndarray, w, bias=None) -> np.ndarray:
    """y = x @ w.T (+ bias) with the checkpoint's (out, in) layout. `w` is a float32 array
    or a packed weight from minislm.kernels (bf16, int4) that multiplies itself."""
    if not isinstance(w, np.ndarray):
        y = w.matmul(x)
    elif x.shape[0] == 1:  # decode: matrix-vector is BLAS's fast streaming path (gemv)
        y = (w @ x[0])[None, :]
    else:
        y = x @ w.T
    return y if bias is None else y + bias


def embed(embed_tokens, token_ids: np.ndarray) -> np.ndarray:
    """Row lookup: (V, D)[ids] -> (T, D)."""
    if isinstance(embed_tokens, np.ndarray):
        return np.asarray(embed_tokens[token_ids], dtype=np.float32)
    return embed_tokens.rows(token_ids)


def rms_norm(x: np.ndarray, weight, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, per token. No mean subtraction, no bias."""
    variance = np.mean(x * x, axis=-1, keepdims=True)  # (T, 1)
    return weight * (x / np.sqrt(variance + eps))


def layer_norm(x: np.ndarray, weight, bias, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias, per token: PhiMoE's norm."""
    centered = x - np.mean(x, axis=-1, keepdims=True)  # (T, D)
    variance = np.mean(centered * centered, axis=-1, keepdims=True)  # (T, 1)
    return weight * (centered / np.sqrt(variance + eps)) + bias


def norm(config: ModelConfig, weights: dict, name: str, x: np.ndarray) -> np.ndarray:
    """The norm `name` (e.g. "model.norm"): RMSNorm in Phi-3, LayerNorm with a bias in
    PhiMoE. Both take their eps from config.json's `rms_norm_eps`."""
    if config.model_type == "phimoe":
        return layer_norm(x, weights[name + ".weight"], weights[name + ".bias"], config.rms_norm_eps)
    return rms_norm(x, weights[name + ".weight"], config.rms_norm_eps)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid written via tanh so large |x| cannot overflow exp."""
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / sum, so the largest term is exp(0) = 1 and nothing overflows.

    Probabilities below float32's smallest normal number (~1e-38) are set to 0:
    as subnormals they change no result, but they make the next matmul (probs @ v)
    about 60x slower on x86 (measured), and peaked attention produces many.
    """
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))  # -inf (masked) -> exp = 0
    p = e / np.sum(e, axis=axis, keepdims=True)
    p[p < np.finfo(np.float32).tiny] = 0.0
    return p


# ---------------------------------------------------------------- rotary embedding


def rope_inv_freq(rope: RopeConfig, long: bool) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, divided by LongRoPE's per-frequency factors.

    Computed in float32 exactly as transformers does, since a different rounding of
    these frequencies becomes a visible logit difference at long positions.
    """
    d = rope.rotary_dim
    exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)  # (d/2,)
    base = np.float32(rope.theta) ** exponent
    if rope.kind == "longrope":
        factors = rope.long_factor if long else rope.short_factor
        base = np.asarray(factors, dtype=np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)


def use_long_factors(rope: RopeConfig, seq_len: int) -> bool:
    """LongRoPE's switch, as transformers decides it: long factors once the sequence
    (max position + 1) is longer than the context the model was pretrained on."""
    return rope.kind == "longrope" and seq_len > rope.original_max_position_embeddings


def rope_angles(rope: RopeConfig, positions: np.ndarray, long: bool) -> np.ndarray:
    """(T,) positions -> (T, rotary_dim) angles; each frequency appears twice because
    rotate-half pairs dim i with dim i + d/2."""
    freqs = positions.astype(np.float32)[:, None] * rope_inv_freq(rope, long)[None, :]  # (T, d/2)
    return np.concatenate([freqs, freqs], axis=-1)  # (T, d)


def rope_tables(rope: RopeConfig, positions: np.ndarray, long: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (T, rotary_dim), times LongRoPE's attention scale (1.0 for plain RoPE)."""
    angles = rope_angles(rope, positions, long)
    scale = rope.long_scale if long else rope.short_scale
    return np.cos(angles) * scale, np.sin(angles) * scale


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first rotary_dim dims of each head; the rest pass through (partial rotary).

    x: (heads, T, hd); cos, sin: (T, rotary_dim). Rotate-half convention: dim i and
    dim i + d/2 form a pair, NOT adjacent dims (2i, 2i+1) as in llama2.c/gpt-fast.
    Using the wrong one still gives plausible first tokens, then gibberish.
    """
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = x_rot[..., : d // 2], x_rot[..., d // 2 :]
    rotated_half = np.concatenate([-x2, x1], axis=-1)  # (heads, T, d)
    return np.concatenate([x_rot * cos + rotated_half * sin, x_pass], axis=-1)


# ---------------------------------------------------------------- attention


def attention_mask(q_positions: np.ndarray, n_keys: int, sliding_window: int | None) -> np.ndarray:
    """(T, S) booleans, True where query q may attend to key k: causal (k <= q) and,
    with a sliding window w, only the last w positions (q - w < k), as in transformers."""
    k = np.arange(n_keys)[None, :]
    q = q_positions[:, None]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return allowed


def grouped_query_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray, scale: float
) -> np.ndarray:
    """softmax(q k^T * scale + mask) v, where each kv head serves H / KV query heads.

    q: (H, T, hd); keys, values: (KV, S, hd); allowed: (T, S) -> (H, T, hd).
    Query heads h = kv * G + g all use kv head `kv` (transformers' repeat_kv), so
    stacking a kv head's G query heads into one matrix lets one matmul serve them
    all, without copying keys G times.
    """
    H, T, hd = q.shape
    KV, S, _ = keys.shape
    G = H // KV
    q = q.reshape(KV, G * T, hd)
    scores = (q @ keys.transpose(0, 2, 1)) * scale  # (KV, G*T, S)
    scores = scores.reshape(KV, G, T, S)
    scores = np.where(allowed, scores, -np.inf)
    probs = softmax(scores, axis=-1).reshape(KV, G * T, S)
    return (probs @ values).reshape(H, T, hd)  # (KV, G*T, hd) -> (H, T, hd)


def project_qkv(config: ModelConfig, weights: dict, layer: str, x: np.ndarray):
    """Queries (T, H*hd), keys and values (T, KV*hd) of one layer.

    Phi-3 stores the three projections as one matrix `qkv_proj`, rows [q | k | v];
    PhiMoE as `q_proj`, `k_proj`, `v_proj`, each with a bias when attention_bias.
    """
    attn = layer + "self_attn."
    if config.model_type == "phimoe":
        return tuple(linear(x, weights[f"{attn}{p}_proj.weight"], weights.get(f"{attn}{p}_proj.bias")) for p in "qkv")
    q_size, kv_size = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    qkv = linear(x, weights[attn + "qkv_proj.weight"])  # (T, q_size + 2 * kv_size)
    return np.split(qkv, [q_size, q_size + kv_size], axis=-1)


def attention(q, k, v, config: ModelConfig, cache: KVCache, layer: int, cos, sin, positions) -> np.ndarray:
    """Self-attention of one layer, reading and extending the cache: q (T, H*hd) and
    k, v (T, KV*hd) -> each query head's mix of values, side by side (T, H*hd)."""
    T = q.shape[0]
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = q.reshape(T, H, hd).transpose(1, 0, 2)  # (H, T, hd)
    k = k.reshape(T, KV, hd).transpose(1, 0, 2)  # (KV, T, hd)
    v = v.reshape(T, KV, hd).transpose(1, 0, 2)  # (KV, T, hd)

    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    keys, values = cache.store(layer, k, v)  # (KV, S, hd) each

    out = np.empty((H, T, hd), dtype=np.float32)
    for start in range(0, T, QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        allowed = attention_mask(positions[block], keys.shape[1], config.sliding_window)
        out[:, block] = grouped_query_attention(q[:, block], keys, values, allowed, hd**-0.5)
    return out.transpose(1, 0, 2).reshape(T, H * hd)  # heads side by side again; o_proj follows


# ---------------------------------------------------------------- feed-forward


def mlp(x: np.ndarray, gate_up_proj, down_proj) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused in one matrix.

    gate_up_proj rows are [gate (F) | up (F)]: gate is the FIRST half.
    """
    gate_up = linear(x, gate_up_proj)  # (T, 2F)
    gate, up = np.split(gate_up, 2, axis=-1)  # (T, F) each
    return linear(silu(gate) * up, down_proj)  # (T, D)


def expert_mlp(x: np.ndarray, w1, w3, w2) -> np.ndarray:
    """One PhiMoE expert: the same SwiGLU with gate and up as two matrices,
    w2(silu(w1 x) * w3 x). (Mixtral's names: w1 = gate, w3 = up, w2 = down.)"""
    return linear(silu(linear(x, w1)) * linear(x, w3), w2)  # (n, F) -> (n, D)


def moe(x: np.ndarray, weights: dict, layer: str, config: ModelConfig, expert_trace: list | None = None) -> np.ndarray:
    """PhiMoE's feed-forward: the router sends each token to 2 of the E experts, and
    the output is their sum, each times its routing weight (see `moe.sparsemixer`).

    Each chosen expert runs once, on all of its tokens at once; experts nobody chose
    are never looked up, so a decode step reads the weights of 2 experts, not E. If `expert_trace` is a list, this layer's (experts, weights),
    (T, 2) each, is appended to it.
    """
    scores = linear(x, weights[layer + "block_sparse_moe.gate.weight"])  # (T, E) router logits
    experts, gates = sparsemixer(scores, config.router_jitter_noise)  # (T, 2) ids, (T, 2) weights
    if expert_trace is not None:
        expert_trace.append((experts, gates))
    out = np.zeros_like(x)  # (T, D)
    for expert, rows, slots in group_by_expert(experts):
        name = expert_prefix(layer, expert)
        y = expert_mlp(x[rows], weights[name + "w1.weight"], weights[name + "w3.weight"], weights[name + "w2.weight"])
        out[rows] += gates[rows, slots, None] * y  # (n, D), added in expert order as transformers does
    return out


# ---------------------------------------------------------------- the spine


def forward(
    config: ModelConfig,
    weights: dict,
    token_ids: np.ndarray,
    cache: KVCache,
    hidden_states: list | None = None,
    expert_trace: list | None = None,
) -> np.ndarray:
    """Run T new tokens through the decoder, after the cache.length tokens already cached.

    Returns the final normed hidden states (T, D); `lm_head` turns them into logits.
    If `hidden_states` is a list, the residual stream after the embedding and after
    each layer is appended to it (used by `minislm verify` to find a diverging layer).
    If `expert_trace` is a list, each PhiMoE layer appends its routing to it (`moe`).
    """
    w = weights
    T = len(token_ids)
    long = use_long_factors(config.rope, cache.length + T)
    if cache.length and long != cache.rope_long:
        return recompute_with_new_rope(config, weights, token_ids, cache, hidden_states, expert_trace)
    positions = np.arange(cache.length, cache.length + T)  # (T,)
    cos, sin = rope_tables(config.rope, positions, long)  # (T, rotary_dim) each

    x = embed(w["model.embed_tokens.weight"], token_ids)  # (T, D)
    if hidden_states is not None:
        hidden_states.append(x)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        h = norm(config, w, layer + "input_layernorm", x)
        q, k, v = project_qkv(config, w, layer, h)  # (T, H*hd), (T, KV*hd), (T, KV*hd)
        heads = attention(q, k, v, config, cache, i, cos, sin, positions)  # (T, H*hd)
        x = x + linear(heads, w[layer + "self_attn.o_proj.weight"], w.get(layer + "self_attn.o_proj.bias"))
        h = norm(config, w, layer + "post_attention_layernorm", x)
        if config.model_type == "phimoe":
            x = x + moe(h, w, layer, config, expert_trace)
        else:
            x = x + mlp(h, w[layer + "mlp.gate_up_proj.weight"], w[layer + "mlp.down_proj.weight"])
        if hidden_states is not None:
            hidden_states.append(x)
    cache.advance(token_ids, long)
    return norm(config, w, "model.norm", x)  # (T, D)


def recompute_with_new_rope(config, weights, token_ids, cache, hidden_states, expert_trace) -> np.ndarray:
    """The sequence just crossed LongRoPE's switch point: start again from token 0.

    A full forward over the longer sequence rotates *every* position with the other
    factor set, so the cached keys are stale. Re-rotating them is not enough: from
    layer 1 on, the cached keys and values of earlier tokens were computed from
    attention outputs that used the old rotation, and those change too. The only way
    to get what a full forward gives is to run one, once, over all cached tokens plus
    the new ones. transformers' generate() does the same (it drops its cache).
    """
    all_ids = np.concatenate([cache.tokens[: cache.length], token_ids])
    cache.truncate(0)
    hidden = forward(config, weights, all_ids, cache, hidden_states, expert_trace)
    return hidden[-len(token_ids) :]


def lm_head(config: ModelConfig, weights: dict, hidden: np.ndarray) -> np.ndarray:
    """(T, D) -> (T, V) logits. Tied models (Phi-4-mini) reuse the embedding matrix;
    PhiMoE adds a bias (lm_head_bias)."""
    name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    return linear(hidden, weights[name], weights.get("lm_head.bias"))


# ---------------------------------------------------------------- the loaded model


class Model:
    """A loaded checkpoint: config + weights + tokenizer (see `minislm.load`)."""

    def __init__(self, config: ModelConfig, weights: dict, tokenizer=None, generation_config=None, path=None, quant=None):
        self.config = config
        self.weights = weights
        self.quant = quant  # None (float32) or the QuantConfig of the packed matrices
        self.tokenizer = tokenizer
        self.generation_config = generation_config or GenerationConfig(eos_token_ids=config.eos_token_ids)
        self.path = path

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity)

    def check_ids(self, token_ids) -> np.ndarray:
        """A 1-D sequence of integer ids in [0, vocab_size) as int64. Anything else is
        refused, not coerced: 2-D ids would be flattened, floats truncated, bools read as
        ids 0 and 1."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise ValueError(f"token ids must be a 1-D sequence, got an array of shape {ids.shape}")
        if ids.size == 0:
            return ids.astype(np.int64)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise MinislmError(f"token ids must lie in [0, {self.config.vocab_size}), got {ids.min()}..{ids.max()}")
        return ids.astype(np.int64)

    def forward(
        self, token_ids, cache: KVCache, hidden_states: list | None = None, expert_trace: list | None = None
    ) -> np.ndarray:
        """Hidden states (T, D) of new tokens appended to `cache`."""
        return forward(self.config, self.weights, self.check_ids(token_ids), cache, hidden_states, expert_trace)

    def lm_head(self, hidden: np.ndarray) -> np.ndarray:
        return lm_head(self.config, self.weights, hidden)

    def logits(self, token_ids) -> np.ndarray:
        """Full forward from an empty cache: float32 logits (T, vocab_size)."""
        from .finite import check_logits

        ids = self.check_ids(token_ids)
        if ids.size == 0:
            raise ValueError("logits() needs at least one token id")
        if len(ids) > self.config.max_position_embeddings:
            raise MinislmError(
                f"logits() got {len(ids)} token ids; the model's context is {self.config.max_position_embeddings} "
                "(max_position_embeddings)"
            )
        cache = self.new_cache(len(ids))
        logits = np.ascontiguousarray(self.lm_head(self.forward(ids, cache)), dtype=np.float32)
        check_logits(self, logits, ids)
        return logits

    def generate(
        self,
        token_ids,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k=None,
        top_p=None,
        seed=None,
        repetition_penalty: float | None = None,
    ) -> Iterator[int]:
        """Yield new token ids after `token_ids`: greedy at temperature 0, else sampled.

        Runs through the KV cache (one prefill, then one forward per token) and stops
        after an end-of-sequence id from generation_config.json, as transformers does.
        Like transformers' `generate`, it applies the repetition penalty that
        generation_config.json asks for (the shipped Shakespeare model asks for 1.2,
        hub Phi-3 models for none), so greedy here equals `generate(do_sample=False)`
        there; pass `repetition_penalty=1.0` for plain argmax decoding.

        Arguments are checked when you call it (a bad one raises here, not at the
        first `next()`); the tokens come from the returned iterator.
        """
        from .generate import check_context, generate_tokens
        from .sampling import Sampler, SamplingSettings

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if repetition_penalty is None:
            repetition_penalty = self.generation_config.repetition_penalty
        settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        sampler = Sampler(settings, seed=seed)
        ids = self.check_ids(token_ids)
        if ids.size == 0:
            raise ValueError("generate() needs at least one token id")
        check_context(len(ids), 0, self.config.max_position_embeddings)
        return generate_tokens(self, ids, max_new_tokens, sampler, stop_ids=self.generation_config.eos_token_ids)
