"""From a photo to the pixel tensors Phi-3-vision's image encoder reads.

CLIP ViT-L/14-336 sees one 336x336 square. A photo is rarely square and often much
larger, so Phi-3-vision (following InternLM-XComposer2-4KHD's "HD transform") cuts
it into a grid of 336x336 crops and adds one shrunken view of the whole image:

    photo (w x h)
      -> landscape: transpose portrait images, so the work is always on w >= h
      -> pick the crop scale s: the largest with s * ceil(s / (w/h)) <= num_crops
      -> resize to s*336 wide (PIL bilinear), keeping the aspect ratio
      -> pad the height with white to a multiple of 336 (centred; the rest at the bottom)
      -> transpose back (a portrait image is thus padded left and right)
      -> /255, CLIP's mean and std                               (3, H, W) float32
      -> global view: the padded image resized to 336x336 (PyTorch's bicubic)
      -> crops: the padded image cut into (H/336) x (W/336) squares, row by row

`pixel_values` are [global, crop(0,0), crop(0,1), ...]; each becomes 144 tokens,
plus one separator per row of 12 tokens and one between crops and global view:
`num_image_tokens`. Everything here is exact: the crops equal the reference
processor's bit for bit, the global view within float32 rounding (~1e-6).

Pillow decodes the file (an optional dependency: `pip install 'minislm[vision]'`).
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MinislmError
from .config import CELLS_PER_SIDE, CROP_SIZE, DEFAULT_NUM_CROPS, MAX_NUM_CROPS, TOKENS_PER_CROP  # noqa: F401

# OpenAI CLIP's per-channel statistics (R, G, B) of its training images.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PADDING_COLOR = 255  # white
BICUBIC_A = -0.75  # the cubic convolution kernel's free parameter, as in PyTorch (Keys uses -0.5)


@dataclass(frozen=True)
class ProcessedImage:
    """One image, ready for the vision tower.

    pixel_values: (1 + rows * cols, 3, 336, 336) float32, the global view first, then
                  the crops in row-major order
    padded_size:  (H, W) of the resized, padded image (multiples of 336): the
                  reference's `image_sizes`
    source_size:  (width, height) of the file, as Pillow reports it
    """

    pixel_values: np.ndarray
    padded_size: tuple[int, int]
    source_size: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of 336x336 crops."""
        return self.padded_size[0] // CROP_SIZE, self.padded_size[1] // CROP_SIZE

    @property
    def num_tokens(self) -> int:
        return num_image_tokens(*self.padded_size)

    def describe(self) -> str:
        """e.g. '500x300 -> 672x672: 2x2 crops + global view -> 757 tokens'."""
        (w, h), (H, W), (rows, cols) = self.source_size, self.padded_size, self.grid
        return f"{w}x{h} -> {W}x{H}: {rows}x{cols} crops + global view -> {self.num_tokens} tokens"


# ---------------------------------------------------------------- reading a file


def require_pillow():
    """Pillow, or a one-line error saying how to get it."""
    try:
        import PIL.Image
    except ImportError:
        raise MinislmError("images need Pillow: pip install 'minislm[vision]'") from None
    return PIL.Image


