"""The live explorer (`minislm explore`): its server, its numbers, and the page in a browser.

Every number the page receives is checked against the library computing the same thing
on its own: `Model.generate` for the tokens the steps choose, `Sampler.stages` for the
sampling panel, a full forward's recorder (`attention_maps`, `logit_lens`) for the maps
and the lens, `KVCache` for the cache's sizes, and q . k / sqrt(hd) and a softmax
written here for the arithmetic view. The server runs in a thread of the test process
and is driven through real sockets; the browser test types into the page in headless
Chromium as a user would and reads back what it shows.
"""

import http.client

import numpy as np
import pytest

import minislm
from browser import browser  # noqa: F401  (the fixture)
from conftest import FIXTURES
from minislm.cli import build_parser, main
from minislm.load import BUNDLED_MODEL
from minislm.runtime import make_sampler, sampling_settings
from minislm.sampling import probabilities
from minislm.trace import Recorder
from minislm.watch import session
from minislm.watch.attention import attention_maps
from minislm.watch.explore import MAX_BODY_BYTES, MAX_TEXT_CHARS, ExploreServer
from minislm.watch.lens import logit_lens
from served import raw, threaded
from test_explain import decode

PROMPT = "ROMEO: But soft, what light"
# The explorer's steps run through the cache (one token a forward) and the references run
# one full forward: the same float32 sums in another order and blocking, so probabilities
# agree to a few float32 ulps, and the page prints 4 decimals.
ATOL_CACHED_VS_FULL = 2e-5


@pytest.fixture(scope="module")
def shipped():
    return minislm.load(BUNDLED_MODEL)


def serving(model):
    """An explorer in a thread of this process (port 0: a free one); its log lines collect in `server.lines`."""
    lines = []
    server = ExploreServer(model, log=lines.append)
    server.lines = lines
    return threaded(server)


@pytest.fixture(scope="module")
def explorer(shipped):
    with serving(shipped) as server:
        yield server


def post(server, path, body):
    status, _, payload = raw(server, "POST", path, body)
    assert status == 200, payload
    return payload


# ---------------------------------------------------------------- the command and its safety


def test_explore_listens_on_this_machine_only_by_default(explorer):
    args = build_parser().parse_args(["explore"])
    assert (args.host, args.port) == ("127.0.0.1", 0)
    assert explorer.url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize("method, path, body, headers, status", [
    ("POST", "/api/prompt", b"{not json", {}, 400),
    ("POST", "/api/prompt", b"[1, 2]", {}, 400),  # not an object
    ("POST", "/api/prompt", {"text": ""}, {}, 400),
    ("POST", "/api/prompt", {"text": "x" * (MAX_TEXT_CHARS + 1)}, {}, 400),
    ("POST", "/api/prompt", {"text": 42}, {}, 400),
    ("POST", "/api/prompt", {"text": "hi", "settings": {"temperature": -1}}, {}, 400),
    ("POST", "/api/prompt", {"text": "hi", "settings": {"temperature": True}}, {}, 400),
    ("POST", "/api/prompt", {"text": "hi", "settings": {"path": "/etc/passwd"}}, {}, 400),
    ("POST", "/api/prompt", {"text": "hi", "settings": {"seed": -7}}, {}, 400),
    ("POST", "/api/prompt", {"text": "hi", "layer": 99}, {}, 400),
    ("POST", "/api/prompt", {"text": "hi " * 200}, {}, 400),  # more tokens than the page follows
    ("POST", "/api/step", {"n": 0}, {}, 400),
    ("POST", "/api/step", {"n": session.MAX_STEPS + 1}, {}, 400),
    ("POST", "/api/step", {"n": True}, {}, 400),
    ("POST", "/api/speculate", {"num_draft": 0}, {}, 400),
    ("POST", "/api/speculate", {"num_draft": session.MAX_DRAFT + 1}, {}, 400),
    ("POST", "/api/speculate", {"num_draft": "4"}, {}, 400),
    ("POST", "/api/speculate", {"num_draft": 2.5}, {}, 400),
    ("POST", "/api/speculate", {"settings": {"top_p": 2}}, {}, 400),
    ("POST", "/api/speculate", {"layer": -1}, {}, 400),
    ("GET", "/api/speculate", None, {}, 405),
    ("POST", "/api/arithmetic", {"head": -1}, {}, 400),
    ("POST", "/api/arithmetic", {"query": 10 ** 30}, {}, 400),
    ("POST", "/api/prompt", b"x" * (MAX_BODY_BYTES + 1), {}, 413),
    ("GET", "/api/nothing", None, {}, 404),
    ("GET", "/api/step", None, {}, 405),
    ("GET", "/source/../../../etc/passwd", None, {}, 404),
    ("GET", "/source/serve.py", None, {}, 404),  # only the files the page links into
    ("GET", "/api/model", None, {"Host": "attacker.example:80"}, 421),  # DNS rebinding
])
def test_bad_requests_get_a_4xx_with_a_json_error(explorer, method, path, body, headers, status):
    post(explorer, "/api/prompt", {"text": PROMPT})  # a prompt exists, so only the request is wrong
    got, response_headers, payload = raw(explorer, method, path, body, headers)
    assert got == status and response_headers["Content-Type"] == "application/json"
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]


