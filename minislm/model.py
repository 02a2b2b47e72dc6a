"""The Phi-3 decoder in NumPy, read top to bottom like the paper.

    tokens -> embed -> N x [ x += attention(norm(x)); x += feed_forward(norm(x)) ]
           -> norm -> lm_head -> logits

Three members of the family share this spine and differ in a few places, each an
`if config.model_type == ...` you can see:

    Phi-3 ("phi3")           norm = RMSNorm,  one fused qkv_proj,     feed-forward = one SwiGLU MLP
    Phi-3.5-MoE ("phimoe")   norm = LayerNorm, q/k/v/o_proj + biases, feed-forward = 2 of E experts
    Phi-3-small ("phi3small") norm = LayerNorm, query_key_value grouped per kv head + biases,
                             block-sparse attention in every other layer (minislm/blocksparse.py),
                             feed-forward = GEGELU MLP with biases, muP multipliers
                             (embeddings x10, attention scale 1/hd, logits / 8)

`forward()` is the spine; everything it calls is a small pure function named
after the paper's term. Weights are a dict keyed by the checkpoint's own tensor
names (`model.layers.0.self_attn.qkv_proj.weight`), so what you read here is what
is in the file. All math is float32, as in transformers' float32 reference.

Shapes: T = tokens in this forward, S = tokens in the cache after it,
D = hidden_size, H / KV = query / key-value heads, hd = head_dim, F = ffn size,
E = experts per layer (PhiMoE), V = vocab_size, L = layers.

Every tensor the spine reads (`weights.expected_shapes` checks a checkpoint against
this list), llama2.c's `TransformerWeights` written as a table:

    model.embed_tokens.weight                  (V, D)           rows are token embeddings
    model.layers.{i}.input_layernorm.weight    (D,)             (+ .bias in PhiMoE)
    model.layers.{i}.self_attn.qkv_proj.weight (H*hd + 2*KV*hd, D)  rows [q | k | v]  (Phi-3)
    model.layers.{i}.self_attn.{q,k,v}_proj.weight  (H*hd | KV*hd | KV*hd, D)  (PhiMoE, + .bias)
    model.layers.{i}.self_attn.o_proj.weight   (D, H*hd)        (+ .bias in PhiMoE)
    model.layers.{i}.post_attention_layernorm.weight (D,)       (+ .bias in PhiMoE)
    model.layers.{i}.mlp.gate_up_proj.weight   (2F, D)          rows [gate | up]  (Phi-3)
    model.layers.{i}.mlp.down_proj.weight      (D, F)           (Phi-3)
    model.layers.{i}.block_sparse_moe.gate.weight   (E, D)      the router (PhiMoE)
    model.layers.{i}.block_sparse_moe.experts.{e}.w1/w3.weight (F, D), .w2.weight (D, F)  (PhiMoE)
    model.norm.weight                          (D,)             (+ .bias in PhiMoE)
    lm_head.weight                             (V, D)           absent when tied to the embedding
    lm_head.bias                               (V,)             PhiMoE with lm_head_bias

Phi-3-small names its tensors its own way (`weights.phi3small_shapes`): every Linear and
LayerNorm has a bias; self_attn.query_key_value ((H + 2*KV)*hd, D), self_attn.dense (D, H*hd),
mlp.up_proj (2F, D), mlp.down_proj (D, F), model.final_layernorm; the embedding is the lm_head.

Norm gains and biases are always float32 arrays. A matrix is a `Weight`: either a
float32 array or a packed weight from minislm.kernels (bf16 words, int4 tiles) that
multiplies itself; `linear` and `embed` are the only places that tell them apart.

`trace` is an optional `minislm.trace.Recorder`: each `trace.record(...)` line below
names an intermediate value a learner can look at (`python -m minislm trace`).
Without one, `NO_TRACE` ignores those lines and nothing extra is computed.

This file is the math and nothing else: the loaded model that calls it, with its
checks and its generation policy, is minislm/runtime.py.
"""

from typing import NamedTuple, Protocol, Union

