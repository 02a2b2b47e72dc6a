"""Phi-3-vision's image preprocessing (minislm/vision/image.py) as a specification.

The reference is the hub's `image_processing_phi3_v.py` (its numbers are in the
golden fixture, tests/test_vision_fixture.py) and, live, PyTorch's own bicubic
interpolation and torchvision-style normalisation.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import import_reference
from minislm.errors import MinislmError
from minislm.vision.image import (
    CLIP_MEAN,
    CLIP_STD,
    crop_scale,
    hd_transform,
    normalize,
    num_image_tokens,
    open_image,
    padded_size,
    process_image,
    resize_bicubic,
    split_into_crops,
)

Image = pytest.importorskip("PIL.Image")

# PyTorch sums the four taps of each direction in float32 with fused multiply-adds; we
# reproduce its arithmetic but not every rounding of its vectorised loop: outputs differ
# by a few float32 ulps of values below ~3 (measured 1.2e-6). 1e-5 is the bar.
ATOL_BICUBIC = 1e-5


# ---------------------------------------------------------------- token counts


@pytest.mark.parametrize(
    "width, height, num_crops, padded, tokens",
    [  # the worked examples of Phi-3-vision's processor (PHI3_VISION_FACTS)
        (500, 300, 16, (1008, 1680), 2353),
        (500, 300, 4, (672, 672), 757),
        (300, 700, 4, (672, 336), 469),
    ],
)
def test_worked_examples(width, height, num_crops, padded, tokens):
    assert padded_size(width, height, num_crops) == padded
    assert num_image_tokens(*padded) == tokens


def test_token_count_arithmetic():
    """144 per crop and for the global view, 12 row separators per crop row and 12 for
    the global view, one separator between crops and global view."""
    for rows in range(1, 5):
        for cols in range(1, 5):
            crops = rows * cols * 144 + rows * 12
            overview = 144 + 12
            assert num_image_tokens(rows * 336, cols * 336) == crops + 1 + overview


sizes = st.integers(1, 4000)


@settings(max_examples=300, deadline=None)
@given(width=sizes, height=sizes, num_crops=st.integers(1, 16))
def test_crop_scale_is_the_largest_that_fits(width, height, num_crops):
    w, h = max(width, height), min(width, height)
    s = crop_scale(w, h, num_crops)
    assert s >= 1
    assert s * math.ceil(s / (w / h)) <= num_crops
    assert (s + 1) * math.ceil((s + 1) / (w / h)) > num_crops


@settings(max_examples=300, deadline=None)
@given(width=sizes, height=sizes, num_crops=st.integers(1, 16))
def test_padded_size_is_a_grid_within_num_crops(width, height, num_crops):
    if max(width, height) > 336 * min(width, height):  # may resize to 0 pixels high
        try:
            padded_size(width, height, num_crops)
        except MinislmError as e:
            assert "too thin" in str(e)
            return
    H, W = padded_size(width, height, num_crops)
    assert H % 336 == 0 and W % 336 == 0
    assert 1 <= (H // 336) * (W // 336) <= num_crops
    # a portrait image is processed as its transpose, then turned back
    assert padded_size(height, width, num_crops) == (W, H)


# ---------------------------------------------------------------- pixels


def picture(width: int, height: int, seed: int = 0) -> "Image.Image":
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "width, height, num_crops",
    [
        (500, 300, 4),  # landscape
        (300, 700, 6),  # portrait: padded left and right
        (1, 1, 16),  # tiny: upscaled to 4 x 4 crops
        (7, 3, 2),
        (2000, 40, 16),  # extreme landscape: one row of 16 crops
        (40, 2000, 16),  # extreme portrait
        (336, 336, 1),
    ],
)
def test_processed_image_shapes(width, height, num_crops):
    image = process_image(picture(width, height), num_crops)
    H, W = padded_size(width, height, num_crops)
    assert image.padded_size == (H, W)
    assert image.pixel_values.shape == (1 + (H // 336) * (W // 336), 3, 336, 336)
    assert image.pixel_values.dtype == np.float32
    assert image.num_tokens == num_image_tokens(H, W)


def test_landscape_is_padded_top_and_bottom_with_white():
    padded = hd_transform(picture(500, 300), 4)  # resized to 672 x 403, padded to 672 x 672
    top = (672 - 403) // 2
    assert padded.shape == (672, 672, 3)
    assert (padded[:top] == 255).all() and (padded[top + 403 :] == 255).all()
    assert not (padded[top : top + 403] == 255).all()


def test_portrait_is_padded_left_and_right():
    padded = hd_transform(picture(300, 700), 4)  # as 700 x 300 -> 672 x 288 -> 672 x 336, turned back
    left = (336 - 288) // 2
    assert padded.shape == (672, 336, 3)
    assert (padded[:, :left] == 255).all() and (padded[:, left + 288 :] == 255).all()


def test_resize_is_pillow_bilinear_on_the_landscape_image():
    image = picture(300, 700, seed=3)
    padded = hd_transform(image, 4)
    expected = np.asarray(image.transpose(Image.Transpose.TRANSPOSE).resize((672, 288), Image.Resampling.BILINEAR))
    assert np.array_equal(padded.transpose(1, 0, 2)[24 : 24 + 288], expected)


def test_crops_are_row_major():
    """Crop (r, c) of a 2 x 3 grid is the r-th band of rows and c-th band of columns."""
    rows, cols = 2, 3
    image = np.zeros((3, rows * 336, cols * 336), np.float32)
    for r in range(rows):
        for c in range(cols):
            image[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336] = 10 * r + c
    crops = split_into_crops(image)
    assert [float(crop[0, 0, 0]) for crop in crops] == [0, 1, 2, 10, 11, 12]


def test_global_view_comes_first():
    image = process_image(picture(700, 350), 2)  # two crops side by side
    padded = normalize(hd_transform(picture(700, 350), 2))
    assert np.array_equal(image.pixel_values[0], resize_bicubic(padded, 336, 336))
    assert np.array_equal(image.pixel_values[1], padded[:, :, :336])
    assert np.array_equal(image.pixel_values[2], padded[:, :, 336:])


def test_every_mode_becomes_rgb():
    rgb = picture(40, 30)
    for mode in ("L", "P", "RGBA", "CMYK", "I;16"):
        converted = rgb.convert(mode)
        image = process_image(converted, 1)
        assert image.pixel_values.shape == (2, 3, 336, 336)
        expected = process_image(converted.convert("RGB"), 1)  # as the reference: Pillow's own convert
        assert np.array_equal(image.pixel_values, expected.pixel_values)


# ---------------------------------------------------------------- live: PyTorch


def test_normalisation_is_torchvisions_bit_for_bit():
    """ToTensor (x / 255 as float32) then Normalize (sub mean, div std), in torch."""
    torch, _ = import_reference()
    pixels = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)  # every value, each channel
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    tensor = tensor.sub(torch.tensor(CLIP_MEAN)[:, None, None]).div(torch.tensor(CLIP_STD)[:, None, None])
    assert np.array_equal(normalize(pixels), tensor.numpy())


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 1400),
    width=st.integers(1, 1400),
    out=st.sampled_from([336, 17, 1, 500]),
    seed=st.integers(0, 2**31),
)
def test_bicubic_matches_torch_interpolate(height, width, out, seed):
    """torch.nn.functional.interpolate(mode="bicubic", align_corners=False), no antialias:
    up- and down-scaling, on values in the range normalised pixels take."""
    torch, _ = import_reference()
    rng = np.random.default_rng(seed)
    image = normalize(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=(out, out), mode="bicubic")[0]
    assert np.abs(resize_bicubic(image, out, out) - expected.numpy()).max() <= ATOL_BICUBIC


# ---------------------------------------------------------------- bad files


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(MinislmError, match="not an image"):
        open_image(path)


def test_truncated_image(tmp_path):
    path = tmp_path / "cut.png"
    picture(200, 100).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinislmError, match="truncated"):
        open_image(path)


def test_decompression_bomb(tmp_path, monkeypatch):
    """More pixels than Pillow's MAX_IMAGE_PIXELS is refused before decoding."""
    path = tmp_path / "big.png"
    picture(100, 100).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(MinislmError, match="decompression bomb"):
        open_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # past 2x the limit Pillow itself raises
    with pytest.raises(MinislmError, match="decompression bomb"):
        open_image(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(MinislmError, match="no such image"):
        open_image(tmp_path / "absent.png")
    with pytest.raises(MinislmError, match="folder"):
        open_image(tmp_path)


def test_image_too_thin_to_resize():
    with pytest.raises(MinislmError, match="too thin"):
        process_image(Image.new("RGB", (6000, 1)), 1)  # 336 wide -> 0 rows high


@pytest.mark.parametrize("num_crops", [0, 17, -1, 2.5])
def test_num_crops_out_of_range(num_crops):
    with pytest.raises(MinislmError, match="num-crops"):
        process_image(picture(10, 10), num_crops)
