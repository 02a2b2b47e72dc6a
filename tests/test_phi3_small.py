"""Phi-3-small (model_type phi3small) against the hub's remote code.

The golden files in tests/fixtures/phi3small*/ come from tools/make_phi3_small_fixtures.py,
which runs Microsoft's modeling_phi3_small.py on CPU: dense layers through torch's SDPA
instead of flash-attention, sparse layers through the Triton kernel's definition over
the remote code's own block layout. There is no live test: the remote code is not a
package (it is files in a hub repository, fetched with the network) and its Triton
import needs a package this suite does not install, so the fixtures are the reference.

At the real settings (64-token blocks, 16 local blocks) the pattern is plain causal
attention for the first 1024 tokens, so the fixtures shrink both: phi3small has
16-token blocks and 2 local blocks (a 32-token window), 4 heads whose vertical blocks
are shifted by 2 per head, dense layers 1 and 3; phi3small_longrope has 32-token
blocks cut into 16-token kernel tiles, one local block, every 3rd block for all heads
(homo_head_pattern), dense layer 2 of 3, and LongRoPE switching at 96 tokens.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import minislm
from conftest import ATOL_FP32_LOGITS, FIXTURES, decoder_greedy
from minislm.blocksparse import block_allowed, block_layout, is_dense_layer, token_mask
from minislm.config import parse_config
from minislm.errors import MinislmError
from minislm.model import lm_head
from minislm.phi3small_config import dummy_token_ids
from minislm.trace import Recorder

SMALL_FIXTURES = ["phi3small", "phi3small_longrope"]
REFERENCE = "reference_phi3small.safetensors"
# Hidden states grow to ~100 (the residual projections of the fixtures are large, see the
# tool); float32 summation order moves them by a few ulp of that, relative 1e-6.
RTOL_HIDDEN = 1e-5
# A fixture prompt longer than the local window must change the logits this much when
# the sparse layers attend densely instead (measured: 0.75 and 20; logits spread ~0.2 and ~4).
MIN_SPARSE_EFFECT = 0.1
# The KV cache against the float32 full forward: float32 to the usual bar; 16 and 8 bits
# relative to the row's largest logit, since the longrope fixture's keys and values are
# ~10x those of tests/test_kv_cache.py's fixtures (measured: 2e-4 relative for float16).
ATOL_CACHED_VS_FULL = {"float32": ATOL_FP32_LOGITS}
RTOL_CACHED_VS_FULL = {"float16": 1e-3, "int8": 2e-2}


@pytest.fixture(scope="module", params=SMALL_FIXTURES)
def small(request):
    folder = FIXTURES / request.param
    return request.param, minislm.load(folder), load_file(folder / REFERENCE)


def cases(reference):
    return sorted({key.split(".")[1] for key in reference if key.startswith("case.")})


def metadata(name: str) -> dict:
    with safe_open(FIXTURES / name / REFERENCE, "np") as f:
        return f.metadata()


def all_dense(model):
    """The same weights with every layer dense (dense_attention_every_n_layers = 1)."""
    config = model.config
    dense = dataclasses.replace(config, phi3small=dataclasses.replace(config.phi3small, dense_every=1))
    return minislm.Model(dense, model.weights, kv_cache=model.kv_cache, tokenizer=model.tokenizer,
                         generation_config=model.generation_config, path=model.path)


# ---------------------------------------------------------------- against the remote code


def test_logits_match_the_remote_code(small):
    name, model, reference = small
    for case in cases(reference):
        rows = reference[f"case.{case}.logit_rows"]
        got = model.logits(reference[f"case.{case}.input_ids"])[rows]
        expected = reference[f"case.{case}.logits"]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= ATOL_FP32_LOGITS, f"{name}/{case}"
        assert (got.argmax(-1) == expected.argmax(-1)).all(), f"{name}/{case}"


def test_each_layer_matches_the_remote_code(small):
    """The residual stream before each layer and after the final LayerNorm (the remote's
    output_hidden_states), so a failure names the first layer that diverges."""
    name, model, reference = small
    case = cases(reference)[0]
    ids, rows = reference[f"case.{case}.input_ids"], reference[f"case.{case}.logit_rows"]
    trace = Recorder(names=("embed", "resid_post", "final_norm"))
    model.logits(ids, trace)
    L = model.config.num_hidden_layers
    ours = [trace.get("embed")] + [trace.get("resid_post", i) for i in range(L - 1)] + [trace.get("final_norm")]
    for i, (got, expected) in enumerate(zip(ours, reference[f"case.{case}.hidden"], strict=True)):
        assert np.abs(got[rows] - expected).max() <= RTOL_HIDDEN * np.abs(expected).max(), f"{name}: hidden state {i}"


def test_sparse_layers_differ_from_dense_causal_attention(small):
    """The fixture prompt is longer than local_blocks x block_size, so the sparse layers
    leave out keys dense attention reads: the reference's logits with every layer dense
    differ, and minislm's dense path matches that dense reference too."""
    name, model, reference = small
    long = max(cases(reference), key=lambda c: len(reference[f"case.{c}.input_ids"]))
    rows, ids = reference[f"case.{long}.logit_rows"], reference[f"case.{long}.input_ids"]
    sparse, dense = reference[f"case.{long}.logits"], reference[f"case.{long}.dense_logits"]
    assert np.abs(sparse - dense).max() > MIN_SPARSE_EFFECT, name
    assert np.abs(all_dense(model).logits(ids)[rows] - dense).max() <= ATOL_FP32_LOGITS, name


