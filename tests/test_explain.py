"""The explorer page (`minislm explain`): its data, and the page itself in a real browser.

The browser tests load the written file in headless Chromium (through chromedriver)
and read the DOM after the page's script ran: the attention map drawn for the
chosen layer and head must be the one the recorder computed (its diagonal, its
darkest cell in the last row, a grey masked cell), and choosing another layer in the
menu must redraw it with that layer's numbers. Every legend and caption is checked
against numbers counted here from the recorder's arrays, including on a model whose
causal mask was removed (exercise 2), where the page must draw and say so. Without
Chromium the tests skip, saying why; CI installs it and sets MINISLM_REQUIRE_BROWSER=1,
which turns the skip into a failure.
"""

import base64
import json
import re

import numpy as np
import pytest

import minislm
import minislm.model
from browser import browser  # noqa: F401  (the fixture)
from conftest import FIXTURES
from minislm.cli import main
from minislm.load import BUNDLED_MODEL
from minislm.watch.attention import attention_maps
from minislm.watch.explain import FIXED_POINT, MAX_ATTENTION_BYTES, TEMPLATE, page_data, render
from minislm.watch.inputs import MAX_PICTURE_TOKENS

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"
# The page stores probabilities as 16-bit fixed point, steps of 1 / (FIXED_POINT - 1):
# half a step of rounding.
ATOL_FIXED_POINT = 0.5 / (FIXED_POINT - 1) + 1e-7


@pytest.fixture(scope="module")
def shipped():
    return minislm.load(BUNDLED_MODEL)


def page_json(html: str) -> dict:
    text = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return json.loads(text)


def decode(b64: str, T: int, layout: str = "lower") -> np.ndarray:
    """The page's encoding, read back: uint16, 0 = exactly 0, else 1 + p * (FIXED_POINT - 1);
    the lower triangle (0 above the diagonal) or the whole square."""
    codes = np.frombuffer(base64.b64decode(b64), dtype="<u2").astype(np.float64)
    values = np.where(codes == 0, 0.0, (codes - 1) / (FIXED_POINT - 1))
    out = np.zeros((T, T))
    if layout == "full":
        return values.reshape(T, T)
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