def test_explore_refuses_an_image_for_a_model_that_cannot_read_one(capsys):
    from conftest import PHI3_V_FIXTURE

    assert main(["explore", "--image", str(PHI3_V_FIXTURE / "landscape.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot read images" in err and err.count("\n") == 1


def test_explore_sends_phi4_multimodal_pictures_to_explain(capsys, phi4mm_dir):
    """The explorer's prompts run Phi-3-vision's image path only: a Phi-4-multimodal
    picture is refused at start, in one line naming the commands that take it."""
    assert main(["explore", "-m", str(phi4mm_dir), "--image", str(phi4mm_dir / "landscape.png")]) == 2
    err = capsys.readouterr().err
    assert "minislm explain --image/--audio" in err and err.count("\n") == 1


def test_a_step_before_any_prompt_is_a_conflict(shipped):
    with serving(shipped) as server:
        for path in ("/api/step", "/api/speculate"):
            status, _, payload = raw(server, "POST", path, {})
            assert status == 409 and "prompt" in payload["error"]["message"]


def test_the_page_and_the_source_it_links_are_served(explorer):
    host, port = explorer.server_address[:2]
    for path, text in (("/", "Generation, step by step"), ("/source/model.py", "def attention_mask")):
        connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200 and text in response.read().decode()
        connection.close()


# ---------------------------------------------------------------- generation, as generate does it


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.9, "top_p": 0.8, "top_k": 40, "seed": 3}])
def test_next_token_chooses_what_generate_chooses(explorer, shipped, settings):
    state = post(explorer, "/api/prompt", {"text": PROMPT, "settings": settings})
    ids = [t["id"] for t in state["tokens"]]
    for _ in range(5):
        state = post(explorer, "/api/step", {"n": 1, "settings": settings})
    chosen = [t["id"] for t in state["tokens"][len(ids):]]
    generate_settings = {k: v for k, v in settings.items() if k != "seed"}
    assert chosen == list(shipped.generate(ids, 5, seed=settings.get("seed"), **generate_settings))
    assert [t["generated"] for t in state["tokens"]] == [False] * len(ids) + [True] * 5
    assert [h["token"] for h in state["history"]] == chosen


