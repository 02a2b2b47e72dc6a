"""Every bad input ends in exit status 2 and one line on stderr that names the file
or flag and the problem: no traceback, and nothing on stdout."""

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES

PROMPT = "hello"


def minislm(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "minislm", *args], capture_output=True, text=True, env=full_env, timeout=120,
        stdin=subprocess.DEVNULL,  # a prompt-less generate reads stdin: give it an empty one
    )


def assert_clean_error(result, *fragments):
    from minislm.compile_notice import NOTICE

    assert result.returncode == 2, result.stderr
    # A cold Numba cache announces itself before the kernel that finds the problem runs.
    lines = [line for line in result.stderr.strip().splitlines() if line != NOTICE]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minislm: error: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A private copy of a fixture checkpoint that a test may break."""
    target = tmp_path / "model"
    shutil.copytree(FIXTURES / "gqa", target)
    return target


@pytest.fixture
def moe_dir(tmp_path) -> Path:
    """A private copy of the PhiMoE fixture (4 experts, 2 layers) that a test may break."""
    target = tmp_path / "moe"
    shutil.copytree(FIXTURES / "moe", target)
    return target


def edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def generate(model, *flags, env=None):
    return minislm("generate", "--model", str(model), PROMPT, "--max-tokens", "4", *flags, env=env)


def rewrite_safetensors(path: Path, edit) -> None:
    """Re-serialize a safetensors file after `edit(header)` changed its header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new_header = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new_header)) + new_header + data[8 + n :])


def test_missing_folder(tmp_path):
    assert_clean_error(generate(tmp_path / "nope"), "--model", "no such folder")