def test_a_prompt_inside_the_local_window_is_plain_causal_attention():
    """Why a short test proves nothing: within local_blocks x block_size tokens (32 here)
    the pattern allows every earlier key."""
    reference = load_file(FIXTURES / "phi3small" / REFERENCE)
    assert len(reference["case.short.input_ids"]) <= 32
    assert np.array_equal(reference["case.short.logits"], reference["case.short.dense_logits"])


def test_greedy_continuation_matches_the_remote_code(small):
    """Through the KV cache, token for token with the remote model's full forwards (with
    LongRoPE the continuation crosses the switch; minislm then runs the sequence again)."""
    name, model, reference = small
    tokens = decoder_greedy(model, reference["greedy.prompt"], len(reference["greedy.tokens"]))
    assert tokens == reference["greedy.tokens"].tolist(), name


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cached_decode_equals_full_forward(small, dtype):
    """Prefill half the long case, then one token at a time (the sparse layers reading only
    their blocks of the cache): each step equals a full forward over its prefix."""
    name, model, reference = small
    ids = reference["case." + max(cases(reference), key=lambda c: len(reference[f"case.{c}.input_ids"])) + ".input_ids"]
    split = len(ids) // 2
    cache = model.new_cache(len(ids), dtype)
    stepped = [model.lm_head(model.forward(ids[:split], cache))[-1]]
    for token in ids[split:-1]:
        stepped.append(model.lm_head(model.forward([token], cache))[0])
    for t, row in list(zip(range(split - 1, len(ids)), stepped))[::5]:  # every 5th step: full forwards are slow
        full = model.logits(ids[: t + 1])[-1]
        bound = ATOL_CACHED_VS_FULL.get(dtype) or RTOL_CACHED_VS_FULL[dtype] * np.abs(full).max()
        assert np.abs(row - full).max() <= bound, f"{name}: {t}"


