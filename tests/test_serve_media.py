"""`minislm serve` with pictures and sound: OpenAI's `image_url` (data URLs) and
`input_audio` content parts, through the official `openai` client.

The models are the golden fixtures (tests/conftest.py: phi4mm_dir, phi3_v_dir), whose
outputs tests/test_phi4mm_fixture.py and tests/test_vision_fixture.py check against
transformers. Here: that the server builds the prompt the Python API builds from the
same files (and so the tokens `minislm generate --image/--audio` prints, which
tests/test_phi4mm_cli.py ties to the API), runs it under the adapter the media choose,
never reuses a KV cache computed under another adapter, and refuses bad media with a
400 naming the part.
"""

import base64

import numpy as np
import pytest

import minislm
from minislm.load import BUNDLED_MODEL
from served import client, raw, running

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("soundfile")

QUESTION = "What is it?"
N = 6


@pytest.fixture(scope="module")
def phi4mm(phi4mm_dir):
    return minislm.load(phi4mm_dir)


def image_part(path) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def audio_part(path, kind="wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": kind}}


def greedy(model, messages, images=(), audios=(), n=N) -> tuple[str, int]:
    """The Python API's answer for chat messages whose text holds the tags: (text, prompt tokens)."""
    from minislm.multimodal.prompt import build_multimodal_prompt
    from minislm.runtime import generate_ids, make_sampler, sampling_settings

    p = build_multimodal_prompt(model, model.tokenizer.render_chat(messages), list(images), list(audios))
    adapted = model.with_adapter(p.adapter)
    sampler = make_sampler(adapted, sampling_settings(adapted, temperature=0), None)
    ids = list(generate_ids(adapted, p.ids, n, sampler, image_features=p.features))
    return adapted.tokenizer.decode(ids), len(p.ids)


def ask(server, messages, n=N):
    return client(server).chat.completions.create(model="any", messages=messages, max_tokens=n, temperature=0)


@pytest.mark.parametrize("inputs", [("image",), ("audio",), ("image", "audio")])
def test_media_parts_answer_as_the_api(phi4mm, phi4mm_dir, inputs):
    picture, speech = phi4mm_dir / "landscape.png", phi4mm_dir / "speech.wav"
    parts = [image_part(picture)] * ("image" in inputs) + [audio_part(speech)] * ("audio" in inputs)
    tags = "<|image_1|>\n" * ("image" in inputs) + "<|audio_1|>\n" * ("audio" in inputs)
    expected, prompt_tokens = greedy(phi4mm, [{"role": "user", "content": tags + QUESTION}],
                                     [picture] * ("image" in inputs), [speech] * ("audio" in inputs))
    with running(phi4mm) as server:
        answer = ask(server, [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}])
        adapter = "vision" if "image" in inputs else "speech"
        assert any(f"adapter {adapter}" in line for line in server.lines)
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == N
    if len(inputs) == 2:  # and what the command line prints for the same files and tags
        from test_vision_cli import minislm_cli

        result = minislm_cli("generate", "-m", phi4mm_dir, "--image", picture, "--audio", speech, tags + QUESTION,
                             "-n", N, "--temp", 0)
        assert result.returncode == 0, result.stderr
        assert result.stdout == answer.choices[0].message.content + "\n"


def test_streamed_media_answer_is_the_same(phi4mm, phi4mm_dir):
    speech = phi4mm_dir / "speech.wav"
    expected, _ = greedy(phi4mm, [{"role": "user", "content": "<|audio_1|>\nSay it."}], audios=[speech])
    messages = [{"role": "user", "content": [audio_part(speech), {"type": "text", "text": "Say it."}]}]
    with running(phi4mm) as server:
        stream = client(server).chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0,
                                                         stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected


