"""The CLIP tower and the image-token layout (minislm/vision/tower.py, embedding.py).

The tower is checked live against transformers' native `CLIPVisionModel` on random
small configurations; the layout (2x2 merge, crop grid, separators) against
hand-made inputs whose every value says where it came from.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import import_reference
from minislm.kernels import Bf16Weight
from minislm.vision.config import VISION_MODEL, VisionConfig
from minislm.vision.embedding import crop_grid, erf, erf_reference, gelu, image_sequence, merge_2x2, with_row_separators
from minislm.vision.image import num_image_tokens
from minislm.vision.tower import vision_tower

# Both sides compute in float32 and differ in summation order only (BLAS vs torch),
# through a handful of blocks of unit-scale activations: ~1e-5. The bar.
ATOL_TOWER = 1e-4


# ---------------------------------------------------------------- live: CLIPVisionModel


@settings(max_examples=6, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16]),
    layers=st.integers(1, 4),
    layer_idx=st.sampled_from([-2, -1, 1]),
    ffn=st.sampled_from([16, 48]),
    side=st.integers(1, 4),
    crops=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_tower_matches_transformers_clip(heads, head_dim, layers, layer_idx, ffn, side, crops, seed):
    """Our tower's output is CLIPVisionModel's hidden_states[layer_idx] without the class
    token, for random sizes (Phi-3-vision itself: 16 heads of 64, 24 layers, -2)."""
    torch, transformers = import_reference()
    layer_idx = min(layer_idx, layers)
    patch = 14
    hf_config = transformers.CLIPVisionConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=ffn,
        image_size=side * patch, patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    hf_config._attn_implementation = "eager"
    reference = transformers.CLIPVisionModel(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
    weights = {VISION_MODEL + k.removeprefix("vision_model."): v.numpy() for k, v in reference.state_dict().items()}
    pixels = torch.randn(crops, 3, side * patch, side * patch, generator=generator)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True).hidden_states[layer_idx][:, 1:].numpy()

    config = VisionConfig(
        hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
        image_size=side * patch, layer_idx=layer_idx,
    )
    got = vision_tower(config, weights, pixels.numpy())
    assert got.shape == (crops, side * side, heads * head_dim)
    assert np.abs(got - expected).max() <= ATOL_TOWER


def test_tower_with_bf16_weights_equals_float32_on_bf16_values():
    """Packed bf16 matrices (minislm.kernels.Bf16Weight) multiply exactly what their
    float32 widening multiplies: the tower agrees to float32 rounding."""
    rng = np.random.default_rng(0)
    config = VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28)
    from minislm.vision.config import vision_shapes
    from minislm.weights import bf16_to_float32, float32_to_bf16

    weights = {}
    for name, shape in vision_shapes(config, 8).items():
        values = rng.standard_normal(shape).astype(np.float32) / (math.sqrt(shape[-1]) if len(shape) > 1 else 4)
        weights[name] = bf16_to_float32(float32_to_bf16(values)).reshape(shape)
    packed = {n: Bf16Weight(w) if n.endswith(("proj.weight", "fc1.weight", "fc2.weight")) else w for n, w in weights.items()}
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    assert np.abs(vision_tower(config, packed, pixels) - vision_tower(config, weights, pixels)).max() <= 1e-5


# ---------------------------------------------------------------- erf / gelu


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.integers(0, 200), elements=st.floats(-30, 30, width=32)))
def test_erf_equals_its_plain_twin(x):
    assert np.array_equal(erf(x), erf_reference(x))


def test_gelu_matches_torch():
    torch, _ = import_reference()
    x = np.linspace(-8, 8, 10001, dtype=np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # exact erf form
    # torch evaluates erf in float32, we round libm's double erf: the factor (1 + erf)
    # differs by a few float32 ulps (~1e-7), times |x| <= 8
    assert np.abs(gelu(x) - expected).max() <= 2e-6


# ---------------------------------------------------------------- layout


def tagged_features(views: int, channels: int = 1) -> np.ndarray:
    """(views, 576, channels): the value is view * 1000 + patch index (row * 24 + col)."""
    values = np.arange(views)[:, None] * 1000 + np.arange(576)[None, :]
    return np.repeat(values[..., None], channels, axis=-1).astype(np.float32)


def test_merge_2x2_puts_each_block_side_by_side():
    cells = merge_2x2(tagged_features(1, channels=2))  # (1, 12, 12, 8)
    assert cells.shape == (1, 12, 12, 8)
    # cell (r, c) holds patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1), 2 channels each
    for r, c in [(0, 0), (3, 7), (11, 11)]:
        top, left = 2 * r, 2 * c
        expected = [top * 24 + left, top * 24 + left + 1, (top + 1) * 24 + left, (top + 1) * 24 + left + 1]
        assert cells[0, r, c].tolist() == [float(p) for p in expected for _ in range(2)]


def test_crop_grid_puts_crops_where_they_were():
    rows, cols = 2, 3
    cells = merge_2x2(tagged_features(rows * cols))[..., :1]  # first channel: patch id of the block's corner
    grid = crop_grid(cells, rows, cols)  # (24, 36, 1)
    assert grid.shape == (rows * 12, cols * 12, 1)
    for r in range(rows):
        for c in range(cols):
            crop = r * cols + c
            assert grid[r * 12, c * 12, 0] == crop * 1000  # the crop's first cell
            assert grid[r * 12 + 11, c * 12 + 11, 0] == crop * 1000 + 22 * 24 + 22


def test_row_separators_end_every_row():
    grid = np.zeros((3, 4, 2), np.float32)
    flat = with_row_separators(grid, np.array([7.0, 7.0], np.float32))
    assert flat.shape == (3 * 5, 2)
    assert (flat.reshape(3, 5, 2)[:, 4] == 7).all() and (flat.reshape(3, 5, 2)[:, :4] == 0).all()


@pytest.mark.parametrize("rows, cols", [(1, 1), (2, 2), (3, 2), (2, 3), (1, 16), (4, 4)])
def test_sequence_order_and_length(rows, cols):
    """[crop grid with row ends] + glb_GN + [global view with row ends]; as long as the
    processor's placeholder count."""
    C = 2
    weights = {"model.vision_embed_tokens.sub_GN": np.full((1, 1, 1, 4 * C), -1, np.float32),
               "model.vision_embed_tokens.glb_GN": np.full((1, 1, 4 * C), -2, np.float32)}
    features = tagged_features(1 + rows * cols, C)  # view 0 = the global view
    sequence = image_sequence(features, (rows, cols), weights)
    assert len(sequence) == num_image_tokens(rows * 336, cols * 336)
    crop_part = rows * 12 * (cols * 12 + 1)
    assert (sequence[crop_part] == -2).all()  # glb_GN between the crops and the global view
    assert (sequence[crop_part + 1 : crop_part + 1 + 12, 0] < 1000).all()  # then the global view (view 0)
    assert (sequence[cols * 12] == -1).all() and (sequence[-1] == -1).all()  # sub_GN ends rows
    assert sequence[0, 0] == 1000  # the crops start with crop (0, 0) = view 1