def test_decode_never_reads_the_blocks_the_pattern_excludes():
    """Skipped, not masked: poison the cached keys and values of every block that no head
    of a kv group may read with NaN. A kernel that read them (and masked the scores) would
    get NaN (0 x NaN); the decode step must give exactly the clean logits."""
    model = minislm.load(FIXTURES / "phi3small")
    config, B = model.config, model.config.phi3small.block_size
    ids = load_file(FIXTURES / "phi3small" / REFERENCE)["case.long.input_ids"]
    prompt, last = ids[:-1], ids[-1:]
    clean = model.new_cache(len(ids))
    model.forward(prompt, clean)
    expected = model.lm_head(model.forward(last, clean))
    poisoned = model.new_cache(len(ids))
    model.forward(prompt, poisoned)
    q_block = len(prompt) // B
    layout = block_layout(config, np.array([q_block]), q_block + 1)[:, 0]  # (H, blocks)
    G = config.num_attention_heads // config.num_key_value_heads
    excluded = 0
    for kv in range(config.num_key_value_heads):
        for kb in np.flatnonzero(~layout[kv * G : (kv + 1) * G].any(axis=0)):
            for layer in range(config.num_hidden_layers):
                if not is_dense_layer(config, layer):
                    poisoned.keys[layer, kv, kb * B : (kb + 1) * B] = np.nan
                    poisoned.values[layer, kv, kb * B : (kb + 1) * B] = np.nan
                    excluded += 1
    assert excluded >= 8  # blocks 0-4 and 6 of kv head 0, 0-2 and 4-6 of kv head 1, in two layers
    assert np.array_equal(model.lm_head(model.forward(last, poisoned)), expected)


# ---------------------------------------------------------------- the pattern


def test_block_pattern_is_the_remote_codes_own_layout():
    """`_get_sparse_attn_mask`'s block mask (recorded by the tool) for each fixture's
    settings and for the real Phi-3-small-8k config, block for block."""
    for name in SMALL_FIXTURES:
        config = minislm.load(FIXTURES / name).config
        remote = load_file(FIXTURES / name / REFERENCE)["pattern.blocks"].astype(bool)
        n = remote.shape[-1]
        ours = block_layout(config, np.arange(n), n)
        assert np.array_equal(ours, np.broadcast_to(remote, ours.shape)), name
    real = parse_config(real_config())
    packed = load_file(FIXTURES / "phi3small" / REFERENCE)["pattern.real_8k_packed"]
    remote = np.unpackbits(packed)[: 32 * 128 * 128].reshape(32, 128, 128).astype(bool)
    assert np.array_equal(block_layout(real, np.arange(128), 128), remote)


def real_config() -> dict:
    """microsoft/Phi-3-small-8k-instruct's config.json (as tools/make_phi3_small_fixtures.py records it)."""
    raw = json.loads((FIXTURES / "phi3small" / "config.json").read_text())
    return dict(raw, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                ff_intermediate_size=14336, max_position_embeddings=8192, vocab_size=100352, blocksparse_block_size=64,
                blocksparse_triton_kernel_block_size=64, blocksparse_num_local_blocks=16, blocksparse_vert_stride=8,
                gegelu_limit=20.0, rope_position_scale=1.0)


def test_block_layout_is_block_allowed_for_every_block():
    for name in SMALL_FIXTURES:
        config = minislm.load(FIXTURES / name).config
        layout = block_layout(config, np.arange(12), 12)
        for h in range(config.num_attention_heads):
            for qb in range(12):
                for kb in range(12):
                    assert layout[h, qb, kb] == block_allowed(config, h, qb, kb), (name, h, qb, kb)


def test_real_settings_read_the_last_1024_tokens_and_one_block_in_eight():
    config = parse_config(real_config())
    assert [i for i in range(32) if is_dense_layer(config, i)] == list(range(1, 32, 2))
    mask = token_mask(config, np.arange(1024), 1024)
    assert np.array_equal(mask, np.broadcast_to(np.tril(np.ones((1024, 1024), bool)), mask.shape))
    layout = block_layout(config, np.array([127]), 128)[:, 0]  # the last query block of the 8k context
    for h in range(32):
        vertical = [kb for kb in range(128 - 16) if layout[h, kb]]
        assert vertical == list(range(7 - h % 8, 112, 8)), h
        assert layout[h, 112:].all()


def test_dense_layers_follow_the_remote_codes_rule():
    """(layer + 1) % n == 0 (modeling_phi3_small.py); mlx-lm's layer % n == 0 agrees only for n = 2."""
    config = parse_config(dict(real_config(), dense_attention_every_n_layers=3))
    assert [i for i in range(9) if is_dense_layer(config, i)] == [2, 5, 8]
    for none in (None, 0):
        config = parse_config(dict(real_config(), dense_attention_every_n_layers=none))
        assert not any(is_dense_layer(config, i) for i in range(32))
    assert load_file(FIXTURES / "phi3small_longrope" / REFERENCE) is not None
    assert json.loads(metadata("phi3small_longrope")["sparse_layers"]) == [0, 1]
    assert json.loads(metadata("phi3small")["sparse_layers"]) == [0, 2]


