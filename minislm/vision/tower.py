"""CLIP ViT-L/14-336, the eye of Phi-3-vision, in NumPy, read top to bottom.

    crop (3, 336, 336) -> 24 x 24 patches of 14 x 14 pixels -> one vector each
      -> [CLS] + patches, plus learned positions, LayerNorm     (577, 1024)
      -> blocks: x += attention(LN(x)); x += mlp(LN(x))       pre-LN, no mask
      -> stop after block 23 of 24, drop [CLS]                  (576, 1024)

A Vision Transformer is a text transformer whose "tokens" are patches: the patch
embedding is a matrix multiply on flattened 14x14x3 pixel blocks (a 14x14 conv
with stride 14 computes exactly that), every patch attends to every other (no
causal mask: an image has no "before"), and the MLP uses quick_gelu. Phi-3-vision
reads the penultimate block's output, so block 24 and `post_layernorm` never run.

Weights keep the checkpoint's names under VISION_MODEL, e.g.
`...vision_model.encoder.layers.0.self_attn.q_proj.weight` (out, in). Matrices may
be float32 arrays or packed bf16 weights (minislm.kernels), as in the decoder.

Shapes: N = crops, P = 577 positions (576 patches + CLS), C = 1024 channels,
heads = 16 of hd = 64, F = 4096.
"""

import numpy as np

from ..kernels.rowwise import layer_norm, quick_gelu, residual, softmax_rows_in_place
from ..kernels.threads import side_by_side
from ..model import linear
from .config import VISION_MODEL, VisionConfig


def patch_embedding(pixels: np.ndarray, weight: np.ndarray, patch: int) -> np.ndarray:
    """(N, 3, 336, 336) pixels -> (N, 576, C): each 14x14x3 block flattened and
    multiplied by the conv kernel (C, 3, 14, 14) seen as a (C, 588) matrix."""
    N, channels, size, _ = pixels.shape
    side = size // patch
    blocks = pixels.reshape(N, channels, side, patch, side, patch)  # (N, 3, row, y, col, x)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(N * side * side, channels * patch * patch)  # (N*576, 588)
    kernel = np.asarray(weight, dtype=np.float32).reshape(weight.shape[0], -1)  # (C, 588), same (3, y, x) order
    return linear(blocks, kernel).reshape(N, side * side, -1)  # row-major patches: left to right, top to bottom


def embeddings(config: VisionConfig, w: dict, pixels: np.ndarray) -> np.ndarray:
    """(N, 3, 336, 336) -> (N, P, C): [CLS] + patch vectors, plus position embeddings,
    then CLIP's `pre_layrnorm` (sic, the checkpoint's spelling)."""
    p = VISION_MODEL
    patches = patch_embedding(pixels, w[p + "embeddings.patch_embedding.weight"], config.patch_size)  # (N, 576, C)
    cls = np.broadcast_to(w[p + "embeddings.class_embedding"], (len(pixels), 1, config.hidden_size))
    x = np.concatenate([cls, patches], axis=1) + w[p + "embeddings.position_embedding.weight"]  # (N, P, C)
    return layer_norm(x, w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], config.layer_norm_eps)


def self_attention(config: VisionConfig, w: dict, layer: str, x: np.ndarray) -> np.ndarray:
    """Multi-head attention of every position with every position of its own crop:
    x (N, P, C) -> (N, P, C), less out_proj's bias (the block adds it with the
    residual). No mask and no rotary embedding (positions were added to the input)."""
    N, P, C = x.shape
    heads, hd = config.num_attention_heads, config.head_dim
    rows = x.reshape(N * P, C)
    a = layer + "self_attn."
    q, k, v = (linear(rows, w[f"{a}{name}.weight"]) for name in ("q_proj", "k_proj", "v_proj"))  # (N*P, C) each, no bias yet
    q_bias, k_bias, v_bias = (w[f"{a}{name}.bias"] for name in ("q_proj", "k_proj", "v_proj"))  # (C,)
    mixed = np.empty((N * P, C), dtype=np.float32)

    def attend(item):  # one head of one crop: columns h*hd:(h+1)*hd of the crop's rows
        crop, h = divmod(item, heads)
        r, c = slice(crop * P, (crop + 1) * P), slice(h * hd, (h + 1) * hd)
        q_h, k_h, v_h = q[r, c] + q_bias[c], k[r, c] + k_bias[c], v[r, c] + v_bias[c]  # (P, hd) each, with the bias
        scores = q_h @ k_h.T  # (P, P)
        softmax_rows_in_place(scores, np.float32(hd**-0.5))  # softmax(q.k / sqrt(hd)), row by row
        np.matmul(scores, v_h, out=mixed[r, c])  # (P, hd): head h's columns of the crop's rows

    side_by_side(attend, N * heads)  # the cores take whole heads (17 crops x 16 heads share 2 cores evenly)
    return linear(mixed, w[a + "out_proj.weight"]).reshape(N, P, C)


def mlp(w: dict, layer: str, x: np.ndarray) -> np.ndarray:
    """fc2(quick_gelu(fc1(x))): (N, P, C) -> (N, P, F) -> (N, P, C), less fc2's bias
    (the block adds it with the residual). quick_gelu(z) = z * sigmoid(1.702 z),
    CLIP's cheap GELU, adds fc1's bias in the same pass."""
    N, P, C = x.shape
    h = quick_gelu(linear(x.reshape(N * P, C), w[layer + "mlp.fc1.weight"]), w[layer + "mlp.fc1.bias"])  # (N*P, F)
    return linear(h, w[layer + "mlp.fc2.weight"]).reshape(N, P, C)


def encoder_block(config: VisionConfig, w: dict, i: int, x: np.ndarray) -> np.ndarray:
    """One pre-LN block: the norms come before attention and the MLP, the residual
    stream x itself is never normalised (CLIP, like GPT-2). Each sublayer's last bias
    (out_proj's, fc2's) is added together with the residual, in one pass."""
    layer = f"{VISION_MODEL}encoder.layers.{i}."
    eps = config.layer_norm_eps
    h = self_attention(config, w, layer, layer_norm(x, w[layer + "layer_norm1.weight"], w[layer + "layer_norm1.bias"], eps))
    x = residual(x, h, w[layer + "self_attn.out_proj.bias"])  # x + attention(LN(x)) + bias
    h = mlp(w, layer, layer_norm(x, w[layer + "layer_norm2.weight"], w[layer + "layer_norm2.bias"], eps))
    return residual(x, h, w[layer + "mlp.fc2.bias"])  # x + mlp(LN(x)) + bias


def vision_tower(config: VisionConfig, weights: dict, pixels: np.ndarray) -> np.ndarray:
    """(N, 3, 336, 336) crops -> (N, 576, C) patch features: the hidden state the
    projector reads (after block 23 of 24 for layer_idx -2), without the class token."""
    x = embeddings(config, weights, np.asarray(pixels, dtype=np.float32))  # (N, P, C)
    for i in range(config.blocks_used):
        x = encoder_block(config, weights, i, x)
    return x[:, 1:]  # (N, 576, C): the class token is dropped ("patch" features)
