"""From a photo to the pixels Phi-4-multimodal's SigLIP tower reads.

SigLIP looks at 448 x 448 squares. Phi-4-multimodal (transformers'
Phi4MultimodalImageProcessor) lays a grid of such crops over the photo and adds one
shrunken view of the whole:

    photo (W x H), RGB (transparent pixels blended onto white)
      -> the grid: ceil(W/448) x ceil(H/448) crops, or, past 36 crops, the grid
         of at most 36 whose shape is closest to the photo's (`crop_grid`)
      -> resize to fill the grid's width or height, keeping the aspect ratio
         (bilinear with antialiasing, on 8-bit pixels: `resize_bilinear_antialias`)
      -> pad right or bottom with white up to the whole grid            (TH, TW)
      -> a patch mask: 14 x 14 patches that are mostly padding are marked off
      -> (x - 127.5) / 127.5, float32                                   (3, TH, TW)
      -> global view: the canvas resized to 448 x 448 (PyTorch's bicubic)
      -> crops: the canvas cut into 448 x 448 squares, row by row

`pixel_values` are [global view, crop 0, crop 1, ...]; the tower masks the padded
patches as keys, and the image's token count follows from the mask
(`num_image_tokens`): 16 x 17 for the global view, 1 separator, and 17-wide rows of
the crops' pooled cells that hold picture.

Everything here is exact: the resize is the integer arithmetic PyTorch runs for
8-bit images on x86 CPUs with AVX2 (ported from Pillow-SIMD), the padding and the
normalisation are the same float32 operations, so the crops equal transformers'
bit for bit; the global view is within float32 rounding (~1e-7).
"""

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MinislmError
from ..vision.image import resize_bicubic
from .config import CROP_SIZE, DEFAULT_MAX_CROPS, PATCH_SIZE

PADDING = 255  # white
MASK_SIDE = CROP_SIZE // PATCH_SIZE  # 32 patches a side
POOLED_SIDE = MASK_SIDE // 2  # 16 cells a side after the 2 x 2 average pooling
MIN_SIDE = 10  # transformers refuses a resize thinner than this ("the aspect ratio is very extreme")


@dataclass(frozen=True)
class ProcessedImage:
    """One image, ready for the tower.

    pixel_values: (1 + rows*cols, 3, 448, 448) float32: the global view, then the crops row by row
    patch_mask:   (1 + rows*cols, 32, 32) bool: True where a patch holds picture
    grid:         (rows, cols) of crops
    source_size:  (width, height) of the file
    resized_size: (width, height) after the resize, before the padding
    """

    pixel_values: np.ndarray
    patch_mask: np.ndarray
    grid: tuple[int, int]
    source_size: tuple[int, int]
    resized_size: tuple[int, int]

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(H, W) of the padded canvas: transformers' `image_sizes`."""
        return self.grid[0] * CROP_SIZE, self.grid[1] * CROP_SIZE

    @property
    def useful_cells(self) -> tuple[int, int]:
        """(rows, cols) of pooled cells of the crops that hold picture: the mask seen
        through the pooling (a cell counts when its top-left patch does)."""
        return useful_cells(self.patch_mask[1:], self.grid)

    @property
    def num_tokens(self) -> int:
        rows, cols = self.useful_cells
        return POOLED_SIDE * (POOLED_SIDE + 1) + 1 + rows * (cols + 1)

    def describe(self) -> str:
        """e.g. '500x300 -> 746x448, padded to 896x448: 1x2 crops + global view -> 721 tokens'."""
        (w, h), (rw, rh), (rows, cols) = self.source_size, self.resized_size, self.grid
        H, W = self.canvas_size
        return f"{w}x{h} -> {rw}x{rh}, padded to {W}x{H}: {rows}x{cols} crops + global view -> {self.num_tokens} tokens"


# ---------------------------------------------------------------- the crop grid


