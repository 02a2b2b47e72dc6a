"""Phi-4-multimodal's inputs without a model: the crop layout and token count, the
8-bit resize, the log-mel features' pieces, sound files and what is refused.

The processors themselves are checked against transformers on the golden fixture
(tests/test_phi4mm_fixture.py) and, where torch is installed, on random inputs
(tests/test_live_phi4mm.py).
"""

import io
import math
import struct
import wave

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm.errors import MinislmError
from minislm.multimodal.audio import MAX_SECONDS, process_audio, read_audio
from minislm.multimodal.features import (audio_token_count, frame_count, hamming_window, kaldi_mel, log_mel,
                                         mel_filters)
from minislm.multimodal.image import (POOLED_SIDE, antialias_weights, crop_grid, crop_layout, num_image_tokens,
                                      process_image, resize_bilinear_antialias)
from minislm.multimodal.prompt import (AUDIO_MARK, MultimodalPrompt, adapter_for, check_tags, IMAGE_TAG, with_tags)
from minislm.multimodal.siglip import gelu_tanh, position_ids

Image = pytest.importorskip("PIL.Image")


# ---------------------------------------------------------------- the crop grid and the token count


@pytest.mark.parametrize("size, grid, tokens", [
    ((500, 300), (2, 1), 721),  # the worked example of docs/multimodal.md
    ((448, 448), (1, 1), 545),
    ((1000, 1000), (3, 3), 2625),
    ((300, 700), (1, 2), 753),
    ((3000, 3000), (6, 6), 9585),  # 7 x 7 = 49 crops > 36: the closest grid of at most 36
    ((9000, 120), (21, 1), 1958),
])
def test_worked_token_counts(size, grid, tokens):
    """Counts transformers' Phi4MultimodalImageProcessor gave for these sizes."""
    assert crop_grid(*size) == grid
    assert num_image_tokens(*size) == tokens


@settings(max_examples=200, deadline=None)
@given(width=st.integers(10, 20000), height=st.integers(10, 20000), max_crops=st.integers(1, 64))
def test_crop_layout_properties(width, height, max_crops):
    try:
        (cols, rows), (new_w, new_h), (pad_w, pad_h) = crop_layout(width, height, max_crops)
    except MinislmError as e:  # too thin to resize: transformers refuses the same
        assert "too thin" in str(e)
        return
    natural = (math.ceil(width / 448), math.ceil(height / 448))  # crops that cover the image at its size
    if natural[0] * natural[1] <= max_crops:
        assert (cols, rows) == natural
    else:
        assert cols * rows <= max_crops
    assert new_w + pad_w == 448 * cols and new_h + pad_h == 448 * rows
    assert pad_w == 0 or pad_h == 0  # the resize fills the grid's width or its height
    assert min(pad_w, pad_h) >= 0
    n = num_image_tokens(width, height, max_crops)
    useful = n - POOLED_SIDE * (POOLED_SIDE + 1) - 1
    assert 0 < useful <= rows * POOLED_SIDE * (cols * POOLED_SIDE + 1)


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(MinislmError, match="too thin"):
        crop_layout(20000, 10, 36)


def test_processed_image_matches_the_count_and_masks_padding():
    picture = Image.fromarray(np.full((300, 500, 3), 90, np.uint8))
    image = process_image(picture)
    assert image.pixel_values.shape == (3, 3, 448, 448) and image.pixel_values.dtype == np.float32
    assert image.num_tokens == num_image_tokens(500, 300) == 721
    assert image.patch_mask[0].all() and image.patch_mask[1].all()
    assert image.patch_mask[2][:, :22].all() and not image.patch_mask[2][:, 22:].any()  # 150 white pixels: 10 patches
    assert np.all(image.pixel_values[2][:, :, 448 - 150:] == 1.0)  # white is (255 - 127.5) / 127.5
    assert image.useful_cells == (16, 27)


def test_transparent_pixels_are_blended_onto_white():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 20:, 3] = 255  # left half fully transparent
    image = process_image(Image.fromarray(rgba, "RGBA"))
    crop = image.pixel_values[1]  # (3, 448, 448): the 40x40 picture resized to 448x448
    assert np.allclose(crop[:, 200, 10], 1.0)  # white where transparent
    assert np.allclose(crop[:, 200, 400], [(200 - 127.5) / 127.5, -1.0, -1.0])  # red where opaque