def test_no_cache_is_reused_across_adapters(phi4mm, phi4mm_dir):
    """One slot, so every request meets the cache the previous one left. A text turn
    and a picture turn share their first tokens (system prompt, `<|user|>`), but those
    keys were computed under another adapter: nothing is reused, and each answer is
    what a fresh server gives. A follow-up under the same adapter does reuse."""
    picture = phi4mm_dir / "landscape.png"
    system = {"role": "system", "content": "You describe pictures."}
    text_turn = [system, {"role": "user", "content": "Hello there."}]
    picture_turn = [system, {"role": "user", "content": [image_part(picture), {"type": "text", "text": QUESTION}]}]
    expected_text, _ = greedy(phi4mm, text_turn)
    expected_picture, _ = greedy(phi4mm, [system, {"role": "user", "content": "<|image_1|>\n" + QUESTION}], [picture])
    with running(phi4mm, max_batch=1) as server:
        first = ask(server, text_turn)
        after_text = ask(server, picture_turn)
        follow_up = picture_turn + [{"role": "assistant", "content": after_text.choices[0].message.content},
                                    {"role": "user", "content": "And the colours?"}]
        again = ask(server, follow_up)
        after_picture = ask(server, text_turn)
    assert first.choices[0].message.content == after_picture.choices[0].message.content == expected_text
    assert after_text.choices[0].message.content == expected_picture
    assert after_text.usage.prompt_tokens_details.cached_tokens == 0
    assert after_picture.usage.prompt_tokens_details.cached_tokens == 0
    expected_again, _ = greedy(phi4mm, [system, {"role": "user", "content": "<|image_1|>\n" + QUESTION},
                                        *follow_up[2:]], [picture])
    assert again.choices[0].message.content == expected_again
    # the whole picture turn is reused: at its placeholders, the same picture's vectors
    assert again.usage.prompt_tokens_details.cached_tokens >= after_text.usage.prompt_tokens


def test_another_picture_of_the_same_size_is_not_reused(phi3_v_dir):
    """Two pictures of one size give the same placeholder ids; only their vectors tell
    them apart, so the cache is kept up to the first placeholder and no further."""
    model = minislm.load(phi3_v_dir)
    picture = phi3_v_dir / "landscape.png"
    flipped = Image.open(picture).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    question = {"type": "text", "text": QUESTION}
    p = model.image_prompt("<|image_1|>\n" + QUESTION, [flipped])
    expected = model.tokenizer.decode(list(model.generate(p.ids, N, temperature=0, image_features=p.features)))
    with running(model, max_batch=1) as server:
        ask(server, [{"role": "user", "content": [image_part(picture), question]}])
        other = ask(server, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(flipped)}},
                                                          question]}])
    assert other.choices[0].message.content == expected
    assert other.usage.prompt_tokens_details.cached_tokens == int(np.argmax(p.ids < 0))


def test_the_encoders_run_on_the_scheduler_thread(phi4mm, phi4mm_dir, monkeypatch):
    """Numba's threading layer need not take parallel calls from two threads: the
    request's thread only decodes and cuts, the model's thread encodes."""
    import threading

    import minislm.multimodal.prompt as prompt

    threads, build = [], prompt.build_multimodal_prompt

    def recorded(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return build(*args, **kwargs)

    monkeypatch.setattr(prompt, "build_multimodal_prompt", recorded)
    with running(phi4mm) as server:
        ask(server, [{"role": "user", "content": [audio_part(phi4mm_dir / "speech.wav")]}], n=1)
    assert threads == ["minislm-scheduler"]


def test_phi3_vision_reads_image_url(phi3_v_dir, phi4mm_dir):
    model = minislm.load(phi3_v_dir)
    picture = phi3_v_dir / "landscape.png"
    p = model.image_prompt("<|image_1|>\n" + QUESTION, [picture])
    expected = model.tokenizer.decode(list(model.generate(p.ids, N, temperature=0, image_features=p.features)))
    with running(model) as server:
        answer = ask(server, [{"role": "user", "content": [image_part(picture), {"type": "text", "text": QUESTION}]}])
        status, _, body = raw(server, "POST", "/v1/chat/completions", {"messages": [
            {"role": "user", "content": [audio_part(phi4mm_dir / "speech.wav")]}]})
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == len(p.ids)
    assert status == 400 and body["error"]["param"] == "messages[0].content[0]"
    assert "phi3_v model, which reads pictures but cannot hear" in body["error"]["message"]


def refusal(server, content, **fields) -> tuple[int, dict]:
    status, _, body = raw(server, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields})
    return status, body["error"]


