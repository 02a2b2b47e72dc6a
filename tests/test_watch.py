"""The learner's commands (minislm/watch/): each shows numbers the model really computed.

Every test checks a value against an independent source: the model's own logits
(the lens), the recorder's full arrays (the trace's statistics), the definition of
attention (rows sum to 1, nothing above the diagonal), RoPE's formula written here,
the JSON a generation saved (routing), and the tokenizer (tokenize). The commands
run in-process through `minislm.cli.main`, as `python -m minislm` would run them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from minislm.cli import main
from minislm.load import BUNDLED_MODEL
from minislm.moe import sparsemixer
from minislm.trace import Recorder, SummaryRecorder
from minislm.watch.attention import attention_maps
from minislm.watch.lens import logit_lens
from minislm.watch.rope import rope_table
from minislm.watch.routing import routing_from_json, routing_of_prompt
from minislm.watch.tokens import describe

PROMPT = "ROMEO: But soft, what light"
MOE = str(FIXTURES / "moe_longrope")


@pytest.fixture(scope="module")
def shipped():
    return minislm.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def moe_model():
    return minislm.load(MOE)


def run(capsys, *args):
    """`python -m minislm ARGS` in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------- lens


@pytest.mark.parametrize("which, quant", [("shipped", None), ("shipped", "int4"), ("moe", None), ("moe", "bf16")])
def test_lens_after_the_last_layer_is_the_models_own_logits(which, quant, shipped, moe_model):
    model = {"shipped": shipped, "moe": moe_model}[which] if quant is None else minislm.load(
        BUNDLED_MODEL if which == "shipped" else MOE, quant=quant
    )
    ids = np.array(model.tokenizer.encode(PROMPT))
    lens = logit_lens(model, ids)
    assert np.array_equal(lens.last_logits, model.logits(ids))  # bit for bit, not close
    assert len(lens.rows) == model.config.num_hidden_layers + 1
    assert np.array_equal(lens.top_ids[-1], model.logits(ids).argmax(-1))


def test_lens_ranks_are_ranks_of_the_actual_next_token(shipped):
    ids = np.array(shipped.tokenizer.encode(PROMPT))
    lens = logit_lens(shipped, ids)
    for r in range(len(lens.rows)):
        top_is_next = lens.top_ids[r, :-1] == ids[1:]
        assert np.array_equal(lens.next_ranks[r] == 1, top_is_next)
    # the final row's rank, from the model's logits written out here
    logits = shipped.logits(ids)
    t = 3
    assert lens.next_ranks[-1, t] == 1 + int((logits[t] > logits[t, ids[t + 1]]).sum())


def test_lens_command_prints_the_models_next_token_distribution(capsys, shipped):
    status, out, _ = run(capsys, "lens", PROMPT, "--top-k", "3")
    assert status == 0
    logits = shipped.logits(shipped.tokenizer.encode(PROMPT))[-1].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    best = int(p.argmax())
    first = out.split("next token after the prompt")[1].splitlines()[1]
    assert f"{p[best]:7.4f}" in first and f"(id {best})" in first
    assert "layer 5" in out and "embed" in out


# ---------------------------------------------------------------- trace


def test_summary_recorder_keeps_the_statistics_of_the_full_values(shipped):
    ids = shipped.tokenizer.encode(PROMPT)
    full, summary = Recorder(), SummaryRecorder()
    shipped.logits(ids, full)
    shipped.logits(ids, summary)
    assert [(s.name, s.layer) for s in summary.summaries] == [(s.name, s.layer) for s in full.steps]
    for s, step in zip(summary.summaries, full.steps):
        assert s.shape == step.value.shape and s.dtype == str(step.value.dtype)
        assert s.mean == pytest.approx(float(step.value.astype(np.float64).mean()), abs=1e-12)
        assert (s.min, s.max) == (float(step.value.min()), float(step.value.max()))
    assert summary.nbytes == 0  # nothing kept whole


def test_trace_json_has_every_step_with_its_shape_and_statistics(capsys, tmp_path, shipped):
    out_file = tmp_path / "trace.json"
    status, out, _ = run(capsys, "trace", PROMPT, "--layers", "1-2", "--json", str(out_file))
    assert status == 0
    record = json.loads(out_file.read_text())
    ids = shipped.tokenizer.encode(PROMPT)
    T, c = len(ids), shipped.config
    steps = {(s["name"], s["layer"]): s for s in record["steps"]}
    assert {layer for _, layer in steps} == {None, 1, 2}
    assert steps[("q", 1)]["shape"] == [c.num_attention_heads, T, c.head_dim]
    assert steps[("attn_probs", 2)]["shape"] == [c.num_attention_heads, T, T]
    assert steps[("attn_probs", 2)]["mean"] == pytest.approx(1 / T, rel=1e-6)  # each row sums to 1
    logits = shipped.logits(ids)
    assert steps[("logits", None)]["max"] == float(logits.max())
    assert steps[("logits", None)]["mean"] == pytest.approx(float(logits.astype(np.float64).mean()), abs=1e-12)
    assert [t["id"] for t in record["tokens"]] == ids
    assert "resid_post" in out and out.count("\n") == len(record["steps"]) + 2