def open_image(path, mode: str | None = "RGB") -> "PIL.Image.Image":
    """Decode an image file to RGB, refusing what is not an image, is cut short, or would
    decode to more pixels than Pillow's decompression-bomb limit (MAX_IMAGE_PIXELS).

    Palette, grey and RGBA images become RGB as the reference processor makes them
    (Pillow's convert: alpha is dropped, not blended). EXIF rotation is not applied,
    as the reference does not apply it either. `mode=None` keeps the file's own mode
    (Phi-4-multimodal's processor blends alpha onto white itself).
    """
    Image = require_pillow()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse those ourselves
            image = Image.open(path)
    except FileNotFoundError:
        raise MinislmError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise MinislmError(f"{path}: is a folder, not an image file") from None
    except Image.UnidentifiedImageError:
        raise MinislmError(f"{path}: not an image Pillow can read") from None
    except Image.DecompressionBombError:
        image = None
    except OSError as e:
        raise MinislmError(f"{path}: cannot read ({e.strerror or e})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if image is None or (limit is not None and image.width * image.height > limit):
        size = "" if image is None else f"{image.width}x{image.height} = {image.width * image.height} pixels, "
        raise MinislmError(
            f"{path}: {size}more than Pillow's limit of {limit} pixels (a decompression bomb?); resize it first"
        )
    with image:
        try:
            image.load()  # Image.open reads only the header: a truncated file fails here
            return image.convert(mode) if mode else image.copy()
        except (OSError, SyntaxError, ValueError) as e:
            raise MinislmError(f"{path}: damaged or truncated image ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- the HD transform


def crop_scale(width: int, height: int, num_crops: int) -> int:
    """The largest s with s * ceil(s / ratio) <= num_crops, ratio = width / height >= 1.

    s is how many crops wide the resized image is; ceil(s / ratio) how many tall.
    A square image with 16 crops: s = 4 (4 x 4); 2:1 with 16: s = 5 (5 x 3 = 15).
    """
    ratio = width / height
    s = 1
    while s * math.ceil(s / ratio) <= num_crops:
        s += 1
    return s - 1


def resized_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(new_w, new_h) of a landscape image before padding: s * 336 wide, same aspect."""
    ratio = width / height
    new_w = int(crop_scale(width, height, num_crops) * CROP_SIZE)
    new_h = int(new_w / ratio)
    if new_h == 0:
        raise MinislmError(f"an image of {width}x{height} is too thin to resize to {new_w} pixels wide")
    return new_w, new_h


def padded_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(H, W) after the HD transform of a width x height image, without decoding it."""
    portrait = width < height
    if portrait:
        width, height = height, width
    new_w, new_h = resized_size(width, height, num_crops)
    h, w = math.ceil(new_h / CROP_SIZE) * CROP_SIZE, new_w
    return (w, h) if portrait else (h, w)


def num_image_tokens(height: int, width: int) -> int:
    """Placeholder tokens for a padded (H, W) image: 144 per crop and for the global view,
    one separator at the end of each row of 12 (crop rows and the global view's 12),
    and one between the crops and the global view."""
    rows, cols = height // CROP_SIZE, width // CROP_SIZE
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * CELLS_PER_SIDE


def hd_transform(image, num_crops: int) -> np.ndarray:
    """An RGB Pillow image -> (H, W, 3) uint8, resized and padded to multiples of 336."""
    Image = require_pillow()
    portrait = image.width < image.height
    if portrait:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = resized_size(image.width, image.height, num_crops)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))  # (new_h, new_w, 3)
    target = math.ceil(new_h / CROP_SIZE) * CROP_SIZE
    top = int((target - new_h) / 2)
    padded = np.full((target, new_w, 3), PADDING_COLOR, dtype=np.uint8)
    padded[top : top + new_h] = resized
    return padded.transpose(1, 0, 2) if portrait else padded


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32: x / 255, minus CLIP's mean, over its std.
    The same float32 operations in the same order as torchvision, so bit-identical."""
    x = pixels.astype(np.float32).transpose(2, 0, 1) / np.float32(255)  # (3, H, W)
    return (x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


def split_into_crops(image: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (rows * cols, 3, 336, 336), row by row, left to right."""
    C, H, W = image.shape
    rows, cols = H // CROP_SIZE, W // CROP_SIZE
    grid = image.reshape(C, rows, CROP_SIZE, cols, CROP_SIZE)
    return grid.transpose(1, 3, 0, 2, 4).reshape(rows * cols, C, CROP_SIZE, CROP_SIZE)