def test_the_sampling_panel_is_the_samplers_stages(explorer, shipped):
    settings = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3, "seed": 1}
    state = post(explorer, "/api/prompt", {"text": PROMPT, "settings": settings})
    ids = [t["id"] for t in state["tokens"]]
    panel = state["sampling"]
    sampler = make_sampler(shipped, sampling_settings(shipped, **{k: v for k, v in settings.items() if k != "seed"}), 1)
    stages = sampler.stages(shipped.logits(ids)[-1], ids)
    assert [s["name"] for s in panel["stages"]] == [s.name for s in stages] == [
        "logits", "repetition_penalty", "temperature", "top_k", "top_p", "min_p"]
    candidates = [c["id"] for c in panel["candidates"]]
    for shown, stage in zip(panel["stages"], stages):
        p = probabilities(stage.logits)
        assert shown["survivors"] == int(np.count_nonzero(stage.logits > -np.inf))
        assert np.allclose(shown["p"], p[candidates], atol=ATOL_CACHED_VS_FULL)
        assert shown["kept"] == [bool(stage.logits[i] > -np.inf) for i in candidates]
    assert panel["stages"][-1]["survivors"] < panel["stages"][3]["survivors"] <= 20  # top-p and min-p cut further
    # a slider moved: the stages again, with no forward and no draw
    moved = post(explorer, "/api/sampling", {"settings": settings | {"temperature": 1.5}})["sampling"]
    assert moved["stages"][2]["p"] != panel["stages"][2]["p"]
    state = post(explorer, "/api/step", {"n": 1, "settings": settings | {"temperature": 1.5}})
    pick = state["last_pick"]  # the draw came from the moved stages, and its id survived all of them
    assert pick["chosen"] == state["tokens"][-1]["id"] and pick["stages"][2]["p"][:3] == moved["stages"][2]["p"][:3]
    assert all(stage["kept"][[c["id"] for c in pick["candidates"]].index(pick["chosen"])] for stage in pick["stages"])


def test_generation_ends_at_a_stop_id_or_at_the_pages_capacity(shipped):
    ids = (shipped.tokenizer.encode(PROMPT) * 20)[: session.MAX_EXPLORE_TOKENS - 2]
    run = session.start(shipped, ids, *session.settings_from(shipped, {}))
    assert session.step(run).forward_ms > 0 and run.ended is None  # 127 tokens: one more fits
    session.step(run)
    assert run.ended == f"the explorer follows {session.MAX_EXPLORE_TOKENS} tokens"
    with serving(shipped) as server:
        server.run = run
        status, _, payload = raw(server, "POST", "/api/step", {"n": 1})
        assert status == 400 and "ended" in payload["error"]["message"]
    run = session.start(shipped, ids[:10], *session.settings_from(shipped, {}))
    run.logits = np.full_like(run.logits, -10.0)
    run.logits[4096] = 10.0  # <|endoftext|>, one of generation_config.json's stop ids
    session.step(run)
    assert "is a stop id" in run.ended and run.ids[-1] == 4096
    # a speculative step ends the same two ways, its guesses cut to fit the page
    run = session.start(shipped, ids, *session.settings_from(shipped, {}))
    while not run.ended:
        session.speculative_step(run)
    assert run.ended == f"the explorer follows {session.MAX_EXPLORE_TOKENS} tokens"
    assert len(run.ids) == session.MAX_EXPLORE_TOKENS and run.cache.length == len(run.ids) - 1
    run = session.start(shipped, ids[:10], *session.settings_from(shipped, {}))
    run.logits = np.full_like(run.logits, -10.0)
    run.logits[4096] = 10.0
    session.speculative_step(run)
    assert "is a stop id" in run.ended and run.ids[-1] == 4096 and run.cache.length == 10


# ---------------------------------------------------------------- speculative decoding, one round a step

# A prompt that repeats itself, so prompt lookup has something to guess from; with no
# repetition penalty the guesses are not pushed down for being repeats (docs/decoding.md).
COPYING = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
           "ROMEO:\nBut soft, what light")


@pytest.fixture(scope="module")
def packed():
    """The shipped model with int4 weights: its kernels give the same bits for one row
    and for many, so a verify forward's logits are those of one-token steps (the
    float32 path rounds differently; docs/decoding.md)."""
    return minislm.load(BUNDLED_MODEL, quant="int4")