# ---------------------------------------------------------------- logits, config


def test_masked_token_ids_are_the_remote_tokenizers_dummy_ids():
    """The 91 ids tokenization_phi3_small.py's own `dummy_token_indices` lists (recorded by
    the tool), and lm_head sets exactly them to float32's lowest value at the real vocab size."""
    assert list(dummy_token_ids()) == json.loads(metadata("phi3small")["dummy_token_indices"])
    config = parse_config(dict(real_config(), hidden_size=8, num_attention_heads=2, num_key_value_heads=1))
    assert config.phi3small.masked_token_ids == dummy_token_ids() and len(dummy_token_ids()) == 91
    rng = np.random.default_rng(0)
    weights = {"model.embed_tokens.weight": rng.standard_normal((100352, 8), dtype=np.float32)}
    hidden = rng.standard_normal((3, 8), dtype=np.float32)
    logits = lm_head(config, weights, hidden)
    expected = hidden @ weights["model.embed_tokens.weight"].T / np.float32(8.0)
    masked = np.zeros(100352, bool)
    masked[list(dummy_token_ids())] = True
    assert (logits[:, masked] == np.finfo(np.float32).min).all()
    assert np.allclose(logits[:, ~masked], expected[:, ~masked], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"blocksparse_triton_kernel_block_size": 24}, "'blocksparse_triton_kernel_block_size' is 24"),
        ({"blocksparse_triton_kernel_block_size": 8}, "power of two >= 16"),
        ({"blocksparse_block_size": 40}, "'blocksparse_block_size' (40) must be a multiple"),
        ({"blocksparse_num_local_blocks": 0}, "'blocksparse_num_local_blocks' must be >= 1"),
        ({"blocksparse_vert_stride": None}, "missing required key 'blocksparse_vert_stride'"),
        ({"hidden_act": "silu"}, "hidden_act 'silu' is not supported for phi3small"),
        ({"ff_dim_multiplier": 2}, "give exactly one of 'ff_intermediate_size' and 'ff_dim_multiplier'"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                           "original_max_position_embeddings": 96, "factor": 2.0}}, "unknown key 'factor'"),
        ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8,
                           "original_max_position_embeddings": 96}}, "'short_factor' must be a list of 8"),
        ({"mup_width_multiplier": "8"}, "'mup_width_multiplier' must be a finite number"),
    ],
)
def test_bad_config_is_one_line_naming_the_file_and_key(change, message):
    raw = json.loads((FIXTURES / "phi3small" / "config.json").read_text())
    raw.update(change)
    if change.get("blocksparse_vert_stride", 0) is None:
        del raw["blocksparse_vert_stride"]
    with pytest.raises(MinislmError) as error:
        parse_config(raw, "phi3small/config.json")
    text = str(error.value)
    assert text.startswith("phi3small/config.json") and message in text and "\n" not in text


def test_a_missing_size_is_named():
    raw = json.loads((FIXTURES / "phi3small" / "config.json").read_text())
    del raw["num_key_value_heads"]
    with pytest.raises(MinislmError, match="missing required key 'num_key_value_heads'"):
        parse_config(raw, "config.json")


# ---------------------------------------------------------------- everything else works with it


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minislm", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=cwd)


def test_bf16_weights_match_the_remote_code():
    """The fixture's weights are bf16: kept as bf16 words (--quant bf16), with a float32 KV
    cache, the logits are the float32 path's, summed in another order."""
    model = minislm.load(FIXTURES / "phi3small_longrope", quant="bf16", kv_cache="float32")
    reference = load_file(FIXTURES / "phi3small_longrope" / REFERENCE)
    got = model.logits(reference["case.above.input_ids"])[reference["case.above.logit_rows"]]
    assert np.abs(got - reference["case.above.logits"]).max() <= ATOL_FP32_LOGITS