def process_image(image, num_crops: int = DEFAULT_NUM_CROPS) -> ProcessedImage:
    """A Pillow image (any mode) -> the global view and crops the tower reads."""
    check_num_crops(num_crops)
    source_size = image.size
    padded = normalize(hd_transform(image.convert("RGB"), num_crops))  # (3, H, W)
    global_view = resize_bicubic(padded, CROP_SIZE, CROP_SIZE)  # (3, 336, 336)
    pixels = np.concatenate([global_view[None], split_into_crops(padded)])
    return ProcessedImage(np.ascontiguousarray(pixels), padded.shape[1:], source_size)


def check_num_crops(num_crops: int) -> None:
    if isinstance(num_crops, bool) or not isinstance(num_crops, (int, np.integer)) or not 1 <= num_crops <= MAX_NUM_CROPS:
        raise MinislmError(f"--num-crops must be an integer from 1 to {MAX_NUM_CROPS}, got {num_crops!r}")


# ---------------------------------------------------------------- PyTorch's bicubic


def fused_multiply_add(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32, as the FMA instruction does. PyTorch's compiled
    kernel fuses its multiply-adds this way; rounding twice instead moves the taps'
    positions by an ulp, which upscaling (a 13-pixel-wide image to 336) magnifies into
    differences of 3e-5. The product of two float32 numbers is exact in float64."""
    return (np.float64(a) * np.asarray(b, np.float64) + np.float64(c)).astype(np.float32)


def cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four taps' weights for offsets t in [0, 1] past the left-middle pixel:
    Keys' cubic convolution with a = -0.75, evaluated by Horner's rule as PyTorch does."""
    a = np.float32(BICUBIC_A)
    fma = fused_multiply_add

    def near(x):  # |x| <= 1: (a + 2)|x|^3 - (a + 3)|x|^2 + 1
        return fma(fma(a + 2, x, -(a + 3)) * x, x, 1)

    def far(x):  # 1 < |x| < 2: a|x|^3 - 5a|x|^2 + 8a|x| - 4a
        return fma(fma(fma(a, x, -5 * a), x, 8 * a), x, -4 * a)

    one = np.float32(1)
    rest = one - t
    return np.stack([far(t + one), near(t), near(rest), far(rest + one)], axis=-1)  # (n, 4)


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which 4 input pixels each output pixel reads, and with what weights: (out, 4) each.

    `interpolate(mode="bicubic", align_corners=False)` without antialiasing: output
    pixel i is centred on input coordinate scale * (i + 0.5) - 0.5; the taps are the
    two pixels either side of it, and taps past the border read the edge pixel.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centers = fused_multiply_add(scale, np.arange(out_size, dtype=np.float32) + np.float32(0.5), -0.5)  # (out,)
    left = np.minimum(np.floor(centers), in_size - 1).astype(np.int64)  # the tap just left of the centre
    t = np.clip(centers - left.astype(np.float32), 0, 1).astype(np.float32)
    index = np.clip(left[:, None] + np.arange(-1, 3), 0, in_size - 1)  # (out, 4)
    return index, cubic_weights(t)


def interpolate_last_axis(x: np.ndarray, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(..., n) -> (..., out): each output the weighted sum of its 4 taps, added in
    PyTorch's order (tap 0 first), so the float32 rounding is the same."""
    out = x[..., index[:, 0]] * weights[:, 0]
    for tap in range(1, 4):
        out += x[..., index[:, tap]] * weights[:, tap]
    return out


def resize_bicubic(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, out_h, out_w), PyTorch's bicubic: along each row first,
    then along each column, as PyTorch nests its sums."""
    along_rows = interpolate_last_axis(image, *bicubic_taps(image.shape[2], out_w))  # (C, H, out_w)
    along_cols = interpolate_last_axis(along_rows.transpose(0, 2, 1), *bicubic_taps(image.shape[1], out_h))
    return np.ascontiguousarray(along_cols.transpose(0, 2, 1))  # (C, out_h, out_w)