import numpy as np

from .blocksparse import forward_layout, is_dense_layer, token_mask
from .cache import KVCache
from .config import ModelConfig, RopeConfig
from .kernels.attention import attend_cached
from .kernels.blocksparse import attend_blocksparse
from .moe import expert_prefix, group_by_expert, sparsemixer


class PackedWeight(Protocol):
    """A matrix stored in fewer bits (minislm.kernels: Bf16Weight, Int4Weight) that
    knows how to multiply itself, so the decoder never unpacks it whole."""

    shape: tuple[int, int]  # (out, in), as the checkpoint stores the matrix

    def matmul(self, x: np.ndarray) -> np.ndarray: ...  # (T, in) -> (T, out) = x @ W.T

    def rows(self, ids: np.ndarray) -> np.ndarray: ...  # (n,) -> (n, in) float32 rows


Weight = Union[np.ndarray, PackedWeight]


class NoRecorder:
    """What the forward pass records into when nobody watches: nothing, so the spine
    needs no `if trace` lines. minislm.trace.Recorder keeps what it is asked for."""

    def begin(self, positions) -> None:
        pass

    def wants(self, name, layer=None, nbytes=0) -> bool:
        return False

    def record(self, name, value, layer=None) -> None:
        pass

    def attention_heads(self, layer, n_heads):
        return None


NO_TRACE = NoRecorder()


# ---------------------------------------------------------------- building blocks


def linear(x: np.ndarray, w: Weight, bias=None) -> np.ndarray:
    """y = x @ w.T (+ bias) with the checkpoint's (out, in) layout. `w` is a float32 array
    or a packed weight from minislm.kernels (bf16, int4) that multiplies itself."""
    if not isinstance(w, np.ndarray):
        y = w.matmul(x)
    elif x.shape[0] == 1:  # decode: matrix-vector is BLAS's fast streaming path (gemv)
        y = (w @ x[0])[None, :]
    else:
        y = x @ w.T
    return y if bias is None else y + bias


def embed(embed_tokens: Weight, token_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
    """Row lookup: (V, D)[ids] -> (T, D).

    Phi-3-vision: a position holding an image placeholder (a negative id, see
    minislm.vision.prompt) takes the next row of `image_features` (k, D) instead.
    """
    placeholders = token_ids < 0
    rows = np.where(placeholders, 0, token_ids)
    if isinstance(embed_tokens, np.ndarray):
        x = np.asarray(embed_tokens[rows], dtype=np.float32)
    else:
        x = embed_tokens.rows(rows)
    if placeholders.any():
        x[placeholders] = image_features  # (k, D): the image tokens, in position order
    return x


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
    PhiMoE and Phi-3-small. The eps is config.json's `rms_norm_eps` (Phi-3-small's
    `layer_norm_epsilon`)."""
    if config.model_type in ("phimoe", "phi3small"):
        return layer_norm(x, weights[name + ".weight"], weights[name + ".bias"], config.rms_norm_eps)
    return rms_norm(x, weights[name + ".weight"], config.rms_norm_eps)


def final_norm_name(config: ModelConfig) -> str:
    """The norm after the last layer: "model.final_layernorm" in Phi-3-small, else "model.norm"."""
    return "model.final_layernorm" if config.model_type == "phi3small" else "model.norm"


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
    scaled = positions.astype(np.float32) * np.float32(rope.position_scale)  # Phi-3-small's rope_position_scale
    freqs = scaled[:, None] * rope_inv_freq(rope, long)[None, :]  # (T, d/2)
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


def attention_probabilities(q: np.ndarray, keys: np.ndarray, allowed: np.ndarray, scale: float) -> np.ndarray:
    """softmax(q k^T * scale + mask), written plainly: q (H, T, hd), keys (KV, S, hd),
    allowed (T, S) -> (H, T, S), one row of weights over the keys per query and head.

    Each kv head serves G = H / KV query heads (grouped-query attention), so it is
    repeated G times, head h reading kv head h // G (transformers' `repeat_kv`).
    """
    G = q.shape[0] // keys.shape[0]
    keys = np.repeat(keys, G, axis=0)  # (H, S, hd)
    scores = (q @ keys.transpose(0, 2, 1)) * scale  # (H, T, S)
    return softmax(np.where(allowed, scores, -np.inf), axis=-1)


def plain_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray, scale: float) -> np.ndarray:
    """The definition of attention, with nothing clever: probabilities (H, T, S) times
    the values of each query head's kv head -> (H, T, hd). The model runs
    `attend_cached` (minislm.kernels.attention), which computes the same from the
    cache's own storage; tests/test_attention.py checks them equal."""
    G = q.shape[0] // keys.shape[0]
    return attention_probabilities(q, keys, allowed, scale) @ np.repeat(values, G, axis=0)