def test_int4_folder_from_quantize_loads_and_equals_int4_in_memory(tmp_path):
    """`minislm quantize` packs query_key_value, dense, up/down_proj and the tied embedding
    (the output layer, 8-bit); biases and LayerNorms stay float32; the folder reloads
    bit for bit. (On random weights int4 moves these logits a lot: no bar against the reference.)"""
    result = cli("quantize", "--model", str(FIXTURES / "phi3small"), "--out", str(tmp_path / "q"))
    assert result.returncode == 0, result.stderr
    reloaded = minislm.load(tmp_path / "q")
    in_memory = minislm.load(FIXTURES / "phi3small", quant="int4")
    assert isinstance(reloaded.weights["model.layers.0.self_attn.query_key_value.bias"], np.ndarray)
    assert not isinstance(reloaded.weights["model.layers.0.self_attn.query_key_value.weight"], np.ndarray)
    ids = load_file(FIXTURES / "phi3small" / REFERENCE)["case.long.input_ids"]
    logits = reloaded.logits(ids)
    assert np.isfinite(logits).all() and np.array_equal(logits, in_memory.logits(ids))
    tokens = list(reloaded.generate(ids[:40], max_new_tokens=5))
    assert len(tokens) == 5


def test_cli_generate_on_the_fixture_with_plain_text():
    result = cli("generate", "--model", str(FIXTURES / "phi3small"), "--no-chat-template", "-n", "12",
                 "a prompt longer than the local window of thirty-two tokens, so the sparse layers skip blocks")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "tok/s" in result.stderr


def test_cli_refuses_a_block_size_the_kernel_cannot_take(tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(FIXTURES / "phi3small", folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(raw, blocksparse_triton_kernel_block_size=12)))
    result = cli("generate", "--model", str(folder), "-n", "2", "hi")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "config.json" in result.stderr
    assert "'blocksparse_triton_kernel_block_size' is 12" in result.stderr and "Traceback" not in result.stderr


def test_trace_records_each_heads_block_pattern():
    """A sparse layer's recorded probabilities are 0 exactly where the head's pattern skips
    keys, and rows sum to 1; the dense layer after it reads every earlier key."""
    model = minislm.load(FIXTURES / "phi3small")
    ids = load_file(FIXTURES / "phi3small" / REFERENCE)["case.long.input_ids"][:100]
    trace = Recorder(names=("attn_probs",), layers=[0, 1])
    model.logits(ids, trace)
    sparse, dense = trace.get("attn_probs", 0), trace.get("attn_probs", 1)
    mask = token_mask(model.config, np.arange(100), 100)
    assert np.allclose(sparse.sum(-1), 1, atol=1e-5) and (sparse[~mask] == 0).all() and (sparse[mask] > 0).all()
    assert (dense[:, np.tril(np.ones((100, 100), bool))] > 0).all()
    result = cli("trace", "--model", str(FIXTURES / "phi3small"), "--layers", "0", "hello there")
    assert result.returncode == 0, result.stderr
    assert "attn_probs" in result.stdout


def test_attention_picture_shades_the_blocks_each_head_skips(tmp_path):
    from minislm.watch.attention import skipped_blocks

    model = minislm.load(FIXTURES / "phi3small")
    skipped = skipped_blocks(model, 100, 0, [0, 3])
    assert skipped.shape == (2, 100, 100)
    # head 3 reads block 1 (keys 16-31) from any query block; head 0 does not
    assert not skipped[1, 99, 16:32].any() and skipped[0, 99, 16:32].all()
    assert skipped_blocks(model, 100, 1, [0]) is None  # layer 1 is dense
    png = tmp_path / "attention.png"
    result = cli("attention", "--model", str(FIXTURES / "phi3small"), "--layer", "0", "--png", str(png),
                 "a prompt longer than the local window of thirty-two tokens, so the sparse layers skip blocks")
    assert result.returncode == 0, result.stderr
    assert png.stat().st_size > 0 and "layer 0 is block-sparse" in result.stdout