@pytest.mark.parametrize("quant", [None, "int4"])
def test_trace_on_phimoe_shows_the_router(capsys, quant):
    status, out, _ = run(capsys, "trace", "--model", MOE, "hello", *(["--quant", quant] if quant else []))
    assert status == 0
    assert all(name in out for name in ("router_logits", "experts", "expert_weights"))
    assert "gate " not in out  # PhiMoE has no dense MLP


# ---------------------------------------------------------------- attention


def test_attention_maps_are_causal_distributions_and_the_text_shows_them(capsys, shipped):
    ids = np.array(shipped.tokenizer.encode(PROMPT))
    T = len(ids)
    probs = attention_maps(shipped, ids, layer=2, heads=[3])
    assert probs.shape == (1, T, T)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert (probs[0][np.triu_indices(T, 1)] == 0).all()
    status, out, _ = run(capsys, "attention", PROMPT, "--layer", "2", "--head", "3", "--top", "1")
    assert status == 0
    rows = [line for line in out.splitlines() if "->" in line and line.strip()[0].isdigit()]
    assert len(rows) == T
    for t, line in enumerate(rows):
        key = int(probs[0, t].argmax())
        assert line.split("->")[1].split()[0] == str(key)
        assert line.rstrip().endswith(f"{probs[0, t, key]:.2f}")


def test_attention_without_head_lists_every_heads_favourite_key(capsys, moe_model):
    status, out, _ = run(capsys, "attention", "--model", MOE, "hello", "--layer", "-1", "--quant", "bf16")
    assert status == 0
    model = minislm.load(MOE, quant="bf16")
    probs = attention_maps(model, np.array(model.tokenizer.encode("hello")), layer=1)
    last = out.strip().splitlines()[-1]
    for h in range(model.config.num_attention_heads):
        assert f"h{h}:{int(probs[h, -1].argmax())} {probs[h, -1].max():.2f}" in last


def test_attention_refuses_a_layer_or_head_that_does_not_exist(capsys):
    status, _, err = run(capsys, "attention", PROMPT, "--layer", "6")
    assert status == 2 and "layers 0..5" in err
    status, _, err = run(capsys, "attention", PROMPT, "--layer", "0", "--head", "8")
    assert status == 2 and "query heads 0..7" in err


# ---------------------------------------------------------------- rope


def test_rope_table_is_theta_to_the_minus_2i_over_d_divided_by_the_factors(moe_model, shipped):
    table = rope_table(shipped.config)
    d = shipped.config.rope.rotary_dim
    assert np.allclose(table.inv_freq_short, 10000.0 ** (-np.arange(0, d, 2) / d), rtol=1e-6)
    assert table.inv_freq_long is None
    rope = moe_model.config.rope
    table = rope_table(moe_model.config)
    base = rope.theta ** (-np.arange(0, rope.rotary_dim, 2) / rope.rotary_dim)
    assert np.allclose(table.inv_freq_long, base / np.array(rope.long_factor), rtol=1e-6)
    assert np.allclose(table.wavelength_short, 2 * np.pi * np.array(rope.short_factor) / base, rtol=1e-6)


def test_rope_command_names_the_switch_and_the_scales(capsys):
    status, out, _ = run(capsys, "rope", "--model", MOE)
    assert status == 0
    assert "reaches 65 tokens" in out  # original_max_position_embeddings = 64
    assert "short 1.1, long 1.35" in out  # the fixture's short_mscale / long_mscale
    status, out, _ = run(capsys, "rope")
    assert status == 0 and "16 pairs (i, i + 16)" in out and "LongRoPE" not in out


# ---------------------------------------------------------------- routing


def test_routing_of_a_prompt_is_sparsemixers_choice(moe_model):
    ids = np.array(moe_model.tokenizer.encode("hello world"))
    routing = routing_of_prompt(moe_model, ids)
    trace = Recorder(names=("router_logits",))
    moe_model.logits(ids, trace)
    for layer, scores in enumerate(trace.per_layer("router_logits")):
        experts, weights = sparsemixer(scores, moe_model.config.router_jitter_noise)
        assert np.array_equal(routing.experts[layer], experts)
        assert np.array_equal(routing.weights[layer], weights)