@settings(max_examples=60, deadline=None)
@given(size_in=st.integers(1, 3000), size_out=st.integers(1, 3000))
def test_antialias_weights_sum_to_one_in_fixed_point(size_in, size_out):
    first, fixed, bits = antialias_weights(size_in, size_out)
    assert fixed.min() >= 0 and fixed.max() < 2**15
    sums = fixed.sum(axis=1)
    assert np.all(np.abs(sums - 2**bits) <= fixed.shape[1])  # each weight rounded by at most 1/2
    assert first.min() >= 0 and np.all(first < size_in)


def test_resize_keeps_a_flat_image_flat_and_is_identity_at_the_same_size():
    flat = np.full((37, 53, 3), 77, np.uint8)
    assert np.all(resize_bilinear_antialias(flat, 11, 90) == 77)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(resize_bilinear_antialias(pixels, 30, 20), pixels)


def test_navit_positions():
    """An unpadded crop reads the table row by row; a crop with 22 valid columns spreads
    the 32 columns over them (floor(c * 32 / 22), the float32 product at c = 11 landing
    exactly on a bucket boundary, which goes up); padding reads position 0."""
    full = np.ones((1, 32, 32), bool)
    assert np.array_equal(position_ids(full, 32)[0], np.arange(1024))
    mask = full.copy()
    mask[0, :, 22:] = False
    ids = position_ids(mask, 32)[0].reshape(32, 32)
    assert ids[0, :22].tolist() == [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16, 17, 18, 20, 21, 23, 24, 26, 27, 29, 30]
    assert (ids[:, 22:] == 0).all() and ids[5, 3] == 5 * 32 + 4


def test_gelu_tanh_against_its_formula():
    x = np.linspace(-8, 8, 1001, dtype=np.float32)
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    assert np.abs(gelu_tanh(x) - exact).max() < 1e-5


# ---------------------------------------------------------------- log-mel features


def test_feature_counts():
    assert frame_count(399) == 0 and frame_count(400) == 1 and frame_count(16000) == 98
    assert audio_token_count(98) == 13 and audio_token_count(8) == 1 and audio_token_count(9) == 2


def test_mel_filters_are_triangles_on_kaldis_scale():
    filters = mel_filters()
    assert filters.shape == (257, 80) and filters.dtype == np.float32
    assert filters.min() == 0 and filters.max() <= 1
    centers = np.linspace(kaldi_mel(0.0), kaldi_mel(7690.0), 82)[1:-1]
    bins = kaldi_mel(16000 / 512 * np.arange(257))
    peak = bins[filters.argmax(axis=0)]
    assert np.all(np.abs(peak - centers) <= np.diff(bins).max())  # each triangle peaks at its centre
    assert filters[bins > kaldi_mel(7690.0)].max() == 0  # nothing above 7690 Hz


def test_hamming_window_is_symmetric():
    w = hamming_window()
    assert w.dtype == np.float64 and len(w) == 400
    assert np.allclose(w, w[::-1]) and np.isclose(w[0], 0.08) and np.isclose(w.max(), 1.0, atol=1e-4)


