"""The command line: streaming generate, stats on stderr, the chat REPL, verify."""

import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, import_reference

MODEL = str(FIXTURES / "gqa")


def minislm(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "minislm", *args], capture_output=True, text=True, input=stdin, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def test_generate_prints_text_to_stdout_and_stats_to_stderr():
    result = minislm("generate", "--model", MODEL, "hello", "--max-tokens", "12", "--temp", "0.8", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout) > 1
    stats = result.stderr.strip().splitlines()[-1]
    for item in ("prompt", "tok/s", "generated", "peak memory"):
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


def test_verify_passes_on_a_fixture():
    import_reference()
    result = minislm("verify", "--model", str(FIXTURES / "longrope"), "--max-tokens", "4")
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
