"""The explorer page (`minislm explain`): its data, and the page itself in a real browser.

The browser test loads the written file in headless Chromium (through chromedriver)
and reads the DOM after the page's script ran: the attention map drawn for the
chosen layer and head must be the one the recorder computed (its diagonal, its
darkest cell in the last row, a grey masked cell), and choosing another layer in the
menu must redraw it with that layer's numbers. Without Chromium the test skips, saying
why; CI installs it and sets MINISLM_REQUIRE_BROWSER=1, which turns the skip into a
failure.
"""

import base64
import json
import re

import numpy as np
import pytest

import minislm
from browser import Browser, find_programs
from conftest import FIXTURES
from minislm.cli import main
from minislm.load import BUNDLED_MODEL
from minislm.watch.attention import attention_maps
from minislm.watch.explain import FIXED_POINT, MAX_ATTENTION_BYTES, page_data
from minislm.watch.inputs import MAX_PICTURE_TOKENS
from optional import BROWSER_VARIABLE, skip_or_fail

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"
# The page stores probabilities as 16-bit fixed point: half a step of rounding.
ATOL_FIXED_POINT = 0.5 / FIXED_POINT + 1e-7


@pytest.fixture(scope="module")
def shipped():
    return minislm.load(BUNDLED_MODEL)


def page_json(html: str) -> dict:
    text = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return json.loads(text)


def decode(b64: str, T: int) -> np.ndarray:
    """The page's encoding, read back: uint16 lower triangle -> (T, T), 0 above the diagonal."""
    values = np.frombuffer(base64.b64decode(b64), dtype="<u2") / FIXED_POINT
    out = np.zeros((T, T))
    out[np.tril_indices(T)] = values
    return out