@pytest.fixture(scope="module")
def moe_page(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain_moe") / "moe.html"
    assert main(["explain", "--model", str(FIXTURES / "moe"), "hello", "--out", str(path), "--quant", "int4"]) == 0
    return path


def test_phimoe_page_embeds_the_routing(moe_page):
    routing = page_json(moe_page.read_text(encoding="utf-8"))["routing"]
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


def without_causality(q_positions, n_keys, sliding_window):
    """Exercise 2's edit of model.attention_mask: every query may read every key."""
    return np.ones((len(q_positions), n_keys), dtype=bool)


@pytest.fixture
def unmasked(monkeypatch):
    monkeypatch.setattr(minislm.model, "attention_mask", without_causality)


def test_without_the_causal_mask_the_page_stores_the_keys_after_each_query(shipped, unmasked):
    ids = np.array(shipped.tokenizer.encode(PROMPT))
    T = len(ids)
    attention = page_data(shipped, ids, [0, 3], 5, None)["attention"]
    assert attention["layouts"] == ["full", "full"]  # not the lower triangle: the future was read
    probs = attention_maps(shipped, ids, layer=3)  # under the same edit
    assert probs[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].min() > 0  # every later key got some
    for head in range(shipped.config.num_attention_heads):
        assert np.abs(decode(attention["maps"][1][head], T, "full") - probs[head]).max() <= ATOL_FIXED_POINT
    assert np.allclose(np.array(attention["row_sums"]), 1.0, atol=1e-6)


def test_exact_zeros_are_stored_as_zeros_and_nothing_else_is():
    from minislm.watch.explain import encode_probabilities

    p = np.array([[1.0, 0.0], [1e-12, 1.0 - 1e-12]], dtype=np.float64)
    codes = np.frombuffer(base64.b64decode(encode_probabilities(p, "full")), dtype="<u2")
    assert codes.tolist() == [FIXED_POINT, 0, 1, FIXED_POINT]  # 1e-12 is tiny, not zero: code 1
    lower = np.frombuffer(base64.b64decode(encode_probabilities(p, "lower")), dtype="<u2")
    assert lower.tolist() == [FIXED_POINT, 1, FIXED_POINT]


def test_integer_steps_have_no_mean_or_std_on_the_page_or_in_the_table(capsys):
    moe = minislm.load(FIXTURES / "moe")
    ids = np.array(moe.tokenizer.encode("hello"))
    steps = {(s["name"], s["layer"]): s for s in page_data(moe, ids, [0], 3, None)["steps"]}
    experts = steps[("experts", 0)]
    assert experts["mean"] is None and experts["std"] is None and (experts["min"], experts["max"]) != (None, None)
    assert steps[("expert_weights", 0)]["mean"] is not None  # weights are quantities
    assert main(["trace", "--model", str(FIXTURES / "moe"), "hello", "--layers", "0"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("experts"))
    assert row.split()[5:7] == ["-", "-"]  # experts, 0, "(7,", "2)", int64, then mean and std


def test_pictures_keep_whole_token_labels_and_number_long_axes(shipped):
    pytest.importorskip("matplotlib")
    from minislm.watch.lens import logit_lens
    from minislm.watch.plots import MAX_LABELLED_TOKENS, attention_figure, lens_figure

    ids = np.array(shipped.tokenizer.encode("ROMEO: what") + [4109])  # an id the tokenizer has no piece for
    labels = [shipped.tokenizer.token_piece(i) for i in ids]
    assert labels[-1] == "<id 4109>"
    lens = logit_lens(shipped, ids)
    fig = lens_figure(lens, labels)
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert cells == [piece for row in lens.top_pieces for piece in row]  # whole pieces, none cut short
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[-1] == f"{len(ids) - 1} <id 4109>"
    T = MAX_LABELLED_TOKENS + 36  # 100 positions: numbered every 5th
    fig = attention_figure(np.full((1, T, T), 1 / T), [0], [f"t{i}" for i in range(T)], 0)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(t) for t in range(0, T, 5)]


# ---------------------------------------------------------------- in a real browser


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


def open_page(browser, path, query=""):
    browser.open(path.as_uri() + query)
    browser.wait_for("return document.body.dataset.ready === '1'")  # set after the script's last line


def legend(browser, which: str) -> dict:
    return browser.run(f"return Object.assign({{}}, document.getElementById('{which}').dataset, "
                       f"{{text: document.getElementById('{which}').textContent}});")


def test_every_legend_is_counted_from_the_numbers_it_describes(browser, page, shipped):
    from minislm.watch.lens import logit_lens

    ids = np.array(shipped.tokenizer.encode(PROMPT))
    T = len(ids)
    open_page(browser, page, "?layer=2&head=6")
    probs = attention_maps(shipped, ids, layer=2, heads=[6])[0]
    shown = legend(browser, "attention-legend")
    assert int(shown["zeroAfter"]) == int((np.triu(np.ones((T, T)), 1).astype(bool) & (probs == 0)).sum()) == T * (T - 1) // 2
    assert int(shown["readAfter"]) == 0 and int(shown["zeroBefore"]) == int((probs[np.tril_indices(T)] == 0).sum())
    assert float(shown["scale"]) == pytest.approx(probs.max(), abs=2 * ATOL_FIXED_POINT)  # darkest = the largest
    assert f"{T * (T - 1) // 2} right of the diagonal" in shown["text"]
    assert "add up to 1.0000" in shown["text"]
    lens = logit_lens(shipped, ids)
    assert float(legend(browser, "lens-legend")["scale"]) == 1  # probabilities: 0 to 1
    browser.click("#measure option[value='entropy']")
    assert float(legend(browser, "lens-legend")["scale"]) == pytest.approx(lens.entropy.max(), abs=1e-4)
    cell = browser.run("return document.querySelector('#lens tr[data-row=\"layer 0\"] td').textContent")
    assert float(cell) == pytest.approx(lens.entropy[1, 0], abs=0.006)  # row 1 is layer 0 (row 0: embed)


def test_without_the_causal_mask_the_page_draws_the_future_and_says_so(browser, shipped, unmasked, tmp_path):
    ids = np.array(shipped.tokenizer.encode(PROMPT))
    T = len(ids)
    path = tmp_path / "unmasked.html"
    path.write_text(render(TEMPLATE, page_data(shipped, ids, [0], 5, None)), encoding="utf-8")
    open_page(browser, path, "?layer=0&head=1")
    probs = attention_maps(shipped, ids, layer=0, heads=[1])[0]
    shown = legend(browser, "attention-legend")
    after = int((np.triu(probs, 1) > 0).sum())
    assert after == T * (T - 1) // 2
    assert int(shown["readAfter"]) == after and int(shown["zeroAfter"]) == 0
    assert "right of the diagonal (keys after their query)" not in shown["text"]
    assert f"{after} cells right of the diagonal are not 0" in shown["text"]
    assert json.loads(drawn(browser)["maskedCellRgb"]) != [230, 230, 230]  # key 1 of query 0: drawn, not grey


def test_a_long_prompts_map_numbers_its_positions(browser, shipped, tmp_path):
    ids = np.array(shipped.tokenizer.encode("But soft, what light through yonder window breaks? " * 9))[:100]
    path = tmp_path / "long.html"
    path.write_text(render(TEMPLATE, page_data(shipped, ids, [0], 3, None)), encoding="utf-8")
    open_page(browser, path)
    shown = drawn(browser)
    labelled = json.loads(shown["labelled"])
    assert shown["labels"] == "positions" and labelled == list(range(0, 100, 5))  # 6-px cells: every 5th


def test_choosing_a_position_or_a_layer_lights_up_the_other_views(browser, page, shipped):
    open_page(browser, page, "?layer=1&head=0")
    browser.click("#tokens .tok[data-pos='3']")
    assert drawn(browser)["highlightRow"] == "3"
    columns = browser.run("return Array.from(document.querySelectorAll('#lens td.sel'), td => td.cellIndex)")
    assert columns == [4] * (shipped.config.num_hidden_layers + 1)  # the row's label cell is column 0
    assert browser.run("return document.querySelector('#lens tr.sel').dataset.row") == "layer 1"
    browser.click("#layer option[value='4']")
    assert browser.run("return document.querySelector('#lens tr.sel').dataset.row") == "layer 4"
    assert drawn(browser)["highlightRow"] == "3"  # the position stays chosen


def test_the_routing_legend_names_the_experts_the_map_shows(browser, moe_page):
    experts = np.array(page_json(moe_page.read_text(encoding="utf-8"))["routing"]["experts"])  # (L, T, 2)
    open_page(browser, moe_page)
    shown = legend(browser, "routing-legend")
    assert json.loads(shown["experts"]) == sorted(set(experts[:, :, 0].ravel().tolist()))
    for e in set(experts[:, :, 0].ravel().tolist()):
        assert f"expert {e} ({int((experts[:, :, 0] == e).sum())})" in shown["text"]


def test_ids_without_a_piece_are_explained(browser, shipped, tmp_path):
    ids = np.array(shipped.tokenizer.encode("ROMEO: what") + [4109])
    path = tmp_path / "ids.html"
    path.write_text(render(TEMPLATE, page_data(shipped, ids, [0], 3, None)), encoding="utf-8")
    open_page(browser, path)
    note = browser.run("const n = document.getElementById('id-note'); return [n.hidden, n.textContent];")
    assert note[0] is False
    assert "<id 4109>" in note[1] and f"{shipped.config.vocab_size} rows" in note[1]
    assert f"0..{shipped.tokenizer.vocab_size - 1}" in note[1]
    plain = tmp_path / "plain.html"
    plain.write_text(render(TEMPLATE, page_data(shipped, ids[:-1], [0], 1, None)), encoding="utf-8")
    open_page(browser, plain)
    shown = browser.run("const n = document.getElementById('id-note'); return [n.hidden, n.dataset.ids];")
    ids_on_page = json.loads(shown[1])
    assert shown[0] is (len(ids_on_page) == 0)  # shown exactly when some <id N> is on the page


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
