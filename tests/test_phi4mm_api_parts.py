"""OpenAI content parts for Phi-4-multimodal (minislm/multimodal/api_parts.py): data URLs
only, checked before decoding, each problem one line naming the part."""

import base64
import io
import wave

import numpy as np
import pytest

import minislm
from minislm.errors import MinislmError
from minislm.multimodal.api_parts import messages_with_media

Image = pytest.importorskip("PIL.Image")


def png_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_b64(samples, rate=16000) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.asarray(samples, "<i2").tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


def test_parts_become_tags_in_order(phi4mm_dir):
    picture = Image.open(phi4mm_dir / "landscape.png")
    speech = base64.b64encode((phi4mm_dir / "speech.wav").read_bytes()).decode()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(picture)}},
                                     {"type": "text", "text": "What is this?"},
                                     {"type": "input_audio", "input_audio": {"data": speech, "format": "wav"}}]},
    ]
    plain, images, audios = messages_with_media(messages)
    assert plain[0] == messages[0]
    assert plain[1] == {"role": "user", "content": "<|image_1|>\nWhat is this?\n<|audio_1|>"}
    assert images[0].size == (500, 300) and audios[0].num_tokens == 38
    # the same prompt as the files give
    model = minislm.load(phi4mm_dir)
    from minislm.multimodal.prompt import build_multimodal_prompt

    text = model.tokenizer.render_chat(plain)
    from_parts = build_multimodal_prompt(model, text, images, audios)
    from_files = build_multimodal_prompt(model, text, [phi4mm_dir / "landscape.png"], [phi4mm_dir / "speech.wav"])
    assert np.array_equal(from_parts.ids, from_files.ids)
    assert np.array_equal(from_parts.features, from_files.features)


def test_mp3_is_decoded():
    import soundfile

    if "MP3" not in soundfile.available_formats():
        pytest.skip("this libsndfile has no MP3")
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(16000, np.float32), 16000, format="MP3")
    data = base64.b64encode(buffer.getvalue()).decode()
    _, _, audios = messages_with_media([{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data, "format": "mp3"}}]}])
    assert abs(audios[0].seconds - 1.0) < 0.1


@pytest.mark.parametrize("part, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
     r"messages\[0\].content\[0\].image_url.url: only data URLs .* not https"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, "not valid base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}},
     "not an image Pillow can read"),
    ({"type": "input_audio", "input_audio": {"data": wav_b64(np.zeros(100)), "format": "wav"}}, "at least 25 ms"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "the audio is empty"),
    ({"type": "input_audio", "input_audio": {"data": wav_b64(np.zeros(800)), "format": "aiff"}},
     "format: 'aiff' is not one of wav, mp3"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....WAVE junk").decode(), "format": "wav"}},
     "not a sound file"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "'video_url' is not one of"),
])
def test_bad_parts_are_refused_in_one_line(part, message):
    with pytest.raises(MinislmError, match=message) as info:
        messages_with_media([{"role": "user", "content": [part]}])
    assert "\n" not in str(info.value)


def test_a_huge_picture_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    url = png_url(Image.new("RGB", (40, 40)))
    with pytest.raises(MinislmError, match="a 40x40 picture, more than 1000 pixels"):
        messages_with_media([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
