"""Phi-4-multimodal's pieces against transformers' phi4_multimodal, live, on random inputs.

Skipped without torch and transformers (tests/optional.py); the image processor's
tests also need torchvision (transformers' Phi4MultimodalImageProcessor runs on it).
The golden fixture (tests/test_phi4mm_fixture.py) checks the same without them.
"""

import numpy as np
import pytest

from optional import require_module

from minislm.multimodal.config import ConformerConfig, SiglipConfig
from minislm.multimodal.conformer import conformer_encoder
from minislm.multimodal.features import log_mel
from minislm.multimodal.image import process_image, resize_bilinear_antialias
from minislm.multimodal.siglip import siglip_tower

torch = require_module("torch")
transformers = require_module("transformers")

ATOL_STATES = 1e-4  # float32 on both sides, summation order apart
# minislm's bf16 x bf16 encoders (bf16 weights, activations rounded to bf16 before each
# product) against transformers in bf16, which also rounds every other operation's
# output (norms, residuals, the states themselves) to bf16. Measured worst 1.1 % of the
# largest state (SigLIP and Conformer, 3 sizes each; float32 activations: 1.1 % too):
# bf16 rounds to 2**-9 relative, a few roundings deep. The bar is 2**-5 of the largest.
RTOL_BF16_STATES = 2.0**-5


def to_numpy_weights(module, prefix: str) -> dict:
    return {prefix + name: value.detach().numpy().astype(np.float32) for name, value in module.state_dict().items()}


def randomize(module, seed: int) -> None:
    """Weights of trained size: unit-variance outputs, norms near 1, biases near 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or name.endswith(("b1", "b2")):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = int(np.prod(p.shape[1:])) or 1
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
        for name, b in module.named_buffers():
            if name.endswith("global_invstd"):
                b.copy_(0.1 + torch.rand(b.shape, generator=generator))
            elif name.endswith("global_mean"):
                b.copy_(10 * torch.rand(b.shape, generator=generator))


# ---------------------------------------------------------------- the image processor


@pytest.fixture(scope="module")
def image_processor():
    require_module("torchvision")
    return transformers.Phi4MultimodalImageProcessor()


@pytest.mark.parametrize("seed", range(6))
def test_image_processor_on_random_pictures(image_processor, seed):
    """Random sizes (some past 36 crops), modes RGB, RGBA, L and P: the crops bit for
    bit, the global view within 1e-6, the patch masks, the token count."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(10, 2400, 2))
    if seed == 5:
        width, height = 6000, 700  # 14 x 2 crops > 36: the closest grid of at most 36
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    picture = [Image.fromarray(pixels, "RGBA"), Image.fromarray(pixels[..., :3], "RGB"),
               Image.fromarray(pixels[..., 0], "L"), Image.fromarray(pixels[..., :3], "RGB").convert("P")][seed % 4]
    reference = image_processor(images=[picture], return_tensors="pt")
    ours = process_image(picture)
    views = len(ours.pixel_values)
    theirs = reference["image_pixel_values"][0].numpy()
    assert np.array_equal(theirs[1:views], ours.pixel_values[1:])
    assert np.abs(theirs[0] - ours.pixel_values[0]).max() <= 1e-6
    assert np.array_equal(reference["image_attention_mask"][0].numpy()[:views].astype(bool), ours.patch_mask)
    assert reference["image_sizes"][0].tolist() == list(ours.canvas_size)
    assert int(reference["num_img_tokens"][0]) == ours.num_tokens


@pytest.mark.parametrize("seed", range(20))
def test_uint8_antialiased_resize_equals_torchvisions(seed):
    require_module("torchvision")
    from torchvision.transforms.v2 import functional as tvF

    rng = np.random.default_rng(seed)
    H, W, h, w = (int(v) for v in rng.integers(1, 700, 4))
    pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    expected = tvF.resize(torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), [h, w]).permute(1, 2, 0).numpy()
    assert np.array_equal(resize_bilinear_antialias(pixels, w, h), expected)


# ---------------------------------------------------------------- log-mel features


