"""The KV cache in each of its dtypes: storage, copying, defaults, and what it costs in logits.

Bounds, each measured on the fixtures with tools/kv_cache_quality.py:

- cached decode against a full forward of the same model and cache dtype. Both
  read the keys and values from the same storage, so they differ by summation
  order as in float32, plus, rarely, a value that rounds to the other neighbour in
  one path: one float16 step is 2^-11 of the value (measured worst 1.7e-4 on these
  logits), one int8 step 1/127 of its row's largest value (measured 7e-6: no flip
  in the fixtures, but a flip would move logits by ~1e-2).
- float16 cache against transformers' float32 logits on the dense fixtures:
  rounding every key and value to 11 significant bits moves the fixtures' logits
  (spread over ~10 units by their random weights) by 2.6e-3 to 3.5e-3. PhiMoE
  fixtures are left out: there a logit error that small can flip a router's choice
  (moe_longrope: 0.58 with float16), which the float32 cache exists to rule out.
"""

import numpy as np
import pytest
from safetensors.numpy import load_file

import minislm
from minislm.cache import DTYPES, KVCache
from minislm.kernels.reference import quantize_cache_int8
from minislm.errors import MinislmError
from conftest import ATOL_FP32_LOGITS, FIXTURES, VARIANTS

ATOL_CACHED_VS_FULL = {"float32": ATOL_FP32_LOGITS, "float16": 1e-3, "int8": 2e-2}
ATOL_FP16_CACHE_LOGITS = 1e-2
DENSE_VARIANTS = [v for v in VARIANTS if not v.startswith("moe")]


@pytest.fixture(scope="module")
def config():
    return minislm.load(FIXTURES / "gqa").config


def random_kv(config, T, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config.num_key_value_heads, T, config.head_dim)
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_store_then_read_gives_the_values_in_the_cache_dtype(config, dtype):
    cache = KVCache(config, 20, dtype)
    k, v = random_kv(config, 7)
    cache.store(1, k, v)
    keys, values = cache.read(1, 7)
    assert keys.dtype == np.float32 and keys.shape == k.shape
    if dtype == "float32":
        assert np.array_equal(keys, k) and np.array_equal(values, v)
    elif dtype == "float16":
        assert np.array_equal(keys, k.astype(np.float16).astype(np.float32))
    else:  # within half an int8 step of each (head, position) row
        step = np.abs(k).max(-1, keepdims=True) / 127
        assert (np.abs(keys - k) <= step / 2 + 1e-7).all()
    assert not cache.read(0, 7)[0].any()  # other layers untouched


def test_int8_rows_use_the_full_code_range_and_zero_rows_stay_zero():
    x = np.array([[[0.5, -2.0, 1.0], [0.0, 0.0, 0.0]]], np.float32)
    codes, scales = quantize_cache_int8(x)
    assert codes[0, 0].tolist() == [32, -127, 64] and codes[0, 1].tolist() == [0, 0, 0]
    assert scales[0, 1] == 0 and np.isclose(scales[0, 0], 2 / 127)


def test_store_refuses_to_overflow(config):
    cache = KVCache(config, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.store(0, *random_kv(config, 5))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_copy_from_copies_the_filled_positions(config, dtype):
    source, target = KVCache(config, 10, dtype), KVCache(config, 10, dtype)
    for layer in range(config.num_hidden_layers):
        source.store(layer, *random_kv(config, 6, seed=layer))
    source.advance(np.arange(6), rope_long=True)
    target.copy_from(source)
    assert target.length == 6 and target.rope_long and target.tokens[:6].tolist() == list(range(6))
    for layer in range(config.num_hidden_layers):
        for a, b in zip(target.read(layer, 6), source.read(layer, 6)):
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="different"):
        KVCache(config, 10, "float32" if dtype != "float32" else "float16").copy_from(source)


def test_bytes_per_position(config):
    L, KV, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    assert KVCache(config, 1, "float32").bytes_per_position == L * KV * 2 * hd * 4
    assert KVCache(config, 1, "float16").bytes_per_position == L * KV * 2 * hd * 2
    assert KVCache(config, 1, "int8").bytes_per_position == L * KV * (2 * hd + 8)


def test_cache_dtype_defaults_follow_the_weights():
    assert minislm.load(FIXTURES / "gqa").new_cache(4).dtype == "float32"
    assert minislm.load(FIXTURES / "gqa", quant="int4").new_cache(4).dtype == "float16"
    assert minislm.load(FIXTURES / "gqa", quant="bf16", kv_cache="int8").new_cache(4).dtype == "int8"
    with pytest.raises(MinislmError, match="--kv-cache float8"):
        minislm.load(FIXTURES / "gqa", kv_cache="float8")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("variant", ["gqa", "sliding", "moe_sharded_bf16"])
def test_cached_decode_equals_full_forward(variant, dtype):
    """Prefill half, then one token at a time: each step equals a full forward of its prefix
    (float32 is checked on every fixture in test_fixtures.py)."""
    model = minislm.load(FIXTURES / variant, kv_cache=dtype)
    reference = load_file(FIXTURES / variant / "reference.safetensors")
    ids = max((reference[k] for k in reference if k.endswith(".input_ids")), key=len)
    split = len(ids) // 2
    cache = model.new_cache(len(ids))
    stepped = [model.lm_head(model.forward(ids[:split], cache))[-1]]
    for token in ids[split:-1]:
        stepped.append(model.lm_head(model.forward([token], cache))[0])
    for t, row in zip(range(split - 1, len(ids)), stepped):
        assert np.abs(row - model.logits(ids[: t + 1])[-1]).max() <= ATOL_CACHED_VS_FULL[dtype], t


@pytest.mark.parametrize("variant", DENSE_VARIANTS)
def test_float16_cache_stays_near_transformers(variant):
    model = minislm.load(FIXTURES / variant, kv_cache="float16")
    reference = load_file(FIXTURES / variant / "reference.safetensors")
    for case in sorted({k.split(".")[1] for k in reference if k.startswith("case.")}):
        got = model.logits(reference[f"case.{case}.input_ids"])
        assert np.abs(got - reference[f"case.{case}.logits"]).max() <= ATOL_FP16_CACHE_LOGITS, case