def test_speculative_steps_keep_greedys_tokens_and_roll_the_cache_back(packed):
    ids = packed.tokenizer.encode(COPYING)
    run = session.start(packed, ids, *session.settings_from(packed, {"repetition_penalty": 1}))
    rolled = []
    for _ in range(10):
        session.speculative_step(run, 4)
        rolled.append(session.kv_view(run)["rolled_back"])
    view = session.speculative_view(run)
    verdicts = [g["verdict"] for r in view["rounds"] for g in r["guesses"]]
    assert view["drafted"] == len(verdicts) > 0
    assert view["accepted"] == verdicts.count("accepted") > 0 and verdicts.count("rejected") > 0
    assert all(r["token"]["kind"] == ("bonus" if all(g["verdict"] == "accepted" for g in r["guesses"]) else "corrected")
               for r in view["rounds"])
    new = run.ids[len(ids):].tolist()
    assert [t for r in run.rounds for t in r.tokens] == new
    assert new == list(packed.generate(ids, len(new), repetition_penalty=1))  # plain greedy, token for token
    assert any(r is not None and r[1] > r[0] for r in rolled)  # some step wrote guesses the cache forgot

    # the same text by plain steps: the cache and every view of it match, nothing of the
    # forgotten guesses shows
    plain = session.start(packed, ids, *session.settings_from(packed, {"repetition_penalty": 1}))
    while len(plain.ids) < len(run.ids):
        session.step(plain)
    assert plain.ids.tolist() == run.ids.tolist() and plain.cache.length == run.cache.length == len(run.ids)
    S = run.cache.length
    for layer in range(packed.config.num_hidden_layers):
        for ours, theirs in zip(run.cache.read(layer, S), plain.cache.read(layer, S)):
            assert np.allclose(ours, theirs, atol=1e-5)
    kv, plain_kv = session.kv_view(run), session.kv_view(plain)
    assert {k: v for k, v in kv.items() if k != "rolled_back"} == {k: v for k, v in plain_kv.items() if k != "rolled_back"}
    lens, plain_lens = session.lens_view(run), session.lens_view(plain)
    assert lens["top_ids"] == plain_lens["top_ids"] and lens["next_ranks"] == plain_lens["next_ranks"]
    assert np.allclose(lens["entropy"], plain_lens["entropy"], atol=1e-3)
    assert [row[0][0] for row in run.next[:S]] == [row[0][0] for row in plain.next[:S]]
    assert np.allclose(session.attention_rows(run, 2, np.arange(S)), session.attention_rows(plain, 2, np.arange(S)),
                       atol=1e-5)
    assert np.allclose(run.logits, plain.logits, atol=1e-5)
    session.step(run)
    assert session.kv_view(run)["rolled_back"] is None  # a plain step after it forgets nothing


def test_a_sampled_speculative_step_draws_as_generate_speculating_draws(packed):
    """The same seed, the same rounds (one plain token from the prompt, then guesses
    after each newest token, as speculative_tokens runs them): the same tokens."""
    values = {"temperature": 0.5, "top_p": 0.95, "repetition_penalty": 1, "seed": 0}
    ids = packed.tokenizer.encode(COPYING)
    run = session.start(packed, ids, *session.settings_from(packed, values))
    session.step(run)
    for _ in range(6):
        session.speculative_step(run, 3)
    new = run.ids[len(ids):].tolist()
    settings = {k: v for k, v in values.items() if k != "seed"}
    expected = list(packed.generate(ids, len(new) + 8, seed=0, speculate="lookup", num_draft=3, **settings))
    assert new == expected[: len(new)]
    assert session.speculative_view(run)["drafted"] > 0


def test_the_speculative_endpoint_answers_with_the_rounds(explorer):
    state = post(explorer, "/api/prompt", {"text": COPYING, "settings": {"repetition_penalty": 1}})
    assert state["speculative"] is None
    n = len(state["tokens"])
    state = post(explorer, "/api/speculate", {"num_draft": 3, "settings": {"repetition_penalty": 1}})
    (r,) = state["speculative"]["rounds"]
    assert r["position"] == n and 0 < len(r["guesses"]) <= 3
    kept = [g["id"] for g in r["guesses"] if g["verdict"] == "accepted"] + [r["token"]["id"]]
    assert [t["id"] for t in state["tokens"][n:]] == kept and state["positions"] == n + len(kept)
    assert [h["token"] for h in state["history"]] == kept
    assert state["speculative"]["last"] and state["kv"]["length"] == n + len(kept)