def crop_grid(width: int, height: int, max_crops: int = DEFAULT_MAX_CROPS) -> tuple[int, int]:
    """(cols, rows) of 448-pixel crops for a width x height image.

    As many as cover the image at its size, if that is at most `max_crops`; else the
    (cols, rows) with cols * rows <= max_crops closest in aspect ratio to the image,
    candidates taken by increasing area; on an exact tie the larger grid wins when the
    image's area exceeds half of it (transformers' find_closest_aspect_ratio).
    """
    cols, rows = math.ceil(width / CROP_SIZE), math.ceil(height / CROP_SIZE)
    if cols * rows <= max_crops:
        return cols, rows
    aspect = width / height
    candidates = sorted({(i, j) for n in range(1, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                         if i * j <= max_crops}, key=lambda r: r[0] * r[1])  # Python's sort is stable, as theirs
    best, best_diff = (1, 1), float("inf")
    for i, j in candidates:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * CROP_SIZE * CROP_SIZE * i * j:
            best = (i, j)
    return best


def crop_layout(width: int, height: int, max_crops: int = DEFAULT_MAX_CROPS):
    """-> (cols, rows), (new_w, new_h) after the resize, (pad_w, pad_h) up to the grid."""
    cols, rows = crop_grid(width, height, max_crops)
    target_w, target_h = CROP_SIZE * cols, CROP_SIZE * rows
    if target_w / width < target_h / height:  # the width fills the grid; pad the bottom
        new = (target_w, int(height * (target_w / width)))
    else:  # the height fills it; pad the right
        new = (int(width * (target_h / height)), target_h)
    if min(new[1], target_h) < MIN_SIDE or min(new[0], target_w) < MIN_SIDE:
        raise MinislmError(f"an image of {width}x{height} is too thin: it would be resized to {new[0]}x{new[1]} pixels "
                           f"(each side must be at least {MIN_SIDE}); crop it first")
    return (cols, rows), new, (target_w - new[0], target_h - new[1])


def patch_mask(grid: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    """(32*rows, 32*cols) bool: False for the patch columns (rows) that padding of at
    least 14 pixels covers, counted from the right (bottom)."""
    cols, rows = grid
    mask = np.ones((MASK_SIDE * rows, MASK_SIDE * cols), dtype=bool)
    pad_w, pad_h = padding
    if pad_w >= PATCH_SIZE:
        mask[:, mask.shape[1] - pad_w // PATCH_SIZE:] = False
    if pad_h >= PATCH_SIZE:
        mask[mask.shape[0] - pad_h // PATCH_SIZE:, :] = False
    return mask


def useful_cells(crop_masks: np.ndarray, grid: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of pooled cells holding picture, from the crops' patch masks
    (rows*cols, 32, 32) seen at every second patch, tiled back into one grid."""
    rows, cols = grid
    cells = crop_masks[:, 0::2, 0::2].reshape(rows, cols, POOLED_SIDE, POOLED_SIDE).transpose(0, 2, 1, 3)
    tiled = cells.reshape(rows * POOLED_SIDE, cols * POOLED_SIDE)
    return int(tiled[:, 0].sum()), int(tiled[0, :].sum())


def num_image_tokens(width: int, height: int, max_crops: int = DEFAULT_MAX_CROPS) -> int:
    """The placeholder count for a width x height image, without decoding it."""
    grid, _, padding = crop_layout(width, height, max_crops)
    cols, rows = grid
    mask = patch_mask(grid, padding)
    crops = mask.reshape(rows, MASK_SIDE, cols, MASK_SIDE).transpose(0, 2, 1, 3).reshape(-1, MASK_SIDE, MASK_SIDE)
    r, c = useful_cells(crops, (rows, cols))
    return POOLED_SIDE * (POOLED_SIDE + 1) + 1 + r * (c + 1)


# ---------------------------------------------------------------- pixels


def rgb_pixels(image) -> np.ndarray:
    """A Pillow image -> (H, W, 3) uint8, as transformers' convert_to_rgb does it: an
    image with alpha (or a transparent palette colour) is blended onto white with
    Pillow's alpha_composite; any other is Pillow's convert("RGB")."""
    from ..vision.image import require_pillow

    Image = require_pillow()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def antialias_weights(in_size: int, out_size: int):
    """Which input pixels each output pixel reads and with what integer weights, as
    PyTorch's uint8 path computes them (HelperInterpLinear's
    _compute_indices_int16_weights_aa): a triangle filter stretched by the scale when
    shrinking (that is the antialiasing), weights in float64, normalised to sum to 1,
    then rounded to int16 with as many fraction bits as the largest weight allows.

    Returns (first (out,), weights (out, taps) int64, fraction bits).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # half the filter's width, in input pixels
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    j = np.arange(taps, dtype=np.int64)
    distance = ((j[None, :] + first[:, None]).astype(np.float64) - center[:, None] + 0.5) * invscale
    w = np.where(np.abs(distance) < 1.0, 1.0 - np.abs(distance), 0.0)
    w[j[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for t in range(taps):  # in order, as the C loop adds them (np.sum would pair them up)
        total += w[:, t]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    bits = 0
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << bits)).astype(np.int64)
    return first, fixed, bits


def resample_axis(pixels: np.ndarray, axis: int, out_size: int, block: int = 256) -> np.ndarray:
    """One pass of the separable resize along `axis` of (H, W, 3) uint8:
    (sum of pixel x weight + half) >> bits, clamped to 0..255 (what the AVX2 kernels'
    packs/packus saturation does). In int32, which holds 255 x 2^15 x (1 + a little);
    `block` lines across the axis at a time, so an 80-megapixel photo needs no more
    than a few megabytes of sums."""
    first, fixed, bits = antialias_weights(pixels.shape[axis], out_size)
    weights = fixed.astype(np.int32)
    source = np.moveaxis(pixels, axis, 0)  # (in, other, 3), a view
    out = np.empty((out_size, *source.shape[1:]), dtype=np.uint8)
    last = pixels.shape[axis] - 1
    for start in range(0, source.shape[1], block):
        lines = source[:, start : start + block].astype(np.int32)  # (in, b, 3)
        acc = np.full((out_size, *lines.shape[1:]), 1 << (bits - 1), dtype=np.int32)
        for t in range(weights.shape[1]):
            acc += lines[np.minimum(first + t, last)] * weights[:, t, None, None]  # zero weights past each pixel's taps
        out[:, start : start + block] = np.clip(acc >> bits, 0, 255)
    return np.moveaxis(out, 0, axis)


def resize_bilinear_antialias(pixels: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (new_h, new_w, 3) uint8: torchvision's resize (bilinear,
    antialias=True) of an 8-bit image on a CPU with AVX2: the width first, into an
    8-bit buffer, then the height; a side that keeps its size is not touched."""
    H, W, _ = pixels.shape
    if W != new_w:
        pixels = resample_axis(pixels, 1, new_w)
    if H != new_h:
        pixels = resample_axis(pixels, 0, new_h)
    return np.ascontiguousarray(pixels)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, (x - 127.5) / 127.5: transformers' fused
    rescale (1/255) and normalise (mean = std = 0.5) as torchvision runs it."""
    x = pixels.transpose(2, 0, 1).astype(np.float32)
    return (x - np.float32(127.5)) / np.float32(127.5)


def split_into_crops(canvas: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (rows*cols, C, size, size), row by row, left to right."""
    C, H, W = canvas.shape
    grid = canvas.reshape(C, H // size, size, W // size, size)
    return grid.transpose(1, 3, 0, 2, 4).reshape(-1, C, size, size)


def process_image(image, max_crops: int = DEFAULT_MAX_CROPS) -> ProcessedImage:
    """A Pillow image (any mode) -> the global view, the crops and their patch masks."""
    check_max_crops(max_crops)
    width, height = image.size
    (cols, rows), (new_w, new_h), padding = crop_layout(width, height, max_crops)
    resized = resize_bilinear_antialias(rgb_pixels(image), new_w, new_h)  # (new_h, new_w, 3)
    canvas = np.full((rows * CROP_SIZE, cols * CROP_SIZE, 3), PADDING, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized  # white on the right or at the bottom
    canvas = normalize(canvas)  # (3, TH, TW)
    if canvas.shape[1:] == (CROP_SIZE, CROP_SIZE):
        overview = canvas  # torchvision returns an image of the requested size untouched
    else:
        overview = resize_bicubic(canvas, CROP_SIZE, CROP_SIZE)  # (3, 448, 448)
    mask = patch_mask((cols, rows), padding)  # (32*rows, 32*cols)
    crop_masks = split_into_crops(mask[None], MASK_SIDE)[:, 0]  # (rows*cols, 32, 32)
    pixels = np.concatenate([overview[None], split_into_crops(canvas, CROP_SIZE)])
    masks = np.ascontiguousarray(np.concatenate([np.ones((1, MASK_SIDE, MASK_SIDE), bool), crop_masks]))
    return ProcessedImage(np.ascontiguousarray(pixels), masks, (rows, cols), (width, height), (new_w, new_h))


def check_max_crops(max_crops) -> None:
    if isinstance(max_crops, bool) or not isinstance(max_crops, (int, np.integer)) or not 1 <= max_crops <= 64:
        raise MinislmError(f"--max-crops must be an integer from 1 to 64, got {max_crops!r}")
