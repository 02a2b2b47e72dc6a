"""From SigLIP's patch features to the image tokens the decoder reads.

    tower output per view (1024, C)            32 x 32 patches
      -> 2 x 2 average pooling                  16 x 16 cells of C
      -> the crops laid back into one grid, cut to the cells that hold picture
      -> a `sub_GN` separator after every row   the model's "newline"
      -> [crop grid] + glb_GN + [global view's 16 x 17]      ("sub_glb" order)
      -> projector: Linear(C, D), GELU, Linear(D, D)          (n_tokens, D)

Phi-3-vision merged 2 x 2 patches by stacking their channels (4C wide); Phi-4-
multimodal averages them (C wide), so its separators and projector are C wide.
Unlike Phi-3-vision, the padding is cut away: only the cells whose top-left patch
holds picture become tokens (`ProcessedImage.useful_cells`).
"""

import numpy as np

from ..model import NO_TRACE, linear
from ..vision.embedding import gelu
from .config import IMAGE_EMBED, Phi4MMConfig
from .image import POOLED_SIDE, ProcessedImage
from .siglip import siglip_tower


def average_pool_2x2(features: np.ndarray) -> np.ndarray:
    """(N, 1024, C) -> (N, 16, 16, C): each cell the mean of a 2 x 2 block of patches,
    added in PyTorch's order (row by row within the window), then divided by 4."""
    N, P, C = features.shape
    side = int(round(P**0.5))  # 32
    blocks = features.reshape(N, side // 2, 2, side // 2, 2, C)  # (N, cell row, dy, cell col, dx, C)
    total = blocks[:, :, 0, :, 0] + blocks[:, :, 0, :, 1] + blocks[:, :, 1, :, 0] + blocks[:, :, 1, :, 1]
    return total / np.float32(4)


def with_row_separators(grid: np.ndarray, sub_gn: np.ndarray) -> np.ndarray:
    """(R, K, C) -> (R * (K + 1), C): the cells row by row, `sub_GN` after each row."""
    R, K, C = grid.shape
    newline = np.broadcast_to(sub_gn.reshape(1, 1, C), (R, 1, C))
    return np.concatenate([grid, newline], axis=1).reshape(R * (K + 1), C)


def image_sequence(pooled: np.ndarray, image: ProcessedImage, weights: dict) -> np.ndarray:
    """One image's pooled views (1 + rows*cols, 16, 16, C), global view first ->
    (n_tokens, C): [crops' picture cells with row ends] + glb_GN + [global view with row ends]."""
    rows, cols = image.grid
    C = pooled.shape[-1]
    sub_gn = np.asarray(weights[IMAGE_EMBED + "sub_GN"], dtype=np.float32)  # (1, 1, 1, C)
    glb_gn = np.asarray(weights[IMAGE_EMBED + "glb_GN"], dtype=np.float32).reshape(1, C)
    grid = pooled[1:].reshape(rows, cols, POOLED_SIDE, POOLED_SIDE, C).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * POOLED_SIDE, cols * POOLED_SIDE, C)  # crop (r, c) at block (r, c)
    useful_rows, useful_cols = image.useful_cells
    crops = with_row_separators(grid[:useful_rows, :useful_cols], sub_gn)
    overview = with_row_separators(pooled[0], sub_gn)  # (16 * 17, C)
    return np.concatenate([crops, glb_gn, overview])


def project(x: np.ndarray, weights: dict) -> np.ndarray:
    """The projector: (n, C) -> (n, D), Linear -> GELU (exact) -> Linear."""
    p = IMAGE_EMBED + "img_projection."
    h = gelu(linear(x, weights[p + "0.weight"], weights[p + "0.bias"]))
    return linear(h, weights[p + "2.weight"], weights[p + "2.bias"])


def encode_image(mm: Phi4MMConfig, weights: dict, image: ProcessedImage, trace=NO_TRACE) -> np.ndarray:
    """A processed image -> its (num_tokens, D) embeddings, in placeholder order. A
    recorder gets its views, the tower's features, the pooled cells and the tokens."""
    trace.record("image_views", image.pixel_values)  # (1 + crops, 3, 448, 448)
    features = siglip_tower(mm.vision, weights, image.pixel_values, image.patch_mask)  # (1 + crops, 1024, C)
    trace.record("image_patches", features)
    pooled = average_pool_2x2(features)  # (1 + crops, 16, 16, C)
    trace.record("image_pooled", pooled)
    tokens = project(image_sequence(pooled, image, weights), weights)
    trace.record("image_tokens", tokens)
    assert len(tokens) == image.num_tokens, (len(tokens), image.num_tokens)
    return np.ascontiguousarray(tokens, dtype=np.float32)