# ---------------------------------------------------------------- the views, against a full forward


def test_the_views_are_what_a_full_forward_computes(explorer, shipped):
    post(explorer, "/api/prompt", {"text": PROMPT})
    state = post(explorer, "/api/step", {"n": 4, "layer": 3})
    ids = np.array([t["id"] for t in state["tokens"]])
    S = state["positions"]
    assert S == len(ids)
    maps = attention_maps(shipped, ids, layer=3)
    for head, b64 in enumerate(state["attention"]["maps"][0]):
        assert np.abs(decode(b64, S, state["attention"]["layouts"][0]) - maps[head]).max() < 1e-4
    lens = logit_lens(shipped, ids)
    assert state["lens"]["top_ids"] == lens.top_ids.tolist()
    assert state["lens"]["next_ranks"] == lens.next_ranks.tolist()  # the generated tokens ranked as they came
    assert np.allclose(state["lens"]["kl_to_final"], lens.kl_to_final, atol=1e-3)
    assert np.allclose(state["lens"]["entropy"], lens.entropy, atol=1e-3)
    logits = shipped.logits(ids)
    assert [row[0]["id"] for row in state["next"]] == logits.argmax(-1).tolist()
    steps = {(s["name"], s["layer"]): s for s in state["steps"]}  # the last forward (one token), layer 3
    assert {layer for _, layer in steps} == {None, 3}
    assert steps[("q", 3)]["shape"] == [8, 1, 32] and steps[("attn_probs", 3)]["shape"] == [8, 1, S]
    assert steps[("attn_probs", 3)]["mean"] == pytest.approx(1 / S)  # each row sums to 1
    names = [s["name"] for s in state["steps"]]
    assert names[names.index("v") + 1] == "attn_probs"  # where the recorder would list it
    other = post(explorer, "/api/attention", {"layer": 5})
    assert {s["layer"] for s in other["steps"]} == {None, 5}
    for head, b64 in enumerate(other["attention"]["maps"][0]):
        assert np.abs(decode(b64, S, other["attention"]["layouts"][0]) - attention_maps(shipped, ids, 5)[head]).max() < 1e-4


def test_the_kv_cache_view_counts_what_the_cache_holds(explorer, shipped):
    state = post(explorer, "/api/prompt", {"text": PROMPT})
    kv = post(explorer, "/api/step", {"n": 2})["kv"]
    cache = shipped.new_cache(8)
    assert kv["bytes_per_position"] == cache.bytes_per_position == 6 * 2 * 2 * 32 * 4  # layers, k+v, heads, hd, float32
    assert kv["length"] == len(state["tokens"]) + 2 and kv["bytes"] == kv["length"] * cache.bytes_per_position
    assert kv["next_step_reads"]["positions"] == kv["length"] + 1 and kv["left_attention"] == 0
    assert kv["error"] == [[0.0, 0.0]] * kv["length"]  # float32: stored as computed


@pytest.mark.parametrize("dtype, bound", [("float16", 2.0 ** -11), ("int8", 0.5 / 127)])
def test_a_smaller_cache_shows_the_error_each_position_carries(dtype, bound):
    model = minislm.load(BUNDLED_MODEL, kv_cache=dtype)
    run = session.start(model, model.tokenizer.encode(PROMPT), *session.settings_from(model, {}))
    session.step(run)
    trace = Recorder(names=("k", "v"))
    model.logits(run.ids[: run.cache.length], trace)
    error = np.array(session.kv_view(run)["error"])  # (S, 2): keys, values
    assert (error > 0).all()
    for n, name in enumerate(("k", "v")):
        # float16 rounds to 11 significant bits; int8 steps by max|x| / 127 per head and position.
        # The largest |x| at each position, from a float32-cache forward (1% for the paths' difference).
        largest = np.abs(np.stack(trace.per_layer(name))).max(axis=(0, 1, 3))  # (S,)
        assert (error[:, n] <= bound * largest * 1.01).all()


