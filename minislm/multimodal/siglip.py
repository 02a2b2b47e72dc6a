"""SigLIP-so400m, Phi-4-multimodal's eye, in NumPy, read top to bottom.

    crop (3, 448, 448) -> 32 x 32 patches of 14 x 14 pixels -> one vector each (+ bias)
      -> plus learned positions, stretched over the picture part of the crop   (1024, C)
      -> blocks: x += attention(LN(x)); x += mlp(LN(x))     pre-LN; padded patches are
         never attended to (they are still computed, and dropped later)
      -> stop after block 26 of 27: the features the projector reads          (1024, C)

Three things differ from Phi-3-vision's CLIP (minislm/vision/tower.py): no class
token and no LayerNorm before the blocks; the MLP's activation is GELU's tanh form;
and positions are NaViT-style: a crop whose right or bottom part is padding spreads
the 32 x 32 table of position vectors over the part that holds picture
(`position_ids`), so a patch's position says where in the *picture* it is.

Weights keep the checkpoint's names under TOWER, e.g.
`model.embed_tokens_extend.image_embed.img_processor.encoder.layers.0.self_attn.q_proj.weight`.
The last block, `post_layernorm` and the attention-pooling `head` are in every
checkpoint and never run (the projector reads an earlier block's output).

Shapes: N = views (global view + crops), P = 1024 patches, C = 1152, heads 16 of 72,
F = 4304.
"""

import math

import numpy as np

from ..kernels.threads import side_by_side
from ..model import layer_norm, linear, softmax
from ..vision.tower import patch_embedding
from .config import TOWER, SiglipConfig


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (transformers' gelu_pytorch_tanh):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


def position_ids(masks: np.ndarray, side: int) -> np.ndarray:
    """(N, side, side) patch masks -> (N, side*side) rows of the position table.

    A crop with nh rows and nw columns of picture gives patch (r, c) the fractional
    coordinates (r/nh, c/nw), and each is put in one of `side` equal buckets: the
    table is stretched over the picture. Computed in float32 like the reference
    (1/nw is a float32 division; a product landing exactly on a bucket boundary goes
    up, bucketize's right=True). Padding patches read position 0. An unpadded crop
    gets r*side + c.
    """
    boundaries = np.arange(1, side, dtype=np.float32) / np.float32(side)  # 1/32 .. 31/32, exact
    index = np.arange(side, dtype=np.float32)
    ids = np.zeros((len(masks), side * side), dtype=np.int64)
    for n, mask in enumerate(masks):
        nh, nw = int(mask[:, 0].sum()), int(mask[0, :].sum())
        top = np.float32(1.0 - 1e-6)
        rows = np.minimum(index * (np.float32(1.0) / np.float32(nh)), top)
        cols = np.minimum(index * (np.float32(1.0) / np.float32(nw)), top)
        bucket_r = np.searchsorted(boundaries, rows, side="right")
        bucket_c = np.searchsorted(boundaries, cols, side="right")
        grid = bucket_r[:, None] * side + bucket_c[None, :]  # (side, side)
        ids[n] = np.where(mask, grid, 0).reshape(-1)
    return ids


def embeddings(config: SiglipConfig, w: dict, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, 3, 448, 448), (N, 32, 32) -> (N, 1024, C): patch vectors plus positions."""
    p = TOWER + "embeddings."
    patches = patch_embedding(pixels, w[p + "patch_embedding.weight"], config.patch_size)  # (N, P, C)
    patches = patches + w[p + "patch_embedding.bias"]
    table = np.asarray(w[p + "position_embedding.weight"], dtype=np.float32)  # (P, C)
    return patches + table[position_ids(masks, config.patches_per_side)]


def self_attention(config: SiglipConfig, w: dict, layer: str, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Every patch of a view attends to every picture patch of the same view:
    x (N, P, C), keys (N, P) bool -> (N, P, C). Padded patches are left out as keys
    (their score is -inf, as the reference's additive mask makes it in effect) but
    are still queries."""
    N, P, C = x.shape
    heads, hd = config.num_attention_heads, config.head_dim
    rows = x.reshape(N * P, C)

    def project(name):  # (N*P, C) -> (N, heads, P, hd)
        y = linear(rows, w[f"{layer}self_attn.{name}.weight"], w[f"{layer}self_attn.{name}.bias"])
        return np.ascontiguousarray(y.reshape(N, P, heads, hd).transpose(0, 2, 1, 3))

    q = project("q_proj")
    k_t = np.ascontiguousarray(project("k_proj").transpose(0, 1, 3, 2))  # (N, heads, hd, P)
    v = project("v_proj")
    scale = np.float32(hd**-0.5)
    out = np.empty((N, heads, P, hd), dtype=np.float32)

    def attend(view):
        scores = (q[view] @ k_t[view]) * scale  # (heads, P, P)
        if not keys[view].all():
            scores[:, :, ~keys[view]] = -np.inf
        out[view] = softmax(scores, axis=-1) @ v[view]

    side_by_side(attend, N)
    y = linear(out.transpose(0, 2, 1, 3).reshape(N * P, C), w[layer + "self_attn.out_proj.weight"],
               w[layer + "self_attn.out_proj.bias"])
    return y.reshape(N, P, C)


def mlp(w: dict, layer: str, x: np.ndarray) -> np.ndarray:
    """fc2(gelu_tanh(fc1(x))): (N, P, C) -> (N, P, F) -> (N, P, C)."""
    N, P, C = x.shape
    h = linear(x.reshape(N * P, C), w[layer + "mlp.fc1.weight"], w[layer + "mlp.fc1.bias"])
    return linear(gelu_tanh(h), w[layer + "mlp.fc2.weight"], w[layer + "mlp.fc2.bias"]).reshape(N, P, C)


def encoder_block(config: SiglipConfig, w: dict, i: int, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
    layer = f"{TOWER}encoder.layers.{i}."
    eps = config.layer_norm_eps
    h = layer_norm(x, w[layer + "layer_norm1.weight"], w[layer + "layer_norm1.bias"], eps)
    x = x + self_attention(config, w, layer, h, keys)
    h = layer_norm(x, w[layer + "layer_norm2.weight"], w[layer + "layer_norm2.bias"], eps)
    return x + mlp(w, layer, h)


def siglip_tower(config: SiglipConfig, weights: dict, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, 3, 448, 448) views and (N, 32, 32) patch masks -> (N, 1024, C): the hidden
    state after `blocks_used` blocks (26 of 27 for the real model)."""
    x = embeddings(config, weights, np.asarray(pixels, dtype=np.float32), masks)
    keys = masks.reshape(len(masks), -1)  # (N, P)
    for i in range(config.blocks_used):
        x = encoder_block(config, weights, i, x, keys)
    return x