def project_qkv(config: ModelConfig, weights: dict, layer: str, x: np.ndarray):
    """Queries (T, H*hd), keys and values (T, KV*hd) of one layer.

    Phi-3 stores the three projections as one matrix `qkv_proj`, rows [q | k | v];
    PhiMoE as `q_proj`, `k_proj`, `v_proj`, each with a bias when attention_bias.
    Phi-3-small as one biased `query_key_value` whose rows come in KV groups, one per kv
    head: [G query heads | its key | its value], G = H / KV (so query head h sits in
    group h // G, which is also the kv head it reads).
    """
    attn = layer + "self_attn."
    if config.model_type == "phimoe":
        return tuple(linear(x, weights[f"{attn}{p}_proj.weight"], weights.get(f"{attn}{p}_proj.bias")) for p in "qkv")
    q_size, kv_size = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    if config.model_type == "phi3small":
        T, KV, hd = x.shape[0], config.num_key_value_heads, config.head_dim
        G = config.num_attention_heads // KV
        qkv = linear(x, weights[attn + "query_key_value.weight"], weights[attn + "query_key_value.bias"])
        groups = qkv.reshape(T, KV, G + 2, hd)  # per kv head: G queries, 1 key, 1 value
        q = groups[:, :, :G].reshape(T, q_size)  # (T, H*hd), head h = group h // G, slot h % G
        return q, groups[:, :, G].reshape(T, kv_size), groups[:, :, G + 1].reshape(T, kv_size)
    qkv = linear(x, weights[attn + "qkv_proj.weight"])  # (T, q_size + 2 * kv_size)
    return np.split(qkv, [q_size, q_size + kv_size], axis=-1)


def attention_scale(config: ModelConfig) -> float:
    """What q.k is multiplied by before the softmax: 1/sqrt(hd), except in Phi-3-small,
    whose muP scaling makes it mup_attn_multiplier / hd (1/128 for the real model)."""
    return config.phi3small.attention_scale if config.phi3small else config.head_dim**-0.5


def attention(q, k, v, config: ModelConfig, cache: KVCache, layer: int, cos, sin, allowed, trace=NO_TRACE,
              sparse=None) -> np.ndarray:
    """Self-attention of one layer, reading and extending the cache: q (T, H*hd) and
    k, v (T, KV*hd) -> each query head's mix of values, side by side (T, H*hd).

    `allowed` is the (T, S) mask of this forward. `attend_cached` computes
    `plain_attention` over the cache as it is stored (float32, float16 or int8),
    one pass over the keys and one over the values per kv head, reading only the
    keys between the first and the last that a query's mask row allows (with a
    sliding window, the last w); the (H, T, S) scores are never formed.

    Phi-3-small's sparse layers pass `sparse` = (layout (H, n, KB), first block) from
    `blocksparse.forward_layout`: `attend_blocksparse` then reads only the key blocks
    the layout allows each head (kernels/blocksparse.py).
    """
    T = q.shape[0]
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = q.reshape(T, H, hd).transpose(1, 0, 2)  # (H, T, hd)
    k = k.reshape(T, KV, hd).transpose(1, 0, 2)  # (KV, T, hd)
    v = v.reshape(T, KV, hd).transpose(1, 0, 2)  # (KV, T, hd)

    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    trace.record("q", q, layer)
    trace.record("k", k, layer)
    trace.record("v", v, layer)
    cache.store(layer, k, v)  # at positions [cache.length, cache.length + T)

    scale = attention_scale(config)
    if sparse is None:
        out = attend_cached(q, *cache.layer(layer), allowed, scale)  # (H, T, hd)
    else:
        layout, first_block = sparse
        positions = np.arange(cache.length, cache.length + T)
        out = attend_blocksparse(q, *cache.layer(layer), positions, layout, first_block, config.phi3small.block_size, scale)
    record_attention_probabilities(trace, layer, q, cache, allowed, scale, config if sparse is not None else None)
    return out.transpose(1, 0, 2).reshape(T, H * hd)  # heads side by side again; o_proj follows


