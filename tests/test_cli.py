"""The command line: streaming generate, stats on stderr, the chat REPL, verify."""

import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, import_reference

MODEL = str(FIXTURES / "gqa")


def minislm(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "minislm", *args], capture_output=True, text=True, input=stdin or "", timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=cwd,
    )


def test_generate_prints_text_to_stdout_and_stats_to_stderr():
    result = minislm("generate", "--model", MODEL, "hello", "--max-tokens", "12", "--temp", "0.8", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1
    stats = result.stderr.strip().splitlines()[-1]
    for item in ("prompt", "tok/s", "generated", "weights float32, KV cache float32", "peak memory"):
        assert item in stats


def test_generate_same_seed_same_text():
    args = ("generate", "--model", MODEL, "hello", "-n", "16", "--temp", "1.0", "--top-p", "0.9", "--seed", "5")
    first = minislm(*args)
    assert first.returncode == 0
    assert first.stdout == minislm(*args).stdout


def test_prompt_flag_and_positional_prompt_agree():
    positional = minislm("generate", "--model", MODEL, "hello", "-n", "8")
    flag = minislm("generate", "--model", MODEL, "--prompt", "hello", "-n", "8")
    assert positional.stdout == flag.stdout


def test_chat_repl_keeps_the_cache_between_turns():
    result = minislm("chat", "--model", MODEL, "-n", "5", stdin="hello\nand again\n/clear\nfresh start\n/bye\n")
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 3
    assert "reused from the cache" not in stats[0]
    assert "reused from the cache" in stats[1]  # turn 2 feeds only what is new
    assert "reused from the cache" not in stats[2]  # /clear forgot everything


@pytest.mark.parametrize("variant", ["longrope", "moe_longrope"])
def test_verify_passes_on_a_fixture(variant):
    """Run from the clone's root, where `python -m` puts the repository's kernels/ folder
    first on sys.path: transformers 5 imports the PyPI package `kernels`, and must get it."""
    import_reference()
    result = minislm("verify", "--model", str(FIXTURES / variant), "--max-tokens", "4", cwd=FIXTURES.parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "first diverging layer: none" in result.stdout


def test_verify_names_the_first_diverging_layer(tmp_path):
    """Break layer 1's MLP in a copy of a checkpoint: verify must fail and point at layer 1."""
    import_reference()
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(FIXTURES / "gqa", folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"] * np.float32(1.01)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    # transformers must see the original weights: give it the fixture, minislm the broken copy
    from minislm.verify import compare, load_reference
    import minislm as m

    result = compare(m.load(folder), load_reference(FIXTURES / "gqa"), np.arange(20) % 300, 0)
    assert result.first_divergent_layer == "layer 1"
    assert result.max_abs_diff > 1e-3


def test_show_experts_prints_each_tokens_experts_per_layer(tmp_path):
    """PhiMoE: --show-experts adds, on stderr, one block per generated token with each
    layer's two experts and weights; --save-experts writes the same as JSON. The text
    on stdout is what the run without them prints."""
    import json

    model = str(FIXTURES / "moe_longrope")  # 8 experts, 2 layers
    plain = minislm("generate", "--model", model, "hello", "-n", "5")
    traced = minislm("generate", "--model", model, "hello", "-n", "5", "--show-experts", "--save-experts", str(tmp_path / "t.json"))
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout
    lines = traced.stderr.splitlines()
    assert lines[0].startswith("[experts:") and "8 experts per layer" in lines[0]
    headers = [i for i, line in enumerate(lines) if line.startswith("#")]
    assert len(headers) == 5 and lines[headers[0]].startswith("#1 ")
    cells = lines[headers[0] + 1].split()  # "L0  6:0.41  1:0.67  L1 ..."
    assert cells[0] == "L0" and cells[3] == "L1" and len(cells) == 6

    record = json.loads((tmp_path / "t.json").read_text())
    assert record["num_local_experts"] == 8 and len(record["tokens"]) == 5
    for token in record["tokens"]:
        assert len(token["experts"]) == len(token["weights"]) == 2  # layers
        for (a, b), weights in zip(token["experts"], token["weights"]):
            assert a != b and 0 <= a < 8 and 0 <= b < 8 and all(0 < w <= 1 for w in weights)
    first = lines[headers[0] + 1].split()
    assert [int(first[1].split(":")[0]), int(first[2].split(":")[0])] == record["tokens"][0]["experts"][0]


def test_chat_show_experts_traces_each_reply():
    """The chat REPL's --show-experts: after each reply, one block per generated token."""
    result = minislm("chat", "--model", str(FIXTURES / "moe_longrope"), "-n", "3", "--show-experts",
                     stdin="hello\nagain\n/bye\n")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert sum(line.startswith("[experts:") for line in lines) == 2  # one trace per turn
    assert sum(line.startswith("#1 ") for line in lines) == 2
    assert len([line for line in lines if line.startswith("#")]) <= 6  # at most -n 3 tokens per turn


@pytest.mark.parametrize("quant", ["bf16", "int4"])
def test_generate_with_quantized_weights(quant):
    """--quant through the CLI: the text streams as with float32 weights. bf16 widens
    exactly, so its greedy text is the float32 text; int4 must generate too."""
    plain = minislm("generate", "--model", MODEL, "hello", "-n", "12", "--no-chat-template")
    result = minislm("generate", "--model", MODEL, "hello", "-n", "12", "--no-chat-template", "--quant", quant)
    assert result.returncode == 0, result.stderr
    assert "generated" in result.stderr.splitlines()[-1] and result.stdout.strip()
    if quant == "bf16":
        assert result.stdout == plain.stdout


def test_quantize_command_then_generate_from_the_folder(tmp_path):
    """`minislm quantize` writes a folder that `generate` runs as it is, giving the
    same text as quantizing at load with the same settings."""
    out = tmp_path / "q"
    done = minislm("quantize", "--model", MODEL, "--bits", "4", "--group-size", "32", "--out", str(out))
    assert done.returncode == 0, done.stderr
    from_folder = minislm("generate", "--model", str(out), "hello", "-n", "12", "--no-chat-template")
    at_load = minislm("generate", "--model", MODEL, "hello", "-n", "12", "--no-chat-template",
                      "--quant", "int4", "--group-size", "32")
    assert from_folder.returncode == 0, from_folder.stderr
    assert from_folder.stdout == at_load.stdout
