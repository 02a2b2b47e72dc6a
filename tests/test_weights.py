"""safetensors reading: dtypes, sharding, bf16 without torch."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from minislm.weights import bf16_to_float32, float32_to_bf16, read_checkpoint, read_safetensors
from conftest import FIXTURES


def test_f32_and_f16_tensors_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float16)}
    save_file(tensors, tmp_path / "x.safetensors")
    read = read_safetensors(tmp_path / "x.safetensors")
    assert read["a"].dtype == "F32" and np.array_equal(read["a"].float32(), tensors["a"])
    assert read["b"].dtype == "F16" and np.array_equal(read["b"].float32(), tensors["b"].astype(np.float32))
    assert not read["a"].array.flags.owndata  # a view of the memory-mapped file, not a copy


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_bf16_round_trip_is_exact_for_bf16_values(values):
    """Rounding to bf16 then widening is idempotent, and widening is exact."""
    words = float32_to_bf16(np.array(values, dtype=np.float32))
    widened = bf16_to_float32(words)
    assert np.array_equal(float32_to_bf16(widened), words)
    # round-to-nearest with 8 significant bits: error <= half an ulp, under 2^-8 relative;
    # below float32's normal range, half of bf16's subnormal spacing, 2^-134
    finite = np.isfinite(widened) & (np.abs(np.array(values, dtype=np.float32)) < 3e38)
    ref = np.array(values, dtype=np.float32)[finite]
    assert np.all(np.abs(widened[finite] - ref) <= np.maximum(np.abs(ref) * 2.0**-8, 2.0**-134))


def test_bf16_matches_torch_bit_for_bit_on_the_sharded_fixture():
    """The sharded fixture was written by torch in bf16; its reference logits were made
    from those same bf16 values widened to float32. test_fixtures checks the logits;
    here we check the shards are really bf16 and all read."""
    tensors = read_checkpoint(FIXTURES / "sharded_bf16")
    assert {t.dtype for t in tensors.values()} == {"BF16"}
    assert len(list((FIXTURES / "sharded_bf16").glob("model-*.safetensors"))) >= 2
    assert "lm_head.weight" in tensors and "model.norm.weight" in tensors