def record_attention_probabilities(trace, layer: int, q, cache: KVCache, allowed, scale, sparse_config=None) -> None:
    """For a recorder only: the probabilities of the heads it asks for, computed again by
    the plain definition from the cache, so the attention that produced the output is
    left untouched and never has to form them. In a Phi-3-small sparse layer
    (`sparse_config` given) each head's mask is its own block pattern (`token_mask`)."""
    heads = trace.attention_heads(layer, q.shape[0])
    if heads is None or not trace.wants("attn_probs", layer, nbytes=4 * len(heads) * allowed.size):
        return
    T, S = allowed.shape
    keys, _ = cache.read(layer, S)  # (KV, S, hd) float32
    G = q.shape[0] // keys.shape[0]
    if sparse_config is not None:
        allowed = token_mask(sparse_config, np.arange(S - T, S), S)[heads]  # (h, T, S)
    trace.record("attn_probs", attention_probabilities(q[heads], keys[heads // G], allowed, scale), layer)


# ---------------------------------------------------------------- feed-forward


def mlp(x: np.ndarray, gate_up_proj: Weight, down_proj: Weight, trace=NO_TRACE, layer: int | None = None) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused in one matrix.

    gate_up_proj rows are [gate (F) | up (F)]: gate is the FIRST half.
    """
    gate_up = linear(x, gate_up_proj)  # (T, 2F)
    gate, up = np.split(gate_up, 2, axis=-1)  # (T, F) each
    trace.record("gate", gate, layer)
    trace.record("up", up, layer)
    return linear(silu(gate) * up, down_proj)  # (T, D)


def gegelu(u: np.ndarray, limit: float | None) -> np.ndarray:
    """Phi-3-small's activation: (T, 2F) -> (T, F).

    The columns of u are INTERLEAVED, not halves: even columns feed the gate, odd ones
    the linear part. Both are clamped at `limit` (the gate from above only, the linear
    part on both sides; infinities pass untouched), then

        quick_gelu(gate) * (linear + 1),   quick_gelu(g) = g * sigmoid(1.702 g)

    (the "+ 1" means a zero linear part lets the gate through unchanged).
    """
    gate, linear_part = u[:, 0::2], u[:, 1::2]  # (T, F) each
    if limit is not None:
        gate = np.where(np.isinf(gate), gate, np.minimum(gate, np.float32(limit)))
        linear_part = np.where(np.isinf(linear_part), linear_part, np.clip(linear_part, -np.float32(limit), np.float32(limit)))
    sigmoid = 0.5 + 0.5 * np.tanh(np.float32(0.5 * 1.702) * gate)  # sigmoid(1.702 g) without overflow
    return gate * sigmoid * (linear_part + 1)


def gegelu_mlp(x: np.ndarray, weights: dict, layer: str, limit: float | None, trace=NO_TRACE, index=None) -> np.ndarray:
    """Phi-3-small's feed-forward: down_proj(gegelu(up_proj(x))), both with biases."""
    u = linear(x, weights[layer + "mlp.up_proj.weight"], weights[layer + "mlp.up_proj.bias"])  # (T, 2F)
    trace.record("gate", u[:, 0::2], index)
    trace.record("up", u[:, 1::2], index)
    return linear(gegelu(u, limit), weights[layer + "mlp.down_proj.weight"], weights[layer + "mlp.down_proj.bias"])  # (T, D)


def expert_mlp(x: np.ndarray, w1: Weight, w3: Weight, w2: Weight) -> np.ndarray:
    """One PhiMoE expert: the same SwiGLU with gate and up as two matrices,
    w2(silu(w1 x) * w3 x). (Mixtral's names: w1 = gate, w3 = up, w2 = down.)"""
    return linear(silu(linear(x, w1)) * linear(x, w3), w2)  # (n, F) -> (n, D)


def moe(x: np.ndarray, weights: dict, layer: str, config: ModelConfig, trace=NO_TRACE, index: int | None = None) -> np.ndarray:
    """PhiMoE's feed-forward: the router sends each token to 2 of the E experts, and
    the output is their sum, each times its routing weight (see `moe.sparsemixer`).

    Each chosen expert runs once, on all of its tokens at once; experts nobody chose
    are never looked up, so a decode step reads the weights of 2 experts, not E.
    `index` is the layer's number, for the recorder.
    """
    scores = linear(x, weights[layer + "block_sparse_moe.gate.weight"])  # (T, E) router logits
    experts, gates = sparsemixer(scores, config.router_jitter_noise)  # (T, 2) ids, (T, 2) weights
    trace.record("router_logits", scores, index)
    trace.record("experts", experts, index)
    trace.record("expert_weights", gates, index)
    out = np.zeros_like(x)  # (T, D)
    for expert, rows, slots in group_by_expert(experts):
        name = expert_prefix(layer, expert)
        y = expert_mlp(x[rows], weights[name + "w1.weight"], weights[name + "w3.weight"], weights[name + "w2.weight"])
        out[rows] += gates[rows, slots, None] * y  # (n, D), added in expert order as transformers does
    return out


def feed_forward(config: ModelConfig, weights: dict, i: int, h: np.ndarray, trace=NO_TRACE) -> np.ndarray:
    """Layer i's feed-forward on normed rows h (T, D) -> (T, D): SwiGLU in Phi-3, two of
    the experts in PhiMoE, the GEGELU MLP in Phi-3-small."""
    layer = f"model.layers.{i}."
    if config.model_type == "phimoe":
        return moe(h, weights, layer, config, trace, i)
    if config.model_type == "phi3small":
        return gegelu_mlp(h, weights, layer, config.phi3small.gegelu_limit, trace, i)
    return mlp(h, weights[layer + "mlp.gate_up_proj.weight"], weights[layer + "mlp.down_proj.weight"], trace, i)


def output_projection(config: ModelConfig) -> str:
    """The name of the matrix that mixes the heads back into the residual stream."""
    return "self_attn.dense" if config.model_type == "phi3small" else "self_attn.o_proj"


# ---------------------------------------------------------------- the spine


def forward(
    config: ModelConfig, weights: dict, token_ids: np.ndarray, cache: KVCache, trace=NO_TRACE, image_features=None
) -> np.ndarray:
    """Run T new tokens through the decoder, after the cache.length tokens already cached.

    Returns the final normed hidden states (T, D); `lm_head` turns them into logits.
    Phi-3-vision: `image_features` (k, D) fill the k image placeholders (ids < 0).
    The cached tokens must have been rotated with the LongRoPE factor set this forward
    uses; `Model.forward` re-runs the whole sequence when a generation crosses the
    switch point (see `crosses_rope_switch`).
    """
    w = weights
    T = len(token_ids)
    positions = np.arange(cache.length, cache.length + T)  # (T,)
    long = use_long_factors(config.rope, cache.length + T)
    if cache.length and long != cache.rope_long:
        raise ValueError("the cached keys use the other LongRoPE factor set; run the whole sequence again")
    cos, sin = rope_tables(config.rope, positions, long)  # (T, rotary_dim) each
    allowed = attention_mask(positions, cache.length + T, config.sliding_window)  # (T, S)
    small = config.phi3small  # Phi-3-small's settings, None for the other models
    sparse = forward_layout(config, positions) if small else None  # its block pattern for these queries
    trace.begin(positions)

    x = embed(w["model.embed_tokens.weight"], token_ids, image_features)  # (T, D)
    if small and small.embedding_multiplier:
        x = x * np.float32(small.embedding_multiplier)  # muP: embeddings x10 in Phi-3-small
    if image_features is not None:
        trace.record("image_positions", positions[token_ids < 0])
    trace.record("embed", x)
    out_proj = output_projection(config)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        h = norm(config, w, layer + "input_layernorm", x)
        trace.record("attn_norm", h, i)
        q, k, v = project_qkv(config, w, layer, h)  # (T, H*hd), (T, KV*hd), (T, KV*hd)
        layer_sparse = sparse if small and not is_dense_layer(config, i) else None
        heads = attention(q, k, v, config, cache, i, cos, sin, allowed, trace, layer_sparse)  # (T, H*hd)
        trace.record("attn_heads", heads, i)
        a = linear(heads, w[layer + out_proj + ".weight"], w.get(layer + out_proj + ".bias"))  # (T, D)
        trace.record("attn_out", a, i)
        x = x + a
        trace.record("resid_mid", x, i)

        h = norm(config, w, layer + "post_attention_layernorm", x)
        trace.record("ffn_norm", h, i)
        f = feed_forward(config, w, i, h, trace)  # (T, D)
        trace.record("ffn_out", f, i)
        x = x + f
        trace.record("resid_post", x, i)
    cache.advance(token_ids, long, image_features)
    x = norm(config, w, final_norm_name(config), x)  # (T, D)
    trace.record("final_norm", x)
    return x


def forward_batch(config: ModelConfig, weights: dict, token_ids: np.ndarray, caches: list[KVCache]) -> np.ndarray:
    """One decode step of B sequences at once: token_ids (B,) holds the next token of
    each, caches[b] that sequence's own KV cache. Returns the final normed hidden
    states (B, D), row b what `forward(config, weights, token_ids[b:b+1], caches[b])`
    returns.

    Everything but attention treats a token as a row on its own (embedding, norms,
    projections, feed-forward), so the B rows go through each of them together, and
    each weight matrix is read once per step instead of once per sequence: that is
    what batching buys on a memory-bound decode. Attention is where the sequences
    differ: each reads its own cache at its own position, so it runs per sequence.

    For a row to get exactly the bits it gets alone, the matrices must multiply each
    row the way they multiply one: pass weights whose `matmul` promises that
    (`runtime.decode_weights`). Every cache must stay on its LongRoPE factor set
    (`crosses_rope_switch`); `Model.decode_step` runs a sequence that crosses alone.
    """
    w = weights
    small = config.phi3small
    steps = [one_position(config, cache) for cache in caches]  # each sequence's position, rotation, mask

    x = embed(w["model.embed_tokens.weight"], token_ids)  # (B, D)
    if small and small.embedding_multiplier:
        x = x * np.float32(small.embedding_multiplier)
    out_proj = output_projection(config)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        h = norm(config, w, layer + "input_layernorm", x)
        q, k, v = project_qkv(config, w, layer, h)  # (B, H*hd), (B, KV*hd), (B, KV*hd)
        sparse = bool(small) and not is_dense_layer(config, i)
        heads = attention_batch(q, k, v, config, caches, i, steps, sparse)  # (B, H*hd)
        x = x + linear(heads, w[layer + out_proj + ".weight"], w.get(layer + out_proj + ".bias"))  # (B, D)
        h = norm(config, w, layer + "post_attention_layernorm", x)
        x = x + feed_forward(config, w, i, h)  # (B, D)
    for b, (cache, step) in enumerate(zip(caches, steps)):
        cache.advance(token_ids[b : b + 1], step.long)
    return norm(config, w, final_norm_name(config), x)  # (B, D)


def attention_batch(q, k, v, config: ModelConfig, caches: list[KVCache], layer: int, steps, sparse: bool) -> np.ndarray:
    """`attention` for one new token of each of B sequences: q (B, H*hd), k, v (B, KV*hd)
    -> (B, H*hd), row b attending over caches[b] from its own position (`steps[b]`).

    The rotation is elementwise, so it runs on all rows at once, each with its own
    angles; storing and attending run per sequence, each over its own cache."""
    B = q.shape[0]
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    cos = np.concatenate([step.cos for step in steps])  # (B, rotary_dim), row b at sequence b's position
    sin = np.concatenate([step.sin for step in steps])
    q = apply_rope(q.reshape(B, H, hd).transpose(1, 0, 2), cos, sin)  # (H, B, hd)
    k = apply_rope(k.reshape(B, KV, hd).transpose(1, 0, 2), cos, sin)  # (KV, B, hd)
    v = v.reshape(B, KV, hd).transpose(1, 0, 2)  # (KV, B, hd)
    scale = attention_scale(config)
    out = np.empty((H, B, hd), dtype=np.float32)
    for b, (cache, step) in enumerate(zip(caches, steps)):
        cache.store(layer, k[:, b : b + 1], v[:, b : b + 1])  # at position cache.length
        qb = q[:, b : b + 1]  # (H, 1, hd)
        if sparse:
            layout, first_block = step.sparse
            out[:, b : b + 1] = attend_blocksparse(qb, *cache.layer(layer), np.arange(cache.length, cache.length + 1),
                                                   layout, first_block, config.phi3small.block_size, scale)
        else:
            out[:, b : b + 1] = attend_cached(qb, *cache.layer(layer), step.allowed, scale)
    return out.transpose(1, 0, 2).reshape(B, H * hd)  # heads side by side again; o_proj follows


class OnePosition(NamedTuple):
    """What one new token of a sequence needs to attend: its rotation and its mask row."""

    long: bool  # LongRoPE's factor set
    cos: np.ndarray  # (1, rotary_dim)
    sin: np.ndarray  # (1, rotary_dim)
    allowed: np.ndarray  # (1, S)
    sparse: tuple | None  # Phi-3-small's block pattern for it


def one_position(config: ModelConfig, cache: KVCache) -> OnePosition:
    """The next position of `cache`'s sequence, computed as `forward` computes it for T = 1."""
    positions = np.arange(cache.length, cache.length + 1)  # (1,)
    long = use_long_factors(config.rope, cache.length + 1)
    if cache.length and long != cache.rope_long:
        raise ValueError("the cached keys use the other LongRoPE factor set; run the whole sequence again")
    cos, sin = rope_tables(config.rope, positions, long)
    allowed = attention_mask(positions, cache.length + 1, config.sliding_window)
    sparse = forward_layout(config, positions) if config.phi3small else None
    return OnePosition(long, cos, sin, allowed, sparse)


def lm_head(config: ModelConfig, weights: dict, hidden: np.ndarray, trace=NO_TRACE) -> np.ndarray:
    """(T, D) -> (T, V) logits. Tied models (Phi-4-mini, Phi-3-small) reuse the embedding
    matrix; PhiMoE adds a bias (lm_head_bias). Phi-3-small divides by muP's width
    multiplier (8) and sets the ids its tokenizer never produces to float32's lowest
    value, as its remote code does (finite, unlike -inf: log-probs stay numbers)."""
    name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    logits = linear(hidden, weights[name], weights.get("lm_head.bias"))
    small = config.phi3small
    if small and small.width_multiplier:
        logits = logits / np.float32(small.width_multiplier)
    if small and small.masked_token_ids:
        logits[:, list(small.masked_token_ids)] = np.finfo(np.float32).min
    trace.record("logits", logits)
    return logits


def crosses_rope_switch(config: ModelConfig, cache: KVCache, n_new: int) -> bool:
    """Whether appending n_new tokens moves the sequence to the other LongRoPE factor set
    than the cached tokens were computed with (see docs/architecture.md)."""
    return cache.length > 0 and use_long_factors(config.rope, cache.length + n_new) != cache.rope_long
