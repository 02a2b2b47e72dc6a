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

from dataclasses import dataclass

import numpy as np

from ..kernels.rowwise import add_residual, layer_norm, quick_gelu, softmax_rows_in_place
from ..kernels.threads import matmul_in_bands, side_by_side
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
    return project(blocks, kernel).reshape(N, side * side, -1)  # row-major patches: left to right, top to bottom


def embeddings(config: VisionConfig, w: dict, pixels: np.ndarray) -> np.ndarray:
    """(N, 3, 336, 336) -> (N, P, C): [CLS] + patch vectors, plus position embeddings,
    then CLIP's `pre_layrnorm` (sic, the checkpoint's spelling)."""
    p = VISION_MODEL
    patches = patch_embedding(pixels, w[p + "embeddings.patch_embedding.weight"], config.patch_size)  # (N, 576, C)
    cls = np.broadcast_to(w[p + "embeddings.class_embedding"], (len(pixels), 1, config.hidden_size))
    x = np.concatenate([cls, patches], axis=1) + w[p + "embeddings.position_embedding.weight"]  # (N, P, C)
    return layer_norm(x, w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], config.layer_norm_eps)


@dataclass
class Workspace:
    """The arrays a block writes, made once per image and rewritten by every block.

    Fresh arrays in every block cost page faults, and more than the zeroing: NumPy asks
    Linux for huge pages on arrays of 4 MB and up, and where memory is fragmented (a
    machine busy with other programs) faulting them in waits for compaction. Measured
    on such a machine, 2 views: a (1154 x 1024) @ (1024 x 1024) product took 25-39 ms
    inside the tower with fresh arrays, 13 ms with these, 12.4 ms alone.
    """

    normed: np.ndarray  # (N*P, C) LayerNorm's output
    q: np.ndarray  # (N*P, C) each: head h is columns h*hd:(h+1)*hd
    k: np.ndarray
    v: np.ndarray
    mixed: np.ndarray  # (N*P, C) the heads' outputs side by side
    hidden: np.ndarray  # (N*P, F) fc1's output
    out: np.ndarray  # (N*P, C) a sublayer's output, before the residual

    @classmethod
    def for_rows(cls, rows: int, config: VisionConfig) -> "Workspace":
        C, F = config.hidden_size, config.intermediate_size
        return cls(*(np.empty((rows, C), np.float32) for _ in range(5)), np.empty((rows, F), np.float32),
                   np.empty((rows, C), np.float32))


def project(x: np.ndarray, weight, out: np.ndarray | None = None) -> np.ndarray:
    """x @ weight.T (`model.linear`, no bias), written into `out` (or a new array).

    A float32 matrix is multiplied by BLAS on one thread per band of rows, the bands
    side by side on the cores (`matmul_in_bands`): as fast as BLAS's own threads, and
    no BLAS thread is left spinning into the attention and the kernels that follow,
    which run on the same cores. A packed matrix multiplies itself (`linear`)."""
    if out is None:
        out = np.empty((len(x), weight.shape[0]), dtype=np.float32)
    if isinstance(weight, np.ndarray):
        return matmul_in_bands(np.ascontiguousarray(x, dtype=np.float32), np.asarray(weight, dtype=np.float32), out)
    out[...] = linear(x, weight)
    return out


def self_attention(config: VisionConfig, w: dict, layer: str, x: np.ndarray, ws: Workspace) -> np.ndarray:
    """Multi-head attention of every position with every position of its own crop:
    x (N, P, C) -> (N, P, C), less out_proj's bias (the block adds it with the
    residual). No mask and no rotary embedding (positions were added to the input)."""
    N, P, C = x.shape
    heads, hd = config.num_attention_heads, config.head_dim
    rows = x.reshape(N * P, C)
    a = layer + "self_attn."
    q, k, v = (project(rows, w[f"{a}{name}.weight"], out) for name, out in (("q_proj", ws.q), ("k_proj", ws.k),
                                                                            ("v_proj", ws.v)))  # (N*P, C), no bias yet
    q_bias, k_bias, v_bias = (w[f"{a}{name}.bias"] for name in ("q_proj", "k_proj", "v_proj"))  # (C,)

    def attend(item):  # one head of one crop: columns h*hd:(h+1)*hd of the crop's rows
        crop, h = divmod(item, heads)
        r, c = slice(crop * P, (crop + 1) * P), slice(h * hd, (h + 1) * hd)
        q_h, k_h, v_h = q[r, c] + q_bias[c], k[r, c] + k_bias[c], v[r, c] + v_bias[c]  # (P, hd) each, with the bias
        scores = q_h @ k_h.T  # (P, P)
        softmax_rows_in_place(scores, np.float32(hd**-0.5))  # softmax(q.k / sqrt(hd)), row by row
        np.matmul(scores, v_h, out=ws.mixed[r, c])  # (P, hd): head h's columns of the crop's rows

    side_by_side(attend, N * heads)  # the cores take whole heads (17 crops x 16 heads share 2 cores evenly)
    return project(ws.mixed, w[a + "out_proj.weight"], ws.out).reshape(N, P, C)


def mlp(w: dict, layer: str, x: np.ndarray, ws: Workspace) -> np.ndarray:
    """fc2(quick_gelu(fc1(x))): (N, P, C) -> (N, P, F) -> (N, P, C), less fc2's bias
    (the block adds it with the residual). quick_gelu(z) = z * sigmoid(1.702 z),
    CLIP's cheap GELU, adds fc1's bias in the same pass."""
    N, P, C = x.shape
    h = quick_gelu(project(x.reshape(N * P, C), w[layer + "mlp.fc1.weight"], ws.hidden), w[layer + "mlp.fc1.bias"])
    return project(h, w[layer + "mlp.fc2.weight"], ws.out).reshape(N, P, C)  # (N, P, C)


def encoder_block(config: VisionConfig, w: dict, i: int, x: np.ndarray, ws: Workspace) -> np.ndarray:
    """One pre-LN block: the norms come before attention and the MLP, the residual
    stream x itself is never normalised (CLIP, like GPT-2). Each sublayer's last bias
    (out_proj's, fc2's) is added together with the residual, in one pass; x (N, P, C)
    is updated in place."""
    layer = f"{VISION_MODEL}encoder.layers.{i}."
    eps = config.layer_norm_eps
    normed = ws.normed.reshape(x.shape)
    h = self_attention(config, w, layer, layer_norm(x, w[layer + "layer_norm1.weight"], w[layer + "layer_norm1.bias"], eps,
                                                    out=normed), ws)
    x = add_residual(x, h, w[layer + "self_attn.out_proj.bias"])  # x + attention(LN(x)) + bias
    h = mlp(w, layer, layer_norm(x, w[layer + "layer_norm2.weight"], w[layer + "layer_norm2.bias"], eps, out=normed), ws)
    return add_residual(x, h, w[layer + "mlp.fc2.bias"])  # x + mlp(LN(x)) + bias


def vision_tower(config: VisionConfig, weights: dict, pixels: np.ndarray) -> np.ndarray:
    """(N, 3, 336, 336) crops -> (N, 576, C) patch features: the hidden state the
    projector reads (after block 23 of 24 for layer_idx -2), without the class token."""
    x = embeddings(config, weights, np.asarray(pixels, dtype=np.float32))  # (N, P, C)
    ws = Workspace.for_rows(x.shape[0] * x.shape[1], config)
    for i in range(config.blocks_used):
        x = encoder_block(config, weights, i, x, ws)
    return x[:, 1:]  # (N, 576, C): the class token is dropped ("patch" features)
