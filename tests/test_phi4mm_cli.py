"""Phi-4-multimodal from the command line: generate --image/--audio, chat /image and
/audio, --lora, trace and explain with sound, and bad media as one line (exit 2).

The model is the golden fixture's (tests/conftest.py: phi4mm_dir); what it computes is
checked against transformers in tests/test_phi4mm_fixture.py. Here: that the CLI
feeds it the same prompt the API builds, with the same adapter.
"""

import base64
import json
import re
import struct

import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from test_vision_cli import assert_clean_error, minislm_cli

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def model(phi4mm_dir):
    return minislm.load(phi4mm_dir)


def greedy_text(model, prompt, images=(), audios=(), n=6):
    from minislm.runtime import generate_ids, make_sampler, sampling_settings

    p = model.multimodal_prompt(prompt, [str(i) for i in images], [str(a) for a in audios])
    adapted = model.with_adapter(p.adapter)
    sampler = make_sampler(adapted, sampling_settings(adapted, temperature=0), None)
    ids = list(generate_ids(adapted, p.ids, n, sampler, image_features=p.features))
    return adapted.tokenizer.decode(ids), p


@pytest.mark.parametrize("inputs", [("image",), ("audio",), ("image", "audio")])
def test_generate_equals_the_api(model, phi4mm_dir, inputs):
    images = [phi4mm_dir / "landscape.png"] if "image" in inputs else []
    audios = [phi4mm_dir / "speech.wav"] if "audio" in inputs else []
    expected, prompt = greedy_text(model, "What is it?", images, audios)
    flags = [f for i in images for f in ("--image", i)] + [f for a in audios for f in ("--audio", a)]
    result = minislm_cli("generate", "-m", phi4mm_dir, *flags, "What is it?", "-n", 6, "--temp", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    adapter = "vision" if images else "speech"
    assert f"adapter: {adapter}" in result.stderr
    if audios:
        start, stop = [(a, b) for name, a, b in prompt.spans() if name == "audio 1"][0]
        assert f"audio 1: 3.00 s at 16000 Hz -> 298 mel frames -> 38 tokens, positions {start}..{stop - 1}" in result.stderr


def test_merge_lora_gives_the_same_tokens(phi4mm_dir):
    common = ("generate", "-m", phi4mm_dir, "--audio", phi4mm_dir / "speech.wav", "Transcribe.", "-n", 6, "--temp", 0)
    plain, merged = minislm_cli(*common), minislm_cli(*common, "--merge-lora")
    assert plain.returncode == merged.returncode == 0, merged.stderr
    assert plain.stdout == merged.stdout


def test_chat_switches_adapters_and_reuses_the_cache(phi4mm_dir):
    script = "\n".join(["hello", f"/audio {phi4mm_dir / 'speech.wav'}", "what was said?",
                        f"/image {phi4mm_dir / 'landscape.png'}", "and this?", "more", "/audio nowhere.wav", "/bye"])
    result = minislm_cli("chat", "-m", phi4mm_dir, "-n", 3, "--temp", 0, stdin=script + "\n")
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "/image PATH or /audio PATH" in err
    assert "[audio 1: 3.00 s at 16000 Hz" in err and "[image 1: 500x300" in err
    assert "[adapter None -> speech: the cache starts over]" in err
    assert "[adapter speech -> vision: the cache starts over]" in err
    assert re.search(r"\(\d+ reused from the cache\)", err.split("speech -> vision")[1])  # "more": same adapter
    assert "minislm: error: nowhere.wav: no such sound file" in err


def test_chat_turn_equals_the_api(model, phi4mm_dir):
    """A chat's first turn with a recording is the API's prompt with the same tags."""
    result = minislm_cli("chat", "-m", phi4mm_dir, "-n", 5, "--temp", 0,
                         stdin=f"/audio {phi4mm_dir / 'speech.wav'}\nSay it.\n/bye\n")
    expected, _ = greedy_text(model, "<|audio_1|>Say it.", audios=[phi4mm_dir / "speech.wav"], n=5)
    assert expected in result.stdout


def test_lora_flag_on_a_phi3_model_equals_the_api():
    from minislm.lora import read_peft_adapter

    base = minislm.load(FIXTURES / "gqa")
    adapted = base.with_adapter(read_peft_adapter(FIXTURES / "lora" / "phi3", base.weights, base.config))
    tokens = list(adapted.generate(adapted.tokenizer.encode("hello there"), 5, temperature=0))
    result = minislm_cli("generate", "-m", FIXTURES / "gqa", "--lora", FIXTURES / "lora" / "phi3", "--no-chat-template",
                         "hello there", "-n", 5, "--temp", 0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == adapted.tokenizer.decode(tokens) + "\n"
    assert "[adapter phi3: W·x + (B·(A·x))·2, r 4, on" in result.stderr


@pytest.mark.parametrize("flags, fragments", [
    (("--lora", FIXTURES / "lora" / "phimoe"), ("--lora", "target module 'model.layers.0.self_attn.k_proj'")),
    (("--lora", FIXTURES / "nowhere"), ("--lora", "no such adapter folder")),
    (("--merge-lora",), ("--merge-lora needs --lora DIR",)),
])
def test_lora_flag_errors(flags, fragments):
    assert_clean_error(minislm_cli("generate", "-m", FIXTURES / "gqa", *flags, "hi", "-n", 2), *fragments)


def test_lora_on_phi4mm_is_refused(phi4mm_dir):
    assert_clean_error(minislm_cli("generate", "-m", phi4mm_dir, "--lora", FIXTURES / "lora" / "phi3", "hi", "-n", 1),
                       "is Phi-4-multimodal, which runs its own vision and speech adapters")


def test_audio_for_a_text_model_is_refused(phi4mm_dir):
    assert_clean_error(minislm_cli("generate", "-m", FIXTURES / "gqa", "--audio", phi4mm_dir / "speech.wav", "hi"),
                       "--audio", "cannot hear")


def sparse_ten_hour_wav(path):
    rate, data_bytes = 16000, 16000 * 36000 * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes)
    with open(path, "wb") as f:
        f.write(header)
        f.seek(len(header) + data_bytes - 1)
        f.write(b"\0")
    return path


def written(path, content):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("make, fragments", [
    (lambda d: written(d / "empty.wav", b""), ("empty.wav: the file is empty",)),
    (lambda d: written(d / "cut.wav", (FIXTURES / "phi4mm" / "speech.wav").read_bytes()[:5000]),
     ("cut.wav: truncated WAV file",)),
    (lambda d: sparse_ten_hour_wav(d / "long.wav"), ("long.wav: 600.0 minutes of audio",)),
    (lambda d: written(d / "notes.wav", b"not audio " * 50), ("not a sound file",)),
])
def test_bad_sound_files_fail_before_loading(tmp_path, phi4mm_dir, make, fragments):
    """Each one line and exit 2, and before the model loads (a missing model would say so otherwise)."""
    path = make(tmp_path)
    assert_clean_error(minislm_cli("generate", "-m", tmp_path / "no-model", "--audio", path, "hi"), *fragments)


def test_huge_picture_is_refused(tmp_path, phi4mm_dir):
    """A 100-megapixel PNG (10000 x 10000, one colour: a small file) is past Pillow's
    decompression-bomb limit and refused before it is decoded."""
    path = tmp_path / "huge.png"
    Image.new("L", (10000, 10000), 0).save(path, optimize=True)
    assert_clean_error(minislm_cli("generate", "-m", tmp_path / "no-model", "--image", path, "hi"),
                       "100000000 pixels", "decompression bomb")


def test_trace_with_audio_and_the_spectrogram(model, phi4mm_dir, tmp_path):
    png = tmp_path / "spectrogram.png"
    result = minislm_cli("trace", "-m", phi4mm_dir, "--audio", phi4mm_dir / "speech.wav", "--chat", "Say it.",
                         "--layers", "0", "--spectrogram", png)
    assert result.returncode == 0, result.stderr
    _, prompt = greedy_text(model, "Say it.", audios=[phi4mm_dir / "speech.wav"])
    lines = result.stdout.splitlines()
    assert lines[1] == f"audio 1: 3.00 s at 16000 Hz -> 298 mel frames -> 38 tokens, positions 1..38 of {len(prompt.ids)}"
    assert lines[2].startswith("adapter speech: W·x + (B·(A·x))·2, r 320, on qkv_proj, o_proj, gate_up_proj, down_proj")
    steps = {line.split()[0]: line for line in lines[3:]}
    assert "(298, 80)" in steps["audio_features"] and "(38, 32)" in steps["audio_states"]
    assert "(38, 64)" in steps["audio_tokens"]
    picture = Image.open(png)
    assert picture.size[0] > 300 and picture.size[1] > 100


def test_explain_with_picture_and_sound(phi4mm_dir, tmp_path):
    out = tmp_path / "page.html"
    result = minislm_cli("explain", "-m", phi4mm_dir, "--image", phi4mm_dir / "landscape.png", "--audio",
                         phi4mm_dir / "speech.wav", "Describe.", "--layers", "0", "--out", out)
    assert result.returncode == 0, result.stderr
    html = out.read_text()
    data = json.loads(html.split('<script type="application/json" id="data">')[1].split("</script>")[0])
    audio = data["audios"][0]
    assert (audio["frames"], audio["bins"], audio["tokens"], audio["frames_per_token"]) == (298, 80, 38, 8)
    assert len(np.frombuffer(base64.b64decode(audio["spectrogram"]), np.uint8)) == 298 * 80
    assert data["images"][0]["tokens"] == 721
    assert data["adapter"].startswith("vision: W·x + (B·(A·x))·2, r 256")
    pieces = [t["piece"] for t in data["tokens"]]
    assert pieces.count("<audio_1>") == 38 and pieces.count("<image_1>") == 721


@pytest.mark.parametrize("layout", ["hub", "converted"])
def test_quantize_keeps_the_encoders_bf16(phi4mm_dir, phi4mm_converted_dir, tmp_path, layout):
    """`minislm quantize`: the decoder int4 (its output layer int8), every encoder and
    projector matrix bf16, the adapters kept; the folder loads to the same weights as
    quantizing at load time."""
    from minislm.kernels import Bf16Weight, Int4Weight
    from minislm.multimodal.config import EXTEND

    source = phi4mm_dir if layout == "hub" else phi4mm_converted_dir
    result = minislm_cli("quantize", "-m", source, "--out", tmp_path / "int4")
    assert result.returncode == 0, result.stderr
    saved, in_memory = minislm.load(tmp_path / "int4"), minislm.load(source, quant="int4")
    encoders = [n for n, w in saved.weights.items() if n.startswith(EXTEND) and not isinstance(w, np.ndarray)]
    assert encoders and all(isinstance(saved.weights[n], Bf16Weight) for n in encoders)
    assert isinstance(saved.weights["model.layers.0.mlp.down_proj.weight"], Int4Weight)
    assert set(saved.adapters) == {"vision", "speech"}
    prompt = saved.multimodal_prompt("Say it.", audios=[phi4mm_dir / "speech.wav"])
    expected = in_memory.multimodal_prompt("Say it.", audios=[phi4mm_dir / "speech.wav"])
    assert np.array_equal(prompt.features, expected.features)
    a = saved.with_adapter(prompt.adapter).logits(prompt.ids, image_features=prompt.features)
    b = in_memory.with_adapter(expected.adapter).logits(expected.ids, image_features=expected.features)
    assert np.array_equal(a, b)