@pytest.mark.parametrize("length", [400, 401, 5000, 16000 * 2 + 77])
def test_feature_extractor_on_random_sound(length):
    rng = np.random.default_rng(length)
    samples = (rng.standard_normal(length) * rng.uniform(0.01, 0.5)).astype(np.float32)
    samples[: length // 5] = 0  # silence: log(max(0, 1)) = 0 on both sides
    extractor = transformers.Phi4MultimodalFeatureExtractor()
    theirs = extractor(samples, sampling_rate=16000, return_tensors="pt")["audio_input_features"][0].numpy()
    ours = log_mel(samples)
    assert ours.shape == theirs.shape
    assert np.all(np.abs(ours - theirs) <= 2.5e-7 * np.abs(theirs))  # at most one float32 ulp


# ---------------------------------------------------------------- the encoders


@pytest.mark.parametrize("hidden, heads, layers, padded_cols, padded_rows", [
    (32, 2, 3, 0, 0), (48, 4, 2, 10, 0), (24, 3, 4, 0, 21), (16, 1, 2, 7, 3),
])
def test_siglip_against_transformers(hidden, heads, layers, padded_cols, padded_rows):
    """The tower's hidden_states[-2] for a global view and padded crops (the masked
    patches are keys nobody attends to, and positions stretch over the picture)."""
    from transformers import Phi4MultimodalVisionConfig, Phi4MultimodalVisionModel

    config = Phi4MultimodalVisionConfig(hidden_size=hidden, intermediate_size=hidden + 8, num_hidden_layers=layers,
                                        num_attention_heads=heads, attn_implementation="eager")
    tower = Phi4MultimodalVisionModel(config).eval()
    randomize(tower, seed=hidden)
    rng = np.random.default_rng(hidden)
    pixels = rng.uniform(-1, 1, (3, 3, 448, 448)).astype(np.float32)
    masks = np.ones((3, 32, 32), bool)
    if padded_cols:
        masks[1:, :, 32 - padded_cols:] = False
    if padded_rows:
        masks[2, 32 - padded_rows:, :] = False
    with torch.no_grad():
        expected = tower(torch.from_numpy(pixels), patch_attention_mask=torch.from_numpy(masks),
                         output_hidden_states=True).hidden_states[-2].numpy()
    ours = siglip_tower(SiglipConfig(hidden_size=hidden, intermediate_size=hidden + 8, num_hidden_layers=layers,
                                     num_attention_heads=heads),
                        to_numpy_weights(tower, "model.embed_tokens_extend.image_embed.img_processor."), pixels, masks)
    assert np.abs(ours - expected).max() <= ATOL_STATES


def conformer_pair(hidden, heads, blocks, channels, seed, bf16=False):
    from transformers import Phi4MultimodalAudioConfig, Phi4MultimodalAudioModel

    config = Phi4MultimodalAudioConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=hidden + 16,
                                       num_blocks=blocks, nemo_conv_channels=channels, ext_pw_out_channel=hidden,
                                       depthwise_separable_out_channel=hidden, bias_max_distance=500,
                                       attn_implementation="eager")
    encoder = Phi4MultimodalAudioModel(config).eval()
    randomize(encoder, seed)
    if bf16:
        bf16_values(encoder)
    ours = ConformerConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=hidden + 16,
                           num_blocks=blocks, nemo_conv_channels=channels)
    names = {"feed_forward_in.gate_up_proj": "feed_forward_in.net.0.linear", "feed_forward_in.down_proj": "feed_forward_in.net.2",
             "feed_forward_out.gate_up_proj": "feed_forward_out.net.0.linear", "feed_forward_out.down_proj": "feed_forward_out.net.2",
             "self_attn.q_proj": "self_attn.linear_q", "self_attn.k_proj": "self_attn.linear_k",
             "self_attn.v_proj": "self_attn.linear_v", "self_attn.o_proj": "self_attn.linear_out"}
    weights = {}
    for name, value in to_numpy_weights(encoder, "").items():
        for new, old in names.items():
            name = name.replace(new, old)
        weights["model.embed_tokens_extend.audio_embed.encoder." + name] = value
    return encoder, ours, weights


@pytest.mark.parametrize("hidden, heads, blocks, channels, frames", [
    (32, 2, 2, 8, 301), (48, 4, 1, 16, 33), (16, 2, 2, 4, 4321),  # 541 encoder frames: two chunks of 500
])
def test_conformer_against_transformers(hidden, heads, blocks, channels, frames):
    encoder, config, weights = conformer_pair(hidden, heads, blocks, channels, seed=frames)
    features = np.random.default_rng(frames).uniform(0, 25, (frames, 80)).astype(np.float32)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(features)[None], None)[0].numpy()
    ours = conformer_encoder(config, weights, features)
    assert ours.shape == expected.shape == (-(-frames // 8), hidden)
    assert np.abs(ours - expected).max() <= ATOL_STATES


# ---------------------------------------------------------------- bf16 x bf16 against transformers in bf16


def bf16_values(module) -> None:
    """Round a module's weights to bf16 values (still float32), so both sides start from them."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def bf16_x_bf16(weights: dict) -> dict:
    """The matrices as load(quant="bf16", encoder_activations="bf16") makes them (the
    Conformer's 1x1 convolutions among them)."""
    from minislm.kernels import Bf16Weight
    from minislm.multimodal.config import encoder_matrix
    from minislm.quantize import with_encoder_activations

    return with_encoder_activations({n: Bf16Weight(w) if encoder_matrix(n, w.shape) else w for n, w in weights.items()}, "bf16")


def test_bf16_siglip_against_transformers_in_bf16():
    from transformers import Phi4MultimodalVisionConfig, Phi4MultimodalVisionModel

    config = Phi4MultimodalVisionConfig(hidden_size=48, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                                        attn_implementation="eager")
    tower = Phi4MultimodalVisionModel(config).eval()
    randomize(tower, seed=48)
    bf16_values(tower)
    weights = bf16_x_bf16(to_numpy_weights(tower, "model.embed_tokens_extend.image_embed.img_processor."))
    tower = tower.to(torch.bfloat16)
    pixels = np.random.default_rng(48).uniform(-1, 1, (2, 3, 448, 448)).astype(np.float32)
    masks = np.ones((2, 32, 32), bool)
    masks[1, :, 20:] = False
    with torch.no_grad():
        expected = tower(torch.from_numpy(pixels).to(torch.bfloat16), patch_attention_mask=torch.from_numpy(masks),
                         output_hidden_states=True).hidden_states[-2].float().numpy()
    ours = siglip_tower(SiglipConfig(hidden_size=48, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4),
                        weights, pixels, masks)
    assert np.abs(ours - expected).max() <= RTOL_BF16_STATES * np.abs(expected).max()


def test_bf16_conformer_against_transformers_in_bf16():
    encoder, config, weights = conformer_pair(32, 2, 2, 8, seed=301, bf16=True)
    weights, encoder = bf16_x_bf16(weights), encoder.to(torch.bfloat16)
    features = np.random.default_rng(301).uniform(0, 25, (301, 80)).astype(np.float32)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(features)[None].to(torch.bfloat16), None)[0].float().numpy()
    ours = conformer_encoder(config, weights, features)
    assert np.abs(ours - expected).max() <= RTOL_BF16_STATES * np.abs(expected).max()
