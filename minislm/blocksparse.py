"""Phi-3-small's block-sparse attention: which keys each query head reads.

Positions are cut into blocks of B tokens (`blocksparse_block_size`, 64 in the real
model): block = position // B. In a sparse layer, a query in block qb of head h
reads the keys of an earlier-or-same block kb when

    qb - kb < local_blocks                      one of the last `local_blocks` blocks
                                                (its own included): a sliding window, or
    (kb + h * shift + 1) % vert_stride == 0     a "vertical" block: every vert_stride-th
                                                block since the start, at an offset
                                                that moves with the head

and, inside those blocks, only keys at or before itself (causal). The shift is
max(1, vert_stride // n_heads), so with 32 heads and stride 8 head h reads the
vertical blocks 7 - h % 8, 15 - h % 8, ...: the heads of a group of 8 between them
cover every block. With `homo_head` every head uses head 0's pattern.

The real model (B 64, 16 local blocks, stride 8) attends like a plain causal model
for the first 1024 tokens; after that each head reads the last 1024 tokens and one
block in eight before them. Layers i with (i + 1) % dense_attention_every_n_layers == 0
(every second one in the real model: 1, 3, ..., 31) attend to everything, as usual.

The rules are those of the hub's remote code (triton_flash_blocksparse_attn.py's
`_get_sparse_attn_mask`, modeling_phi3_small.py's choice of dense layers);
docs/architecture.md compares them with mlx-lm and vLLM. `block_allowed` states the
rule for one block; `block_layout` applies it to whole arrays; tests hold them equal.
The attention itself over the KV cache is kernels/blocksparse.py, which reads only
the blocks `block_layout` allows.
"""

import numpy as np

from .config import ModelConfig


def is_dense_layer(config: ModelConfig, layer: int) -> bool:
    """Whether layer `layer` (0-based) attends densely: (layer + 1) % n == 0 for
    n = dense_attention_every_n_layers; with n null or 0 every layer is sparse."""
    every = config.phi3small.dense_every
    return every is not None and (layer + 1) % every == 0


def head_shift(n_heads: int, vert_stride: int) -> int:
    """How far the vertical blocks move from one head to the next (the remote code's
    `head_sliding_step`, int(vert_stride / n_heads) but at least 1)."""
    return max(1, vert_stride // n_heads)


def block_allowed(config: ModelConfig, head: int, q_block: int, k_block: int) -> bool:
    """The pattern for one (head, query block, key block): the rule in the module docstring."""
    s = config.phi3small
    h = 0 if s.homo_head else head
    if k_block > q_block:
        return False  # the future
    local = q_block - k_block < s.local_blocks
    vertical = (k_block + h * head_shift(config.num_attention_heads, s.vert_stride) + 1) % s.vert_stride == 0
    return local or vertical


def block_layout(config: ModelConfig, q_blocks: np.ndarray, n_key_blocks: int) -> np.ndarray:
    """`block_allowed` for every head, query block in `q_blocks` (n,) and key block
    below n_key_blocks at once: (H, n, n_key_blocks) booleans."""
    s = config.phi3small
    H = config.num_attention_heads
    heads = np.zeros(H, np.int64) if s.homo_head else np.arange(H)
    qb = np.asarray(q_blocks, np.int64)[None, :, None]  # (1, n, 1)
    kb = np.arange(n_key_blocks)[None, None, :]  # (1, 1, KB)
    offset = (heads * head_shift(H, s.vert_stride))[:, None, None]  # (H, 1, 1)
    local = qb - kb < s.local_blocks
    vertical = (kb + offset + 1) % s.vert_stride == 0
    return (kb <= qb) & (local | vertical)  # (H, n, KB)


def forward_layout(config: ModelConfig, positions: np.ndarray) -> tuple[np.ndarray, int]:
    """The layout rows a forward over `positions` (consecutive) needs: (H, n, KB) for
    the query blocks first..last that the positions fall in, and `first`."""
    B = config.phi3small.block_size
    first, last = int(positions[0]) // B, int(positions[-1]) // B
    return block_layout(config, np.arange(first, last + 1), last + 1), first


def token_mask(config: ModelConfig, positions: np.ndarray, n_keys: int) -> np.ndarray:
    """(H, T, S) booleans, True where query head h at positions[t] reads key j: its
    blocks (`block_layout`) cut to the keys at or before the query. The definition the
    kernel is tested against, and what `trace` and `attention --png` show."""
    B = config.phi3small.block_size
    n_blocks = -(-n_keys // B)
    layout = block_layout(config, np.asarray(positions) // B, n_blocks)  # (H, T, blocks)
    keys = np.arange(n_keys)
    per_token = layout[:, :, keys // B]  # (H, T, S)
    return per_token & (keys[None, None, :] <= np.asarray(positions)[None, :, None])