def test_log_mel_of_a_tone_peaks_at_its_band():
    t = np.arange(16000) / 16000
    features = log_mel((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    band = np.argmax(np.minimum(mel_filters()[int(1000 / 31.25)], 1))  # the filter holding 1 kHz's bin
    assert abs(int(np.median(features.argmax(axis=1))) - int(band)) <= 1
    silent = log_mel(np.zeros(16000, np.float32))
    assert np.all(silent == 0)  # log(max(0, 1)) = 0


def test_too_short_audio_is_refused():
    with pytest.raises(MinislmError, match="at least 25 ms"):
        log_mel(np.zeros(399, np.float32))


# ---------------------------------------------------------------- sound files


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.asarray(samples, "<i2").tobytes())
    return buffer.getvalue()


def test_16_bit_pcm_reads_as_x_over_32768(tmp_path):
    pcm = np.array([0, 1, -1, 32767, -32768, 1000] * 100, np.int16)
    path = tmp_path / "a.wav"
    path.write_bytes(wav_bytes(pcm, 16000))
    samples, rate, channels = read_audio(path)
    assert rate == 16000 and channels == 1
    assert np.array_equal(samples, pcm.astype(np.float32) / 32768)


def test_stereo_44k_is_averaged_and_resampled(tmp_path):
    t = np.arange(44100) / 44100
    left = np.round(8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    stereo = np.stack([left, left], axis=1)
    path = tmp_path / "stereo.wav"
    path.write_bytes(wav_bytes(stereo.reshape(-1), 44100, channels=2))
    audio = process_audio(path)
    assert audio.source_rate == 44100 and audio.source_channels == 2
    assert abs(len(audio.samples) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio.samples[1000:-1000]))  # a 440 Hz tone stays a 440 Hz tone
    assert abs(np.argmax(spectrum) * 16000 / len(audio.samples[1000:-1000]) - 440) < 2
    assert "44100 Hz, 2 channels" in audio.describe()


def test_samples_and_rate_directly():
    audio = process_audio((np.zeros(8000, np.float32), 8000))
    assert len(audio.samples) == 16000 and audio.num_tokens == audio_token_count(frame_count(16000))


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"),
    (b"this is not a sound file at all" * 10, "not a sound file soundfile can read"),
])
def test_bad_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(MinislmError, match=message) as info:
        process_audio(path)
    assert "\n" not in str(info.value)


def test_truncated_wav_is_refused(tmp_path):
    data = wav_bytes(np.zeros(16000, np.int16), 16000)
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinislmError, match="truncated WAV file"):
        process_audio(path)


def test_ten_hours_are_refused_from_the_header(tmp_path):
    """A (sparse) 10-hour WAV: refused from its header, before a sample is read."""
    rate, seconds = 16000, 10 * 3600
    data_bytes = rate * seconds * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes)
    path = tmp_path / "long.wav"
    with open(path, "wb") as f:
        f.write(header)
        f.seek(len(header) + data_bytes - 1)
        f.write(b"\0")
    with pytest.raises(MinislmError, match=f"600.0 minutes of audio; at most {MAX_SECONDS // 60} minutes"):
        process_audio(path)


def test_wrong_sample_format_is_refused(tmp_path):
    """A WAV whose format tag is one libsndfile cannot decode (0x0055 is MP3-in-WAV, 0x1234 nothing)."""
    header = b"RIFF" + struct.pack("<I", 36 + 4) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, 0x1234, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", 4) + b"\0\0\0\0"
    path = tmp_path / "odd.wav"
    path.write_bytes(header)
    with pytest.raises(MinislmError, match="not a sound file soundfile can read") as info:
        process_audio(path)
    assert "\n" not in str(info.value)


def test_missing_and_folder(tmp_path):
    with pytest.raises(MinislmError, match="no such sound file"):
        process_audio(tmp_path / "absent.wav")
    with pytest.raises(MinislmError, match="is a folder"):
        process_audio(tmp_path)


def test_bytes_from_a_request():
    audio = process_audio(wav_bytes(np.zeros(3200, np.int16), 16000), name="input_audio")
    assert audio.num_tokens == audio_token_count(frame_count(3200))
    with pytest.raises(MinislmError, match="input_audio: the audio is empty"):
        process_audio(b"", name="input_audio")


# ---------------------------------------------------------------- tags and the adapter


def test_tags_and_the_adapter_rule():
    assert with_tags("Hi", 1, 1) == "<|image_1|><|audio_1|>Hi"
    assert with_tags("<|audio_1|> then", 0, 1) == "<|audio_1|> then"
    assert (adapter_for(1, 0), adapter_for(1, 2), adapter_for(0, 1), adapter_for(0, 0)) == ("vision", "vision", "speech", None)
    with pytest.raises(MinislmError, match="in that order"):
        check_tags("<|image_2|><|image_1|>", IMAGE_TAG, 2, "image")


def test_prompt_spans():
    ids = np.array([5, -1, -1, 6, -(AUDIO_MARK + 1), -(AUDIO_MARK + 1), -(AUDIO_MARK + 1), 7])
    prompt = MultimodalPrompt(ids, np.zeros((5, 4), np.float32), "vision")
    assert prompt.spans() == [("image 1", 1, 3), ("audio 1", 4, 7)]