def test_the_sliding_window_shows_positions_leaving_attention():
    model = minislm.load(FIXTURES / "sliding")
    window = model.config.sliding_window
    run = session.start(model, model.tokenizer.encode("hello world, this is a test of the window"), *session.settings_from(model, {}))
    for _ in range(3):
        session.step(run)
    kv = session.kv_view(run)
    S = run.cache.length
    assert S > window and kv["window"] == window
    assert kv["next_step_reads"]["positions"] == window and kv["left_attention"] == S + 1 - window
    row = session.attention_rows(run, 0, [S - 1])[:, 0]  # the last query reads only the window
    assert (row[:, : S - window] == 0).all() and (row[:, S - window :] > 0).all()


def test_longrope_reprefills_at_the_switch_and_the_page_says_so():
    model = minislm.load(FIXTURES / "longrope")
    switch = model.config.rope.original_max_position_embeddings  # 64
    ids = (model.tokenizer.encode("hello " * 40) * 2)[: switch - 2]
    run = session.start(model, ids, *session.settings_from(model, {}))
    steps = [session.step(run) for _ in range(4)]
    assert [s.reprefilled for s in steps] == [False, False, True, False]  # 63, 64, then 65 > 64 positions
    kv = session.kv_view(run)
    assert kv["longrope"] == {"switch_after": switch, "long": True, "reprefills": [2]}
    full = attention_maps(model, run.ids[: run.cache.length], layer=1)  # after it, a full forward's numbers
    assert np.abs(session.attention_rows(run, 1, np.arange(run.cache.length)) - full).max() < 1e-5


