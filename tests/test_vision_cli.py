"""Prompts with images, the CLI's --image/--num-crops and chat's /image, and the
cache: what a prompt of ids alone cannot say about images."""

import subprocess
import sys

import numpy as np
import pytest

import minislm
from conftest import FIXTURES, PHI3_V_FIXTURE
from minislm.errors import MinislmError
from minislm.vision.prompt import check_image_tags, tokenize_with_images, with_image_tags

Image = pytest.importorskip("PIL.Image")
LANDSCAPE = PHI3_V_FIXTURE / "landscape.png"


def minislm_cli(*args, stdin=None):
    """Run the CLI; stdout and stderr decoded as they are (no newline translation: the
    tiny model may well print a carriage return)."""
    result = subprocess.run(
        [sys.executable, "-m", "minislm", *map(str, args)], capture_output=True, timeout=600,
        input=None if stdin is None else stdin.encode(),
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minislm: error: "), result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def model(phi3_v_dir):
    return minislm.load(phi3_v_dir)


# ---------------------------------------------------------------- tags


def test_tags_are_added_in_front_when_absent():
    assert with_image_tags("What?", 2) == "<|image_1|>\n<|image_2|>\nWhat?"
    assert with_image_tags("<|image_1|> and what?", 1) == "<|image_1|> and what?"
    assert with_image_tags("What?", 0) == "What?"


@pytest.mark.parametrize(
    "text, n, message",
    [
        ("<|image_1|><|image_2|>", 1, "2 <|image_k|> tags but 1 image"),
        ("<|image_1|>", 2, "1 <|image_k|> tag but 2 images"),
        ("<|image_2|><|image_1|>", 2, "in that order"),
        ("<|image_1|><|image_1|>", 2, "in that order"),
        ("no tag", 1, "0 <|image_k|> tags"),
    ],
)
def test_tag_and_image_counts_must_agree(text, n, message):
    with pytest.raises(MinislmError, match=message.replace("|", r"\|")):
        check_image_tags(text, n)


def test_each_text_chunk_gets_its_own_bos(model):
    tok = model.tokenizer
    ids = tokenize_with_images(tok, "<|user|>\n<|image_1|>\nhi<|image_2|>", [3, 2]).tolist()
    first, second = tok.encode("<|user|>\n"), tok.encode("\nhi")
    assert ids == first + [-1] * 3 + second + [-2] * 2 + tok.encode("")
    assert ids.count(tok.bos_id) == 3  # three chunks, the last one empty


# ---------------------------------------------------------------- the cache


def test_chat_reuse_compares_images_not_only_ids(model):
    """Two different pictures of the same size have the same placeholder ids; the cache
    must not take one for the other."""
    a = model.image_prompt("Describe.", [LANDSCAPE], num_crops=1)
    flipped = Image.open(LANDSCAPE).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    b = model.image_prompt("Describe.", [flipped], num_crops=1)
    assert np.array_equal(a.ids, b.ids) and not np.array_equal(a.features, b.features)
    cache = model.new_cache(len(a.ids) + 8)
    model.forward(a.ids, cache, image_features=a.features)
    first_placeholder = int(np.flatnonzero(a.ids < 0)[0])
    assert cache.shared_prefix(a.ids, a.features) == len(a.ids)
    assert cache.shared_prefix(b.ids, b.features) == first_placeholder
    # reusing up to there and feeding the rest gives what a fresh forward gives
    cache.truncate(first_placeholder)
    rest = model.lm_head(model.forward(b.ids[first_placeholder:], cache, image_features=b.features))[-1]
    assert np.abs(rest - model.logits(b.ids, image_features=b.features)[-1]).max() <= 1e-4


# ---------------------------------------------------------------- CLI


def test_generate_with_an_image_equals_the_api(phi3_v_dir, model):
    result = minislm_cli("generate", "--model", phi3_v_dir, "--image", LANDSCAPE, "--num-crops", 4, "-n", 8, "What is shown?")
    assert result.returncode == 0, result.stderr
    assert "[image 1: 500x300 -> 672x672: 2x2 crops + global view -> 757 tokens]" in result.stderr
    prompt = model.image_prompt("What is shown?", [LANDSCAPE], num_crops=4)
    tokens = list(model.generate(prompt.ids, 8, image_features=prompt.features))
    assert result.stdout == model.tokenizer.decode(tokens) + "\n"


def test_default_num_crops_comes_from_preprocessor_config(phi3_v_dir):
    result = minislm_cli("generate", "--model", phi3_v_dir, "--image", LANDSCAPE, "-n", 1, "Hi")
    assert result.returncode == 0, result.stderr
    assert "2x2 crops" in result.stderr  # preprocessor_config.json: num_crops 4


def test_chat_with_an_image(phi3_v_dir):
    script = f"/image {LANDSCAPE}\nWhat is shown?\nAnd now?\n/image {PHI3_V_FIXTURE / 'missing.png'}\n/bye\n"
    result = minislm_cli("chat", "--model", phi3_v_dir, "--num-crops", 1, "-n", 4, stdin=script)
    assert result.returncode == 0, result.stderr
    assert "[image 1: 500x300 -> 336x336: 1x1 crops + global view -> 313 tokens" in result.stderr
    assert "missing.png: no such image file" in result.stderr  # the chat goes on
    stats = [line for line in result.stderr.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 2
    assert "reused from the cache" in stats[1]  # the second turn reuses the image's positions


def test_trace_with_an_image_shows_the_image_steps_and_where_its_tokens_sit(phi3_v_dir, model, tmp_path):
    result = minislm_cli("trace", "--model", phi3_v_dir, "--image", LANDSCAPE, "--num-crops", 1, "--layers", "0",
                         "What is shown?")
    assert result.returncode == 0, result.stderr
    prompt = model.image_prompt("What is shown?", [LANDSCAPE], num_crops=1, chat=False)
    first, last = np.flatnonzero(prompt.ids == -1)[[0, -1]]
    assert last - first + 1 == 313
    assert f"image 1: 500x300 -> 336x336: 1x1 crops + global view -> 313 tokens, positions {first}..{last} of {len(prompt.ids)}" \
        in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert rows["image_views"][2:6] == ["(2,", "3,", "336,", "336)"]  # the global view and one crop
    assert rows["image_patches"][2:5] == ["(2,", "576,", "1024)"]  # a 24 x 24 patch grid per view
    assert rows["image_tokens"][2] == "(313,"
    assert rows["embed"][2] == f"({len(prompt.ids)},"  # the decoder runs over text and image tokens
    # the image tokens' statistics are the API's own features
    assert float(rows["image_tokens"][-4]) == pytest.approx(float(prompt.features.mean()), abs=1e-4)
    assert_clean_error(minislm_cli("trace", "--model", FIXTURES / "gqa", "--image", LANDSCAPE, "x"), "--image", "phi3 model")
    assert_clean_error(minislm_cli("trace", "--model", phi3_v_dir, "--num-crops", 2, "x"), "--num-crops", "--image")
    assert_clean_error(minislm_cli("trace", "--model", phi3_v_dir, "--image", LANDSCAPE, "--no-bos", "x"), "--no-bos")
    out = tmp_path / "page.html"
    assert_clean_error(minislm_cli("explain", "--model", FIXTURES / "gqa", "--image", LANDSCAPE, "x", "--out", out),
                       "--image", "phi3 model")
    assert not out.exists()  # nothing written half-way


def test_bad_image_inputs_are_one_line_errors(phi3_v_dir, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(LANDSCAPE.read_bytes()[:900])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(bomb)  # 100M pixels, a few KB of PNG
    model = ["--model", phi3_v_dir]
    assert_clean_error(minislm_cli("generate", *model, "--image", text, "x"), "notes.png", "not an image")
    assert_clean_error(minislm_cli("generate", *model, "--image", truncated, "x"), "cut.png", "truncated")
    assert_clean_error(minislm_cli("generate", *model, "--image", bomb, "x"), "bomb.png", "decompression bomb")
    assert_clean_error(minislm_cli("generate", *model, "--image", LANDSCAPE, "<|image_1|><|image_2|>"), "2 <|image_k|> tags")
    assert_clean_error(minislm_cli("generate", *model, "--image", LANDSCAPE, "--image", LANDSCAPE, "<|image_1|> x"), "1 <|image_k|> tag")
    assert_clean_error(minislm_cli("generate", *model, "--num-crops", 0, "--image", LANDSCAPE, "x"), "--num-crops")
    assert_clean_error(minislm_cli("generate", *model, "--num-crops", 17, "--image", LANDSCAPE, "x"), "--num-crops")
    assert_clean_error(minislm_cli("generate", "--model", FIXTURES / "gqa", "--image", LANDSCAPE, "x"), "--image", "phi3 model")