def test_routing_reads_a_save_experts_file(capsys, tmp_path):
    saved = tmp_path / "experts.json"
    assert main(["generate", "--model", MOE, "hello", "-n", "4", "--save-experts", str(saved)]) == 0
    capsys.readouterr()
    record = json.loads(saved.read_text())
    routing = routing_from_json(str(saved))
    assert routing.experts.shape == (2, 4, 2)
    assert routing.experts[1, 3].tolist() == record["tokens"][3]["experts"][1]
    status, out, _ = run(capsys, "routing", "--from", str(saved))
    assert status == 0
    layer1 = [line for line in out.splitlines() if line.startswith("layer 1") and "/" in line][0]
    assert layer1.split()[2:] == ["%d/%d" % tuple(t["experts"][1]) for t in record["tokens"]]


def test_routing_needs_experts(capsys, tmp_path):
    status, _, err = run(capsys, "routing", PROMPT)
    assert status == 2 and "no experts" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": [{"experts": [[0]]}]}')
    status, _, err = run(capsys, "routing", "--from", str(bad))
    assert status == 2 and "bad.json" in err and "\n" not in err.strip()


# ---------------------------------------------------------------- tokenize


def test_tokenize_shows_word_starts_and_byte_fallbacks(capsys, shipped):
    text = "But soft, café"
    ids = shipped.tokenizer.encode(text)
    rows = describe(shipped.tokenizer, ids)
    assert rows[0].kind == "special" and rows[0].note == "BOS"
    assert [r.kind for r in rows if r.piece == "▁But"] == ["word start"]
    byte_rows = [r for r in rows if r.kind == "byte"]
    assert [r.piece for r in byte_rows] == ["<0xC3>", "<0xA9>"]  # é in UTF-8
    assert [r.note for r in byte_rows] == ["'é' byte 1/2", "'é' byte 2/2"]
    status, out, _ = run(capsys, "tokenize", text)
    assert status == 0
    assert out.strip().splitlines()[-1] == "ids: " + " ".join(map(str, ids))


def test_tokenize_chat_shows_the_template_and_its_ids(capsys, shipped):
    status, out, _ = run(capsys, "tokenize", "--chat", "Hi", "--system", "Be brief")
    assert status == 0
    expected = shipped.tokenizer.encode_chat([{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}])
    assert out.strip().splitlines()[-1] == "ids: " + " ".join(map(str, expected))
    assert "<|user|>↵" in out


# ---------------------------------------------------------------- pictures


def test_pictures_show_the_numbers_they_claim(tmp_path, shipped, moe_model):
    pytest.importorskip("matplotlib")
    from minislm.watch.plots import attention_figure, lens_figure, rope_figure, routing_figure

    ids = np.array(shipped.tokenizer.encode(PROMPT))
    labels = [shipped.tokenizer.token_piece(i) for i in ids]
    lens = logit_lens(shipped, ids)
    assert np.array_equal(lens_figure(lens, labels).axes[0].images[0].get_array(), lens.top_probs)
    probs = attention_maps(shipped, ids, layer=1)
    fig = attention_figure(probs, list(range(8)), labels, 1)
    assert all(np.array_equal(ax.images[0].get_array().data, p) for ax, p in zip(fig.axes, probs))
    assert fig.axes[0].images[0].get_array().mask[0, 1]  # the future is drawn as masked
    table = rope_table(moe_model.config)
    lines = rope_figure(table, moe_model.config).axes[0].lines
    assert np.allclose(lines[0].get_ydata(), table.wavelength_short) and np.allclose(lines[1].get_ydata(), table.wavelength_long)
    routing = routing_of_prompt(moe_model, np.array(moe_model.tokenizer.encode("hello")))
    fig = routing_figure(routing)
    assert np.array_equal(fig.axes[1].images[0].get_array(), routing.experts[:, :, 1])


@pytest.mark.parametrize("command", [["lens", PROMPT], ["attention", PROMPT, "--layer", "0"], ["rope"],
                                     ["routing", "--model", MOE, "hi"]])
def test_png_flags_write_a_png(capsys, tmp_path, command):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out.png"
    status, _, err = run(capsys, *command, "--png", str(out))
    assert status == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_png_says_how_to_install_and_text_still_works(tmp_path):
    """matplotlib made unimportable in a child process (sys.modules[name] = None)."""
    code = "import sys; sys.modules['matplotlib'] = None; from minislm.cli import main; sys.exit(main(sys.argv[1:]))"

    def minislm_without_matplotlib(*args):
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))

    png = tmp_path / "lens.png"
    refused = minislm_without_matplotlib("lens", "ROMEO:", "--png", str(png))
    assert refused.returncode == 2
    assert "pip install 'minislm[plot]'" in refused.stderr and refused.stderr.count("\n") == 1
    assert not png.exists()
    text = minislm_without_matplotlib("lens", "ROMEO:")
    assert text.returncode == 0 and "layer 5" in text.stdout