@pytest.fixture(scope="module")
def page(shipped, tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "explain.html"
    assert main(["explain", PROMPT, "--out", str(path)]) == 0
    return path


def test_page_is_self_contained_and_embeds_what_the_model_computed(page, shipped):
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=|https?:|@import|fetch\(|XMLHttpRequest", html)  # nothing from outside
    data = page_json(html)
    ids = np.array(shipped.tokenizer.encode(PROMPT))
    T = len(ids)
    assert [t["id"] for t in data["tokens"]] == ids.tolist()
    probs = attention_maps(shipped, ids, layer=4)
    for head in range(shipped.config.num_attention_heads):
        assert np.abs(decode(data["attention"]["maps"][4][head], T) - probs[head]).max() <= ATOL_FIXED_POINT
    logits = shipped.logits(ids)
    assert data["next"][-1][0]["id"] == int(logits[-1].argmax())
    assert data["lens"]["top_pieces"][-1] == [shipped.tokenizer.token_piece(i) for i in logits.argmax(-1)]
    assert data["routing"] is None
    steps = [(s["name"], s["layer"]) for s in data["steps"]]
    assert steps[0] == ("embed", None) and steps[-1] == ("logits", None) and ("attn_probs", 5) in steps


def test_phimoe_page_embeds_the_routing(tmp_path):
    path = tmp_path / "moe.html"
    assert main(["explain", "--model", str(FIXTURES / "moe"), "hello", "--out", str(path), "--quant", "int4"]) == 0
    routing = page_json(path.read_text(encoding="utf-8"))["routing"]
    assert np.array(routing["experts"]).shape == (2, 7, 2)
    assert routing["num_experts"] == 4


def test_page_caps_the_prompt_and_the_attention_it_embeds(shipped, capsys, tmp_path):
    long_prompt = "But soft, what light through yonder window breaks? " * 30
    path = tmp_path / "long.html"
    assert main(["explain", long_prompt, "--out", str(path)]) == 0
    assert "shows the first 128" in capsys.readouterr().err
    data = page_json(path.read_text(encoding="utf-8"))
    assert len(data["tokens"]) == MAX_PICTURE_TOKENS and data["truncated_from"] > MAX_PICTURE_TOKENS
    ids = np.arange(MAX_PICTURE_TOKENS) % 4000 + 5
    too_many = MAX_ATTENTION_BYTES // (8 * 128 * 129) + 1  # layers that would pass the cap on 8 heads
    with pytest.raises(minislm.MinislmError, match="choose at most"):
        page_data(shipped, ids, list(range(6)) * too_many, 5, None)


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = find_programs()
    if chromium is None or chromedriver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if p is None)
        skip_or_fail(f"{missing} not found (apt-get install chromium chromium-driver)", BROWSER_VARIABLE)
    with Browser(chromium, chromedriver) as b:
        yield b


def drawn(browser) -> dict:
    return browser.run(
        "const c = document.getElementById('attention'); return Object.assign({}, c.dataset);"
    )


def test_page_draws_the_chosen_head_and_redraws_when_the_layer_changes(browser, page, shipped):
    ids = np.array(shipped.tokenizer.encode(PROMPT))
    T = len(ids)
    browser.open(page.as_uri() + "?layer=1&head=2")
    browser.wait_for("return document.body.dataset.ready === '1'")  # set after the script's last line

    first = drawn(browser)
    assert (first["layer"], first["head"], first["drawn"]) == ("1", "2", "1")
    expected = attention_maps(shipped, ids, layer=1, heads=[2])[0]
    assert np.allclose(json.loads(first["diagonal"]), np.diag(expected), atol=1e-4)
    assert int(first["bestKeyOfLastQuery"]) == int(expected[-1].argmax())
    best_rgb, masked_rgb = json.loads(first["bestCellRgb"]), json.loads(first["maskedCellRgb"])
    assert masked_rgb == [230, 230, 230]  # above the diagonal: the mask's grey
    assert sum(best_rgb) < sum(masked_rgb) - 100  # the most attended key is drawn dark

    browser.click("#layer option[value='4']")
    second = drawn(browser)
    assert (second["layer"], second["head"]) == ("4", "2")
    expected = attention_maps(shipped, ids, layer=4, heads=[2])[0]
    assert np.allclose(json.loads(second["diagonal"]), np.diag(expected), atol=1e-4)
    assert second["diagonal"] != first["diagonal"]

    browser.click("#head option[value='5']")
    assert drawn(browser)["head"] == "5"
    rows = browser.run("return document.querySelectorAll('#lens tr').length")
    assert rows == 3 + shipped.config.num_hidden_layers + 1  # position/input/next + embed + layers
    first_candidate = browser.run("return document.querySelector('#next .bar .label').textContent")
    top = int(shipped.logits(ids)[-1].argmax())
    assert first_candidate == f"{shipped.tokenizer.token_piece(top)} ({top})"


# ---------------------------------------------------------------- an image prompt (Phi-3-vision)


@pytest.fixture(scope="module")
def image_page(phi3_v_dir, tmp_path_factory):
    from conftest import PHI3_V_FIXTURE

    path = tmp_path_factory.mktemp("explain_image") / "image.html"
    argv = ["explain", "--model", str(phi3_v_dir), "--image", str(PHI3_V_FIXTURE / "landscape.png"), "--num-crops", "1",
            "What is shown?", "--out", str(path)]
    assert main(argv) == 0
    return path


def test_image_page_embeds_the_views_and_the_forward_over_image_tokens(image_page, phi3_v_dir):
    from conftest import PHI3_V_FIXTURE

    model = minislm.load(phi3_v_dir)
    prompt = model.image_prompt("What is shown?", [PHI3_V_FIXTURE / "landscape.png"], num_crops=1, chat=False)
    data = page_json(image_page.read_text(encoding="utf-8"))
    assert [t["id"] for t in data["tokens"]] == prompt.ids.tolist()  # 313 image positions hold -1
    (image,) = data["images"]
    positions = np.flatnonzero(prompt.ids == -1)
    assert (image["first"], image["last"], image["tokens"]) == (positions[0], positions[-1], 313)
    assert len(image["views"]) == 2 and image["grid"] == [1, 1]  # the global view and one crop
    assert len(base64.b64decode(image["views"][0])) == 56 * 56 * 3
    logits = model.logits(prompt.ids, image_features=prompt.features)  # the image tokens went in
    assert data["next"][-1][0]["id"] == int(logits[-1].argmax())
    assert data["lens"]["next_ranks"][0][positions[0] - 1] == 0  # no id to rank before an image token
    steps = [s["name"] for s in data["steps"]]
    assert steps[:3] == ["image_views", "image_patches", "image_tokens"] and steps[-1] == "logits"


def test_image_page_shows_the_views_and_one_box_for_the_image_tokens(browser, image_page):
    browser.open(image_page.as_uri())
    browser.wait_for("return document.body.dataset.ready === '1'")
    assert browser.run("return document.getElementById('images-section').hidden") is False
    assert browser.run("return document.querySelectorAll('#images canvas').length") == 2
    box = browser.run("const s = document.querySelector('#tokens .tok.img'); "
                      "return [s.dataset.first, s.dataset.last, s.textContent];")
    assert box[0] == "1" and box[1] == "313" and "\u00d7313" in box[2]
    # the view is drawn: its canvas holds the picture's pixels, not a blank
    blank = browser.run("const c = document.querySelector('#images canvas'); "
                        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
                        "let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i+1] + d[i+2]; return s;")
    assert blank > 0
    assert drawn(browser)["drawn"] == "1"