def test_unknown_repo_id_offline(tmp_path):
    result = generate("nobody-here/no-such-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_clean_error(result, "nobody-here/no-such-model", "HF_HUB_OFFLINE")


def test_no_config_json(model_dir):
    (model_dir / "config.json").unlink()
    assert_clean_error(generate(model_dir), "no config.json")


def test_invalid_json(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "phi3",')
    assert_clean_error(generate(model_dir), "config.json", "invalid JSON")


def test_unsupported_model_type(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (model_dir / "config.json").write_text(json.dumps(config))
    assert_clean_error(generate(model_dir), "config.json", "'llama'", "supported: phi3")


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert_clean_error(generate(model_dir), "model.safetensors", "truncated")


def test_header_length_larger_than_the_file(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    assert_clean_error(generate(model_dir), "model.safetensors", "header length", "larger than the file")


def drop_tensors(path: Path, *names) -> None:
    """Rewrite the file without these tensors (their bytes go too: a header entry removed
    alone would leave a hole, which is refused as such)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    for name in names:
        del tensors[name]
    save_file(tensors, path)


def test_missing_tensor(model_dir):
    drop_tensors(model_dir / "model.safetensors", "model.layers.1.mlp.down_proj.weight")
    assert_clean_error(generate(model_dir), "missing tensor 'model.layers.1.mlp.down_proj.weight'")


def test_wrong_shaped_tensor(model_dir):
    def transpose(header):
        entry = header["model.layers.0.self_attn.o_proj.weight"]
        entry["shape"] = entry["shape"][::-1] + [1]
    rewrite_safetensors(model_dir / "model.safetensors", transpose)
    assert_clean_error(generate(model_dir), "model.layers.0.self_attn.o_proj.weight", "shape")


def test_pickle_only_checkpoint_is_refused_and_never_opened(model_dir, tmp_path):
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    assert_clean_error(generate(model_dir), "pytorch_model.bin", "pickle")
    assert not marker.exists()


def test_missing_tokenizer(model_dir):
    (model_dir / "tokenizer.json").unlink()
    assert_clean_error(generate(model_dir), "tokenizer.json")


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--temp", "-0.5"], ["--temp", ">= 0"]),
        (["--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["--max-tokens", "-3"], ["--max-tokens", ">= 0"]),
        (["--top-k", "-1"], ["--top-k"]),
        (["--min-p", "2"], ["--min-p"]),
        (["--repeat-penalty", "0"], ["--repeat-penalty"]),
        (["--threads", "0"], ["--threads"]),
        (["--temp", "warm"], ["--temp", "invalid float value"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    ],
)
def test_bad_flags(flags, fragments):
    assert_clean_error(generate(FIXTURES / "gqa", *flags), *fragments)


def test_prompt_longer_than_the_context():
    long_prompt = "word " * 200  # the fixture's context is 128 tokens
    result = minislm("generate", "--model", str(FIXTURES / "gqa"), long_prompt, "--no-chat-template")
    assert_clean_error(result, "prompt is", "context is 128")


def test_no_prompt():
    assert_clean_error(minislm("generate", "--model", str(FIXTURES / "gqa")), "no prompt")


def test_perplexity_missing_file(tmp_path):
    result = minislm("perplexity", "--model", str(FIXTURES / "gqa"), "--file", str(tmp_path / "none.txt"))
    assert_clean_error(result, "--file", "no such file")


def test_perplexity_stride_not_below_window(tmp_path):
    (tmp_path / "t.txt").write_text("some text to score " * 20)
    result = minislm("perplexity", "--model", str(FIXTURES / "gqa"), "--file", str(tmp_path / "t.txt"), "--window", "16", "--stride", "16")
    assert_clean_error(result, "--stride")


# ---------------------------------------------------------------- PhiMoE


def test_more_experts_per_token_than_experts(moe_dir):
    edit_config(moe_dir, num_experts_per_tok=5)  # the fixture has 4 experts
    assert_clean_error(generate(moe_dir), "config.json", "num_experts_per_tok (5)", "num_local_experts (4)")


def test_top_k_other_than_two_is_refused(moe_dir):
    """transformers' sparsemixer silently routes to 2 experts whatever this says; we refuse."""
    edit_config(moe_dir, num_experts_per_tok=1)
    assert_clean_error(generate(moe_dir), "config.json", "num_experts_per_tok is 1", "exactly 2")


def test_fewer_than_two_experts(moe_dir):
    edit_config(moe_dir, num_local_experts=1, num_experts_per_tok=1)
    assert_clean_error(generate(moe_dir), "config.json", "num_local_experts is 1", "at least 2")


def test_missing_expert_tensors(moe_dir):
    drop_tensors(moe_dir / "model.safetensors",
                 *(f"model.layers.1.block_sparse_moe.experts.2.{matrix}.weight" for matrix in ("w1", "w2", "w3")))
    assert_clean_error(generate(moe_dir), "model", "missing tensor 'model.layers.1.block_sparse_moe.experts.2.w1.weight'")


def test_router_shape_mismatch_in_the_file(moe_dir):
    def transpose(header):
        entry = header["model.layers.0.block_sparse_moe.gate.weight"]
        entry["shape"] = entry["shape"][::-1]
    rewrite_safetensors(moe_dir / "model.safetensors", transpose)
    assert_clean_error(
        generate(moe_dir), "block_sparse_moe.gate.weight", "shape [32, 4]", "implies [4, 32]", "num_local_experts"
    )


def test_router_shape_mismatch_with_the_config(moe_dir):
    """config.json says 3 experts, the checkpoint's routers score 4."""
    edit_config(moe_dir, num_local_experts=3)
    assert_clean_error(generate(moe_dir), "block_sparse_moe.gate.weight", "shape [4, 32]", "implies [3, 32]")


def test_phimoe_longrope_without_mscale(moe_dir):
    edit_config(
        moe_dir,
        original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "long_mscale": 1.2},
    )
    assert_clean_error(generate(moe_dir), "config.json", "short_mscale")


def test_show_experts_on_a_model_without_experts():
    assert_clean_error(generate(FIXTURES / "gqa", "--show-experts"), "--show-experts", "phi3", "no experts")
    chat = minislm("chat", "--model", str(FIXTURES / "gqa"), "--show-experts")
    assert_clean_error(chat, "--show-experts", "phi3", "no experts")


def test_save_experts_into_a_missing_folder(tmp_path):
    result = generate(FIXTURES / "moe", "--save-experts", str(tmp_path / "no" / "such" / "trace.json"))
    assert_clean_error(result, "--save-experts", "does not exist")


# ---------------------------------------------------------------- --encoder-activations


def test_encoder_activations_need_a_model_with_encoders():
    result = minislm("generate", "--model", str(FIXTURES / "gqa"), "--quant", "bf16", "--encoder-activations", "bf16",
                     "-n", "1", PROMPT)
    assert_clean_error(result, "--encoder-activations bf16", "has no image or speech encoder")


def test_encoder_activations_need_bf16_encoders(phi3_v_dir):
    result = minislm("generate", "--model", str(phi3_v_dir), "--encoder-activations", "bf16", "-n", "1", PROMPT)
    assert_clean_error(result, "--encoder-activations bf16", "add --quant bf16 or --quant int4")


def test_decoder_activations_need_bf16_matrices():
    for quant in ([], ["--quant", "int4"]):
        result = minislm("generate", "--model", str(FIXTURES / "gqa"), *quant, "--decoder-activations", "bf16",
                         "-n", "1", PROMPT)
        assert_clean_error(result, "--decoder-activations bf16", "add --quant bf16")


# ---------------------------------------------------------------- quantize


def test_quantize_refuses_an_existing_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    result = minislm("quantize", "--model", str(FIXTURES / "gqa"), "--out", str(tmp_path / "out"))
    assert_clean_error(result, "--out", "already exists")
    assert list((tmp_path / "out").iterdir()) == []


def test_quantize_rejects_nan_weights_and_writes_nothing(model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = np.nan
    save_file(tensors, model_dir / "model.safetensors")
    result = minislm("quantize", "--model", str(model_dir), "--out", str(tmp_path / "q"))
    assert_clean_error(result, "model.layers.0.mlp.down_proj.weight", "NaN")
    assert not (tmp_path / "q").exists()
    assert not any(p.name.startswith(".q") for p in tmp_path.iterdir())  # no staging folder left


def test_quantize_into_a_missing_parent_folder(tmp_path):
    result = minislm("quantize", "--model", str(FIXTURES / "gqa"), "--out", str(tmp_path / "a" / "b"))
    assert_clean_error(result, "--out", "does not exist")


def test_more_threads_than_numba_allows():
    assert_clean_error(generate(FIXTURES / "gqa", "--threads", "100000"), "--threads 100000")