def test_the_arithmetic_is_q_dot_k_times_the_scale_then_the_softmax(explorer, shipped):
    post(explorer, "/api/prompt", {"text": PROMPT})
    state = post(explorer, "/api/step", {"n": 2})
    ids = np.array([t["id"] for t in state["tokens"]])
    a = post(explorer, "/api/arithmetic", {"layer": 2, "head": 5, "query": 6})
    trace = Recorder(names=("q", "k", "v", "attn_probs", "attn_heads"), layers=[2])
    shipped.logits(ids, trace)
    q, k = trace.get("q", 2)[5, 6].astype(np.float64), trace.get("k", 2)[5 // 4].astype(np.float64)  # (hd,), (S, hd)
    hd = shipped.config.head_dim
    assert a["scale"] == pytest.approx(1 / np.sqrt(hd))
    assert np.allclose(a["q"], q, atol=1e-4) and np.allclose(a["scores"], k @ q / np.sqrt(hd), atol=1e-3)
    assert a["allowed"] == [s <= 6 for s in range(len(ids))]
    scores = np.where(a["allowed"], k @ q / np.sqrt(hd), -np.inf)
    p = np.exp(scores - scores.max())
    assert np.allclose(a["probabilities"], p / p.sum(), atol=ATOL_CACHED_VS_FULL)
    assert np.allclose(a["probabilities"], trace.get("attn_probs", 2)[5, 6], atol=ATOL_CACHED_VS_FULL)
    assert np.allclose(a["library"], a["probabilities"], atol=ATOL_CACHED_VS_FULL)
    assert np.allclose(a["output"], trace.get("attn_heads", 2)[6, 5 * hd : 6 * hd], atol=1e-4)
    assert np.allclose(a["output"], a["kernel_output"], atol=1e-5)
    inv_freq = 1.0 / shipped.config.rope.theta ** (np.arange(0, hd, 2) / hd)  # RoPE's formula, written here
    assert np.allclose(a["rope"]["angles"], 6 * inv_freq, rtol=1e-5)
    assert np.allclose(a["rope"]["key_angles"][3], 3 * inv_freq, rtol=1e-5)
    assert np.allclose(a["k"], k, atol=1e-4)  # the cached keys of kv head 1 (query head 5 of 8, 2 kv heads)
    assert a["source"]["mask"].startswith("model.py#L")


def test_phi3_small_scales_by_its_mup_multiplier_not_one_over_root_d():
    model = minislm.load(FIXTURES / "phi3small")
    run = session.start(model, np.arange(5, 30), *session.settings_from(model, {}))
    from minislm.watch.arithmetic import arithmetic

    a = arithmetic(run, 0, 1, 20)
    assert a["scale"] == pytest.approx(model.config.phi3small.attention_scale)
    assert a["scale"] != pytest.approx(model.config.head_dim ** -0.5)
    assert np.allclose(a["probabilities"], a["library"], atol=ATOL_CACHED_VS_FULL)


# ---------------------------------------------------------------- in a real browser


def settle(browser, done_before: int) -> None:
    """Wait until the page has answered more requests than `done_before` and has none in flight."""
    browser.wait_for(f"return +document.body.dataset.requests > {done_before} && document.body.dataset.busy === 'false'")


def act(browser, action) -> None:
    before = browser.run("return +(document.body.dataset.requests || 0)")
    action()
    settle(browser, before)


def test_a_learner_types_steps_moves_the_sliders_and_opens_the_arithmetic(browser, explorer, shipped):
    browser.open(explorer.url)
    browser.wait_for("return document.body.dataset.ready === '1'")
    act(browser, lambda: (browser.type("#prompt", PROMPT, clear=True), browser.click("#run")))
    ids = shipped.tokenizer.encode(PROMPT)
    for _ in range(5):
        act(browser, lambda: browser.click("#next"))
    shown = browser.run("return Array.from(document.querySelectorAll('#tokens .tok'), t => +t.querySelector('small')"
                        ".textContent.split(':')[1])")
    assert shown == ids + list(shipped.generate(ids, 5))  # the page's tokens are generate's
    everything = shown

    # the sliders, moved with the keyboard as a user moves them: temperature 0 -> 0.5, top-p 1 -> 0.8
    act(browser, lambda: browser.type("#temperature", "\ue014" * 10))
    act(browser, lambda: browser.type("#top-p", "\ue012" * 4))
    assert browser.run("return [document.getElementById('temperature').value, document.getElementById('top-p').value]") \
        == ["0.5", "0.8"]
    settings = sampling_settings(shipped, temperature=0.5, top_p=0.8)
    stages = make_sampler(shipped, settings, 0).stages(shipped.logits(everything)[-1], everything)
    header = browser.run("return Array.from(document.querySelectorAll('#sampling th[data-stage]'), "
                         "th => [th.dataset.stage, +th.dataset.survivors])")
    assert header == [[s.name, int(np.count_nonzero(s.logits > -np.inf))] for s in stages]
    assert [name for name, _ in header] == ["logits", "repetition_penalty", "temperature", "top_p"]
    rows = browser.run("return Array.from(document.querySelectorAll('#sampling tr[data-id]'), "
                       "tr => [+tr.dataset.id, Array.from(tr.querySelectorAll('td'), td => td.textContent)])")
    for token, cells in rows:
        expected = [f"{probabilities(s.logits)[token]:.4f}" for s in stages]
        assert [float(c) for c in cells] == pytest.approx([float(e) for e in expected], abs=1.5e-4)

    # the arithmetic of the query at position 7, head 3 of layer 0
    browser.click("#tokens .tok[data-pos='7']")
    browser.click("#head option[value='3']")
    act(browser, lambda: browser.click("#open-arithmetic"))
    assert browser.run("return document.getElementById('arithmetic').hidden") is False
    probs = attention_maps(shipped, np.array(everything), layer=0, heads=[3])[0]  # a full forward over the same ids
    table = browser.run("return Array.from(document.querySelectorAll('#arith-table tr[data-key]'), "
                        "tr => Array.from(tr.cells, td => td.textContent))")
    assert len(table) == len(everything)
    assert [float(row[5]) for row in table] == pytest.approx(probs[7].tolist(), abs=1.5e-4)
    assert [row[4] for row in table] == ["allowed"] * 8 + ["masked"] * (len(everything) - 8)
    trace = Recorder(names=("q", "k"), layers=[0])
    shipped.logits(np.array(everything), trace)
    scores = trace.get("k", 0)[3 // 4] @ trace.get("q", 0)[3, 7] / np.sqrt(shipped.config.head_dim)  # kv head 0
    assert [float(row[3]) for row in table] == pytest.approx(scores.tolist(), abs=2e-3)
    assert "= 1/sqrt(32)" in browser.run("return document.getElementById('arith-scale').textContent")
    link = browser.attribute("#arith-mask-source", "href")
    assert "/source/model.py#L" in link

    # one more token at the moved settings: drawn from the stages the panel showed
    act(browser, lambda: browser.click("#next"))
    chosen = int(browser.run("return document.getElementById('last-pick').dataset.token"))
    assert stages[-1].logits[chosen] > -np.inf

    # speculative decoding: off until the box is ticked, then three steps on a prompt that repeats itself
    act(browser, lambda: (browser.type("#prompt", COPYING, clear=True), browser.click("#run")))
    before = browser.run("return document.querySelectorAll('#tokens .tok').length")
    assert browser.run("return document.getElementById('spec-step').disabled") is True
    browser.click("#speculate")
    for _ in range(3):
        act(browser, lambda: browser.click("#spec-step"))
    chips = browser.run("return Array.from(document.querySelectorAll('#spec-rounds .tok'), t => [t.dataset.verdict, "
                        "+t.dataset.id, getComputedStyle(t).backgroundColor, +t.parentNode.dataset.round])")
    assert {round for *_, round in chips} == {0, 1, 2}
    guesses = [c for c in chips if c[0] in ("accepted", "rejected", "unchecked")]
    assert guesses, "prompt lookup guessed nothing on a prompt that repeats itself"
    colours = {verdict: colour for verdict, _, colour, _ in chips}
    assert len(set(colours.values())) == len(colours)  # each verdict its own colour
    legend = browser.run("return Array.from(document.querySelectorAll('#spec-legend .key'), k => [k.dataset.kind, "
                         "+k.dataset.count])")
    assert dict(legend) == {v: sum(c[0] == v for c in chips) for v in colours}  # the legend counts what is drawn
    drafted, accepted = browser.run("const d = document.getElementById('spec-legend').dataset; "
                                    "return [+d.drafted, +d.accepted]")
    assert (drafted, accepted) == (len(guesses), sum(c[0] == "accepted" for c in chips))
    kept = [i for verdict, i, _, _ in chips if verdict in ("accepted", "corrected", "bonus")]
    shown = browser.run("return Array.from(document.querySelectorAll('#tokens .tok'), t => +t.querySelector('small')"
                        ".textContent.split(':')[1])")
    assert shown[before:] == kept  # the text grew by the accepted guesses and the model's own tokens


def test_phi3_vision_explores_a_prompt_with_the_image_given_at_start(phi3_v_dir):
    from conftest import PHI3_V_FIXTURE
    from minislm.commands import open_images

    model = minislm.load(phi3_v_dir)
    pictures = open_images([PHI3_V_FIXTURE / "landscape.png"])
    server = ExploreServer(model, log=lambda line: None, pictures=pictures, num_crops=1)
    with threaded(server):
        post(server, "/api/prompt", {"text": "What is shown?"})
        state = post(server, "/api/step", {"n": 3})
    prompt = model.image_prompt("What is shown?", pictures, num_crops=1, chat=False)
    ids = [t["id"] for t in state["tokens"]]
    assert ids[: len(prompt.ids)] == prompt.ids.tolist() and ids.count(-1) == 313  # the image's 313 positions
    assert ids[len(prompt.ids):] == list(model.generate(prompt.ids, 3, image_features=prompt.features))
    (image,) = state["images"]
    assert (image["tokens"], len(image["views"])) == (313, 2)
    assert state["lens"]["next_ranks"][0][image["first"] - 1] == 0  # no id to rank before an image token
