"""From CLIP's patch features to the image tokens the decoder reads.

    tower output per view (576, 1024)            24 x 24 patches
      -> 2x2 merge: 12 x 12 cells of 4096         4 neighbours side by side in channels
      -> crops laid out as one grid               (rows*12) x (cols*12) cells
      -> a `sub_GN` separator after every row     the model's "newline"
      -> [crop grid] + glb_GN + [global view's 12 x 13]     ("sub_glb" order)
      -> projector: Linear(4096, D), GELU, Linear(D, D)     (n_tokens, D)

The separators are learned vectors (`sub_GN`, `glb_GN`) that tell the decoder
where a row of the picture ends and where the crops end and the overview begins:
without them, a 2x3 grid and a 3x2 grid of crops would be the same sequence.

`encode_image` runs it all for one `ProcessedImage`; the decoder's embedding step
puts the result where the image's placeholder tokens are.
"""

import math

import numpy as np
from numba import vectorize

from ..model import NO_TRACE, linear
from .config import IMAGE_EMBED, VisionConfig
from .image import ProcessedImage
from .tower import vision_tower


@vectorize(["float32(float32)", "float64(float64)"], cache=True)
def erf(x):
    """The error function, elementwise (NumPy has none): libm's double-precision erf,
    rounded to the input's precision."""
    return math.erf(np.float64(x))


def erf_reference(x: np.ndarray) -> np.ndarray:
    """`erf`'s plain twin: Python's math.erf, one element at a time (slow)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype)


def gelu(x: np.ndarray) -> np.ndarray:
    """x * Phi(x), with the exact normal CDF (torch.nn.GELU's default, not the tanh form)."""
    return x * (np.float32(0.5) + np.float32(0.5) * erf(x * np.float32(1 / math.sqrt(2))))


def merge_2x2(features: np.ndarray) -> np.ndarray:
    """(N, 576, C) -> (N, 12, 12, 4C): each cell holds the patches (0,0), (0,1), (1,0),
    (1,1) of a 2x2 block, one after the other in the channels. 4x fewer tokens, no
    information lost."""
    N, L, C = features.shape
    side = math.isqrt(L)  # 24
    blocks = features.reshape(N, side // 2, 2, side // 2, 2, C)  # (N, cell row, dy, cell col, dx, C)
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(N, side // 2, side // 2, 4 * C)


def crop_grid(cells: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows*cols, 12, 12, 4C) crops in row-major order -> (rows*12, cols*12, 4C): the
    crops' cells put back where they were in the picture."""
    _, h, w, channels = cells.shape
    grid = cells.reshape(rows, cols, h, w, channels).transpose(0, 2, 1, 3, 4)  # (rows, 12, cols, 12, 4C)
    return grid.reshape(rows * h, cols * w, channels)


def with_row_separators(grid: np.ndarray, sub_gn: np.ndarray) -> np.ndarray:
    """(R, K, 4C) -> (R * (K + 1), 4C): the cells row by row, `sub_GN` after each row."""
    R, K, channels = grid.shape
    newline = np.broadcast_to(sub_gn.reshape(1, 1, channels), (R, 1, channels))
    return np.concatenate([grid, newline], axis=1).reshape(R * (K + 1), channels)


def image_sequence(features: np.ndarray, grid: tuple[int, int], weights: dict) -> np.ndarray:
    """One image's tower output (1 + rows*cols, 576, C), global view first ->
    (n_tokens, 4C): [crops with row ends] + glb_GN + [global view with row ends]."""
    rows, cols = grid
    sub_gn = weights[IMAGE_EMBED + "sub_GN"]  # (1, 1, 1, 4C)
    cells = merge_2x2(features)  # (1 + rows*cols, 12, 12, 4C)
    crops = with_row_separators(crop_grid(cells[1:], rows, cols), sub_gn)  # (rows*12 * (cols*12 + 1), 4C)
    overview = with_row_separators(cells[0], sub_gn)  # (12 * 13, 4C)
    return np.concatenate([crops, weights[IMAGE_EMBED + "glb_GN"].reshape(1, -1), overview])


def project(x: np.ndarray, weights: dict) -> np.ndarray:
    """The projector: (n, 4C) -> (n, D), Linear -> GELU -> Linear, into the decoder's
    embedding space. Separators go through it too."""
    p = IMAGE_EMBED + "img_projection."
    h = gelu(linear(x, weights[p + "0.weight"], weights[p + "0.bias"]))  # (n, D)
    return linear(h, weights[p + "2.weight"], weights[p + "2.bias"])  # (n, D)


def encode_image(config: VisionConfig, weights: dict, image: ProcessedImage, trace=NO_TRACE) -> np.ndarray:
    """A processed image -> its (num_tokens, D) embeddings, in placeholder order.
    A recorder (`trace`) gets its views, the tower's patch features and the tokens."""
    trace.record("image_views", image.pixel_values)  # (1 + crops, 3, 336, 336)
    features = vision_tower(config, weights, image.pixel_values)  # (1 + crops, 576, C)
    trace.record("image_patches", features)
    tokens = project(image_sequence(features, image.grid, weights), weights)
    trace.record("image_tokens", tokens)
    assert len(tokens) == image.num_tokens, (len(tokens), image.num_tokens)
    return np.ascontiguousarray(tokens, dtype=np.float32)
