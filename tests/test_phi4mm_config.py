"""Phi-4-multimodal's config.json in both layouts, and what is refused (one line each)."""

import copy
import json

import pytest

from conftest import PHI4MM_FIXTURE
from minislm.config import parse_config
from minislm.errors import MinislmError
from minislm.multimodal.config import ConformerConfig, SiglipConfig, transformers_to_hub
from minislm.bench.random_checkpoint import PHI4_MULTIMODAL

HUB = json.loads((PHI4MM_FIXTURE / "config.json").read_text())
CONVERTED = json.loads((PHI4MM_FIXTURE / "converted" / "config.json").read_text())


def test_the_real_hub_config_gives_the_real_sizes():
    config = parse_config(PHI4_MULTIMODAL)
    mm = config.phi4mm
    assert mm.vision == SiglipConfig() and mm.vision.blocks_used == 26 and mm.vision.head_dim == 72
    assert mm.audio == ConformerConfig() and mm.audio.subsampled_bins == 10 and mm.audio.stages == 3
    assert (mm.vision_lora.rank, mm.vision_lora.scale, mm.speech_lora.rank, mm.speech_lora.scale) == (256, 2.0, 320, 2.0)
    assert (mm.image_token_id, mm.audio_token_id, mm.max_crops) == (200010, 200011, 36)
    assert config.rope.rotary_dim == 96 and config.tie_word_embeddings


def test_both_fixture_layouts_agree():
    hub, converted = parse_config(HUB).phi4mm, parse_config(CONVERTED).phi4mm
    assert hub.vision == converted.vision and hub.audio == converted.audio
    assert (converted.image_token_id, converted.audio_token_id) == (1001, 1002)
    assert converted.audio.bias_max_distance == 500  # the conversion carries the hub's 500


def test_transformers_default_bias_distance_is_1000():
    raw = copy.deepcopy(CONVERTED)
    del raw["audio_config"]["bias_max_distance"]
    assert parse_config(raw).phi4mm.audio.bias_max_distance == 1000


def hub_with(change):
    raw = copy.deepcopy(HUB)
    change(raw)
    return raw


@pytest.mark.parametrize("change, message", [
    (lambda r: r["audio_processor"]["config"].update(chunk_size=18), "chunk_size 18 .* not supported"),
    (lambda r: r["audio_processor"]["config"].update(activation="relu"), "activation 'relu' is not supported"),
    (lambda r: r["audio_processor"]["config"].update(ext_pw_out_channel=16), "ext_pw_out_channel must equal the width 32"),
    (lambda r: r["audio_processor"]["config"].update(time_reduction=6), "time_reduction must be a power of two"),
    (lambda r: r.pop("audio_processor"), "needs audio_processor.config"),
    (lambda r: r.pop("embd_layer"), "needs embd_layer.image_embd_layer"),
    (lambda r: r["embd_layer"]["image_embd_layer"].update(crop_size=336), "crop_size 336 is not supported"),
    (lambda r: r["embd_layer"]["image_embd_layer"].update(hd_transform_order="glb_sub"), "hd_transform_order"),
    (lambda r: r["vision_lora"].update(layer="layers.*self_attn.qkv_proj"), "does not select the four decoder matrices"),
    (lambda r: r["speech_lora"].update(lora_alpha=0), "speech_lora.lora_alpha must be a positive number"),
    (lambda r: r["img_processor"].update(layer_idx=9), "feature layer 9 is not one of"),
    (lambda r: r["img_processor"].update(num_attention_heads=5), "not divisible by 5 heads"),
])
def test_bad_hub_configs_are_refused(change, message):
    with pytest.raises(MinislmError, match=message) as info:
        parse_config(hub_with(change))
    assert "\n" not in str(info.value)


def test_names_map_back_to_the_hubs():
    assert transformers_to_hub("model.embed_tokens_extend.image_embed.img_projection_up.weight") == \
        "model.embed_tokens_extend.image_embed.img_projection.0.weight"
    assert transformers_to_hub("model.embed_tokens_extend.audio_embed.encoder.encoders.3.self_attn.o_proj.bias") == \
        "model.embed_tokens_extend.audio_embed.encoder.encoders.3.self_attn.linear_out.bias"
    assert transformers_to_hub("model.embed_tokens_extend.audio_embed.encoder.encoders.0.feed_forward_in.gate_up_proj.weight") \
        == "model.embed_tokens_extend.audio_embed.encoder.encoders.0.feed_forward_in.net.0.linear.weight"
    assert transformers_to_hub("model.layers.0.self_attn.qkv_proj.weight") == "model.layers.0.self_attn.qkv_proj.weight"