def png_url(picture) -> str:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("part, param, message", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "messages[0].content[0]",
     "only data URLs (data:image/...;base64,...) are accepted, not https: this server fetches nothing from the network"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, "messages[0].content[0]",
     "image_url.url: not valid base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF89a?").decode()}},
     "messages[0].content[0]", "not an image Pillow can read"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF....WAVE junk").decode(),
                                             "format": "wav"}}, "messages[0].content[0]", "not a sound file"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, "messages[0].content[0]",
     "format: 'aiff' is not one of wav, mp3, flac, ogg"),
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "messages[0].content[0]",
     "a part is"),
])
def test_bad_parts_are_400s_naming_the_part(phi4mm, part, param, message):
    with running(phi4mm) as server:
        status, error = refusal(server, [part, {"type": "text", "text": "Hi"}])
    assert status == 400, error
    assert error["param"] == param
    assert message in error["message"]
    assert error["message"].startswith(param)


def test_mp3_without_a_decoder_is_a_400(phi4mm, phi4mm_dir, monkeypatch):
    import soundfile

    monkeypatch.setattr(soundfile, "available_formats", lambda: {"WAV": "Microsoft", "FLAC": "FLAC"})
    with running(phi4mm) as server:
        status, error = refusal(server, [audio_part(phi4mm_dir / "speech.wav", "mp3")])
    assert status == 400
    assert error["message"].startswith("messages[0].content[0]: mp3 needs libsndfile 1.1 or newer")


def test_too_many_pixels_or_seconds_are_400s(phi4mm, phi4mm_dir, monkeypatch):
    import minislm.multimodal.audio as audio

    with running(phi4mm) as server:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        status, error = refusal(server, [{"type": "text", "text": "Look."},
                                         {"type": "image_url", "image_url": {"url": png_url(Image.new("RGB", (40, 40)))}}])
        assert (status, error["param"]) == (400, "messages[0].content[1]")
        assert "a 40x40 picture, more than 1000 pixels" in error["message"]
        monkeypatch.setattr(audio, "MAX_SECONDS", 2)
        status, error = refusal(server, [audio_part(phi4mm_dir / "speech.wav")])
        assert (status, error["param"]) == (400, "messages[0].content[0]")
        assert "minutes of audio; at most" in error["message"]


def test_a_prompt_longer_than_the_context_is_refused_before_encoding(phi4mm, phi4mm_dir, monkeypatch):
    import minislm.multimodal.prompt as prompt

    encoded = []
    monkeypatch.setattr(prompt, "build_multimodal_prompt", lambda *a, **k: encoded.append(1))
    with running(phi4mm, ctx_size=64) as server:
        status, error = refusal(server, [image_part(phi4mm_dir / "landscape.png")])
    assert status == 400 and error["code"] == "context_length_exceeded"
    assert "with its pictures and sounds" in error["message"] and not encoded


def test_media_for_a_text_model_and_n_above_one_are_400s(phi4mm, phi4mm_dir):
    text_model = minislm.load(BUNDLED_MODEL)
    with running(text_model) as server:
        status, error = refusal(server, [{"type": "text", "text": "Hi"}, image_part(phi4mm_dir / "landscape.png")])
    assert (status, error["param"]) == (400, "messages[0].content[1]")
    assert f"a {text_model.config.model_type} model, which reads text only" in error["message"]
    with running(phi4mm) as server:
        status, error = refusal(server, [audio_part(phi4mm_dir / "speech.wav")], n=2)
    assert (status, error["param"]) == (400, "n")
    assert "decodes alone" in error["message"]


def test_text_parts_alone_still_work(phi4mm):
    """A list of text parts is no media: the batched path, as before."""
    expected, _ = greedy(phi4mm, [{"role": "user", "content": "Hello\nthere"}])
    with running(phi4mm) as server:
        answer = ask(server, [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                            {"type": "text", "text": "there"}]}])
    assert answer.choices[0].message.content == expected
    assert np.all([not line.count("media vectors") for line in server.lines])
