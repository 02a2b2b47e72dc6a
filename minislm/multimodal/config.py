"""The multimodal side of a Phi-4-multimodal config.json, read once and checked.

Phi-4-multimodal-instruct exists in two layouts, and minislm reads both:

* the hub's own files (`model_type: "phi4mm"`, written for its remote code): the
  SigLIP tower has no sizes in config.json (the remote code hard-codes SigLIP-so400m),
  the Conformer's sizes sit in `audio_processor.config` under their NeMo-era names
  (`attention_dim`, `linear_units`, `nemo_conv_settings.conv_channels`,
  `relative_attention_bias_args.t5_bias_max_distance`), and the two LoRA adapters
  are described by `vision_lora` / `speech_lora` and live inside the checkpoint;
* transformers' conversion (`model_type: "phi4_multimodal"`, written by
  convert_phi4_multimodal_weights_to_hf.py): `vision_config` and `audio_config`
  with transformers' names, the adapters in `vision-lora/` and `speech-lora/` folders.

minislm's names for the tensors are the hub's (docs/multimodal.md has the table);
a converted folder is renamed back when it is read (`transformers_to_hub`).

minislm's tiny test checkpoints shrink the tower with keys under `img_processor`
(the remote code reads only `layer_idx` there; hub files have `"img_processor": null`).
"""

import re
from dataclasses import dataclass

from ..errors import MinislmError
from ..vision.config import vit_block_shapes

MODEL_TYPES = ("phi4mm", "phi4_multimodal")  # the hub's remote-code layout, transformers' own

# The hub remote code's placeholder ids (modeling_phi4mm.py: _IMAGE_SPECIAL_TOKEN_ID,
# _AUDIO_SPECIAL_TOKEN_ID): '<|endoftext10|>' and '<|endoftext11|>'.
IMAGE_TOKEN = "<|endoftext10|>"
AUDIO_TOKEN = "<|endoftext11|>"
IMAGE_TOKEN_ID = 200010
AUDIO_TOKEN_ID = 200011

# The crop geometry the token arithmetic hard-codes (transformers'
# _get_num_image_tokens: 256 = 16 x 16 pooled cells, 16 row separators).
CROP_SIZE = 448
PATCH_SIZE = 14
DEFAULT_MAX_CROPS = 36  # preprocessor_config.json's dynamic_hd

EXTEND = "model.embed_tokens_extend."
IMAGE_EMBED = EXTEND + "image_embed."
TOWER = IMAGE_EMBED + "img_processor."
AUDIO_EMBED = EXTEND + "audio_embed."
CONFORMER = AUDIO_EMBED + "encoder."

# The decoder matrices the adapters change (every layer), as in the hub's
# `vision_lora.layer` / `speech_lora.layer` patterns and transformers' conversion.
LORA_MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class SiglipConfig:
    """The image tower: SigLIP-so400m-patch14 at 448 pixels (transformers'
    Phi4MultimodalVisionConfig defaults, which the hub's remote code hard-codes)."""

    hidden_size: int = 1152  # C
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    feature_layer: int = -2  # which hidden state (0 = embeddings) the projector reads
    image_size: int = CROP_SIZE
    patch_size: int = PATCH_SIZE

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size  # 32

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def blocks_used(self) -> int:
        """hidden_states[feature_layer] is the output of this many blocks: 26 of 27."""
        n = self.num_hidden_layers
        return self.feature_layer if self.feature_layer >= 0 else n + 1 + self.feature_layer


@dataclass(frozen=True)
class ConformerConfig:
    """The speech encoder (the hub's `audio_processor.config`, transformers'
    Phi4MultimodalAudioConfig). Defaults are the real model's."""

    hidden_size: int = 1024  # D, the hub's attention_dim
    num_attention_heads: int = 16
    intermediate_size: int = 1536  # the hub's linear_units
    num_blocks: int = 24
    nemo_conv_channels: int = 1024  # the subsampling's channels
    kernel_size: int = 3  # the depthwise (causal) convolution
    time_reduction: int = 8  # three stride-2 convolutions
    bias_max_distance: int = 500  # the relative attention bias table holds 2 x this
    input_size: int = 80  # mel bins
    chunk_size: int = -1  # -1: no streaming chunks, every frame sees every frame
    left_chunk: int = 18

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def subsampled_bins(self) -> int:
        """Mel bins left after the strided convolutions: 80 -> 40 -> 20 -> 10."""
        size = self.input_size
        for _ in range(self.stages):
            size = (size - 1) // 2 + 1
        return size

    @property
    def stages(self) -> int:
        return self.time_reduction.bit_length() - 1  # log2(8) = 3


@dataclass(frozen=True)
class LoraShape:
    """One adapter as config.json (hub) or adapter_config.json (transformers) describes it."""

    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Phi4MMConfig:
    """What Phi-4-multimodal adds to the shared ModelConfig (its decoder is Phi-4-mini)."""

    layout: str  # "phi4mm" (hub) or "phi4_multimodal" (transformers)
    vision: SiglipConfig
    audio: ConformerConfig
    image_token_id: int
    audio_token_id: int
    max_crops: int = DEFAULT_MAX_CROPS
    vision_lora: LoraShape | None = None  # the hub layout's; a converted folder has adapter folders
    speech_lora: LoraShape | None = None


def integer(raw: dict, key: str, source: str, default=None, minimum: int = 1) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MinislmError(f"{source}: '{key}' must be an integer >= {minimum}, got {value!r:.80}")
    return value


def expect(raw: dict, key: str, allowed, source: str) -> None:
    """A setting the real model has and minislm implements only that way."""
    value = raw.get(key, allowed[0])
    if value not in allowed:
        raise MinislmError(f"{source}: {key} {value!r:.80} is not supported (only {', '.join(map(repr, allowed))})")


def parse_phi4mm(raw: dict, source: str, preprocessor: dict | None = None) -> Phi4MMConfig:
    """The encoders, placeholder ids and adapters of either layout."""
    max_crops = integer(preprocessor or {}, "dynamic_hd", f"{source} (preprocessor_config.json)", DEFAULT_MAX_CROPS)
    if raw.get("model_type") == "phi4mm":
        return parse_hub(raw, source, max_crops)
    return parse_transformers(raw, source, max_crops)


def parse_hub(raw: dict, source: str, max_crops: int) -> Phi4MMConfig:
    embd = raw.get("embd_layer")
    if not isinstance(embd, dict) or not isinstance(embd.get("image_embd_layer"), dict) \
            or not isinstance(embd.get("audio_embd_layer"), dict):
        raise MinislmError(f"{source}: a phi4mm config needs embd_layer.image_embd_layer and embd_layer.audio_embd_layer")
    image = embd["image_embd_layer"]
    for key, allowed in (("crop_size", (CROP_SIZE,)), ("hd_transform_order", ("sub_glb",)),
                         ("image_token_compression_cls", ("avg_pool_2d",)), ("projection_cls", ("mlp",)),
                         ("use_hd_transform", (True,)), ("with_learnable_separator", (True,))):
        expect(image, key, allowed, f"{source}: embd_layer.image_embd_layer")
    audio_layer = embd["audio_embd_layer"]
    expect(audio_layer, "projection_cls", ("mlp",), f"{source}: embd_layer.audio_embd_layer")
    for key in ("use_qformer", "use_conv_downsample"):
        expect(audio_layer, key, (False,), f"{source}: embd_layer.audio_embd_layer")
    expect(audio_layer, "downsample_rate", (1,), f"{source}: embd_layer.audio_embd_layer")

    tower = raw.get("img_processor") or {}  # null in hub files: SigLIP-so400m's sizes
    if not isinstance(tower, dict):
        raise MinislmError(f"{source}: img_processor must be an object or null")
    vision = siglip(tower, source + ": img_processor", tower.get("layer_idx", -2))
    processor = (raw.get("audio_processor") or {}).get("config")
    if not isinstance(processor, dict):
        raise MinislmError(f"{source}: a phi4mm config needs audio_processor.config (the speech encoder's sizes)")
    where = f"{source}: audio_processor.config"
    audio = conformer(
        {
            "hidden_size": processor.get("attention_dim"),
            "num_attention_heads": processor.get("attention_heads"),
            "intermediate_size": processor.get("linear_units"),
            "num_blocks": processor.get("num_blocks"),
            "nemo_conv_channels": (processor.get("nemo_conv_settings") or {}).get("conv_channels"),
            "bias_max_distance": (processor.get("relative_attention_bias_args") or {}).get("t5_bias_max_distance"),
            "ext_pw_out_channel": processor.get("ext_pw_out_channel"),
            "depthwise_separable_out_channel": processor.get("depthwise_seperable_out_channel"),  # sic, the hub's key
            **{k: processor.get(k) for k in ("kernel_size", "time_reduction", "input_size", "chunk_size", "left_chunk",
                                             "depthwise_multiplier", "activation", "conv_activation", "conv_glu_type")},
        },
        where,
    )
    expect(processor, "input_layer", ("nemo_conv",), where)
    expect(processor.get("relative_attention_bias_args") or {}, "type", ("t5",), where + ".relative_attention_bias_args")
    for key in ("batch_norm", "causal", "bias_in_glu"):  # as in the real config (see the converter's comments)
        expect(processor, key, {"batch_norm": (False,), "causal": (True,), "bias_in_glu": (True,)}[key], where)
    return Phi4MMConfig("phi4mm", vision, audio, IMAGE_TOKEN_ID, AUDIO_TOKEN_ID, max_crops,
                        hub_lora(raw, "vision_lora", source), hub_lora(raw, "speech_lora", source))


def parse_transformers(raw: dict, source: str, max_crops: int) -> Phi4MMConfig:
    vision_raw, audio_raw = raw.get("vision_config") or {}, raw.get("audio_config") or {}
    if not isinstance(vision_raw, dict) or not isinstance(audio_raw, dict):
        raise MinislmError(f"{source}: vision_config and audio_config must be objects")
    where = f"{source}: vision_config"
    for key, allowed in (("image_size", (CROP_SIZE,)), ("crop_size", (CROP_SIZE,)), ("patch_size", (PATCH_SIZE,)),
                         ("num_channels", (3,)), ("hidden_act", ("gelu_pytorch_tanh",))):
        expect(vision_raw, key, allowed, where)
    eps = vision_raw.get("layer_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise MinislmError(f"{where}: layer_norm_eps must be a positive number, got {eps!r:.40}")
    vision = siglip(vision_raw, where, vision_raw.get("feature_layer", -2), float(eps))
    where = f"{source}: audio_config"
    expect(audio_raw, "downsample_rate", (1,), where)
    expect(audio_raw, "nemo_activation", ("relu",), where)
    expect(audio_raw, "bias_symmetric", (False,), where)
    audio = conformer({k: audio_raw.get(k) for k in (
        "hidden_size", "num_attention_heads", "intermediate_size", "num_blocks", "nemo_conv_channels", "bias_max_distance",
        "ext_pw_out_channel", "depthwise_separable_out_channel", "kernel_size", "time_reduction", "input_size",
        "chunk_size", "left_chunk", "depthwise_multiplier", "activation", "conv_activation", "conv_glu_type")}, where,
        bias_default=1000)  # transformers' default; the real model's converted config says 500
    return Phi4MMConfig(
        "phi4_multimodal", vision, audio,
        integer(vision_raw, "image_token_id", f"{source}: vision_config", IMAGE_TOKEN_ID, minimum=0),
        integer(audio_raw, "audio_token_id", where, AUDIO_TOKEN_ID, minimum=0), max_crops,
    )


def siglip(raw: dict, where: str, feature_layer, layer_norm_eps: float = 1e-6) -> SiglipConfig:
    """SigLIP's sizes (the real model's where absent) and which hidden state is read."""
    sizes = {k: integer(raw, k, where, getattr(SiglipConfig, k))
             for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")}
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise MinislmError(f"{where}: hidden_size {sizes['hidden_size']} is not divisible by "
                           f"{sizes['num_attention_heads']} heads")
    layers = sizes["num_hidden_layers"]
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int) or not -layers <= feature_layer <= layers:
        raise MinislmError(f"{where}: the feature layer {feature_layer!r:.20} is not one of the tower's "
                           f"{layers + 1} hidden states (or is the embeddings)")
    return SiglipConfig(**sizes, layer_norm_eps=layer_norm_eps, feature_layer=feature_layer)


def conformer(values: dict, where: str, bias_default: int = 500) -> ConformerConfig:
    """A ConformerConfig from already-renamed keys (None = the real model's value)."""
    for key in ("activation", "conv_activation", "conv_glu_type"):
        if values.get(key) not in (None, "swish"):
            raise MinislmError(f"{where}: {key} {values[key]!r:.40} is not supported (only 'swish')")
    if values.get("depthwise_multiplier") not in (None, 1):
        raise MinislmError(f"{where}: depthwise_multiplier must be 1, got {values['depthwise_multiplier']!r:.40}")
    sizes = {}
    defaults = {**{k: getattr(ConformerConfig, k) for k in ConformerConfig.__dataclass_fields__},
                "bias_max_distance": bias_default}
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_blocks", "nemo_conv_channels",
                "kernel_size", "time_reduction", "bias_max_distance", "input_size", "left_chunk"):
        value = values.get(key)
        sizes[key] = integer({key: defaults[key] if value is None else value}, key, where)
    chunk = values.get("chunk_size", -1)
    if chunk not in (None, -1):
        raise MinislmError(f"{where}: chunk_size {chunk!r:.40} (streaming chunks) is not supported; the model uses -1")
    D = sizes["hidden_size"]
    for key in ("ext_pw_out_channel", "depthwise_separable_out_channel"):
        if values.get(key) not in (None, D):
            raise MinislmError(f"{where}: {key} must equal the width {D} (the residual adds it), got {values[key]!r:.40}")
    if D % sizes["num_attention_heads"]:
        raise MinislmError(f"{where}: the width {D} is not divisible by {sizes['num_attention_heads']} heads")
    if sizes["time_reduction"] & (sizes["time_reduction"] - 1) or sizes["time_reduction"] < 2:
        raise MinislmError(f"{where}: time_reduction must be a power of two >= 2, got {sizes['time_reduction']}")
    return ConformerConfig(**sizes)


def hub_lora(raw: dict, key: str, source: str) -> LoraShape | None:
    """`vision_lora` / `speech_lora` of a hub config.json: {"r", "lora_alpha", "layer", "dp"}."""
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MinislmError(f"{source}: '{key}' must be an object")
    rank = integer(value, "r", f"{source}: {key}")
    alpha = value.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise MinislmError(f"{source}: {key}.lora_alpha must be a positive number, got {alpha!r:.40}")
    layer = value.get("layer")
    if layer is not None and not all(re.search(layer, f"model.layers.0.{m}") for m in LORA_MODULES):
        raise MinislmError(f"{source}: {key}.layer {layer!r:.80} does not select the four decoder matrices minislm adapts")
    return LoraShape(rank, float(alpha))


# ---------------------------------------------------------------- tensor names

# 2-D tensors of the encoders that are tables read by index, not matrices multiplied:
# they stay float32 when the matrices are packed (bf16)
ENCODER_TABLES = ("embeddings.position_embedding.weight", "relative_attention_bias_layer.bias_values.weight")


def encoder_matrix(name: str, shape: tuple) -> bool:
    """A matrix of the encoders or projectors that `linear` multiplies by (packable)."""
    return len(shape) == 2 and name.endswith(".weight") and not name.endswith(ENCODER_TABLES)


def pointwise_kernel(name: str, shape: tuple) -> bool:
    """A 1x1 convolution's kernel in the Conformer, (out, in, 1) or (out, in, 1, 1): a
    matrix over the channels in all but shape (not the depthwise (C, 1, k) ones)."""
    return (name.startswith(CONFORMER) and name.endswith(".weight") and len(shape) > 2 and shape[1] > 1
            and all(d == 1 for d in shape[2:]))



def phi4mm_shapes(mm: Phi4MMConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every encoder tensor of the checkpoint (hub names), with its shape. All the
    tower's blocks, `post_layernorm` and the attention-pooling `head` are in the file,
    although the features come from an earlier block and the head is never used."""
    shapes = {}
    shapes.update(siglip_shapes(mm.vision))
    C, D = mm.vision.hidden_size, text_hidden
    shapes.update({
        IMAGE_EMBED + "glb_GN": (1, 1, C),
        IMAGE_EMBED + "sub_GN": (1, 1, 1, C),
        IMAGE_EMBED + "img_projection.0.weight": (D, C),
        IMAGE_EMBED + "img_projection.0.bias": (D,),
        IMAGE_EMBED + "img_projection.2.weight": (D, D),
        IMAGE_EMBED + "img_projection.2.bias": (D,),
    })
    shapes.update(conformer_shapes(mm.audio))
    A = mm.audio.hidden_size
    for head in ("speech", "vision"):
        p = f"{AUDIO_EMBED}audio_projection.{head}."
        shapes.update({p + "0.weight": (D, A), p + "0.bias": (D,), p + "2.weight": (D, D), p + "2.bias": (D,)})
    return shapes


def siglip_shapes(v: SiglipConfig) -> dict[str, tuple[int, ...]]:
    C, F, P = v.hidden_size, v.intermediate_size, v.patch_size
    shapes = {
        TOWER + "embeddings.patch_embedding.weight": (C, 3, P, P),
        TOWER + "embeddings.patch_embedding.bias": (C,),
        TOWER + "embeddings.position_embedding.weight": (v.patches_per_side**2, C),
        TOWER + "post_layernorm.weight": (C,),
        TOWER + "post_layernorm.bias": (C,),
        TOWER + "head.probe": (1, 1, C),
        TOWER + "head.attention.in_proj_weight": (3 * C, C),
        TOWER + "head.attention.in_proj_bias": (3 * C,),
        TOWER + "head.attention.out_proj.weight": (C, C),
        TOWER + "head.attention.out_proj.bias": (C,),
        TOWER + "head.layernorm.weight": (C,),
        TOWER + "head.layernorm.bias": (C,),
        TOWER + "head.mlp.fc1.weight": (F, C),
        TOWER + "head.mlp.fc1.bias": (F,),
        TOWER + "head.mlp.fc2.weight": (C, F),
        TOWER + "head.mlp.fc2.bias": (C,),
    }
    for i in range(v.num_hidden_layers):
        shapes.update(vit_block_shapes(f"{TOWER}encoder.layers.{i}.", C, F))
    return shapes


def conformer_shapes(a: ConformerConfig) -> dict[str, tuple[int, ...]]:
    D, F, Cc, K, H = a.hidden_size, a.intermediate_size, a.nemo_conv_channels, a.kernel_size, a.num_attention_heads
    p = CONFORMER
    shapes = {
        p + "encoder_embedding.global_mean": (a.input_size,),
        p + "encoder_embedding.global_invstd": (a.input_size,),
        p + "embed.conv.0.weight": (Cc, 1, 3, 3),
        p + "embed.conv.0.bias": (Cc,),
        p + "embed.out.weight": (D, Cc * a.subsampled_bins),
        p + "embed.out.bias": (D,),
        p + "relative_attention_bias_layer.bias_values.weight": (2 * a.bias_max_distance, H),
    }
    for stage in range(1, a.stages):  # conv.2/conv.3, conv.5/conv.6: depthwise 3x3 stride 2, then pointwise
        dw, pw = 3 * stage - 1, 3 * stage
        shapes.update({f"{p}embed.conv.{dw}.weight": (Cc, 1, 3, 3), f"{p}embed.conv.{dw}.bias": (Cc,),
                       f"{p}embed.conv.{pw}.weight": (Cc, Cc, 1, 1), f"{p}embed.conv.{pw}.bias": (Cc,)})
    for i in range(a.num_blocks):
        b = f"{p}encoders.{i}."
        for ff in ("feed_forward_in", "feed_forward_out"):
            shapes.update({
                f"{b}{ff}.layer_norm.weight": (D,), f"{b}{ff}.layer_norm.bias": (D,),
                f"{b}{ff}.net.0.linear.weight": (2 * F, D), f"{b}{ff}.net.0.linear.bias": (2 * F,),
                f"{b}{ff}.net.2.weight": (D, F), f"{b}{ff}.net.2.bias": (D,),
            })
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            shapes[f"{b}self_attn.{name}.weight"] = (D, D)
            shapes[f"{b}self_attn.{name}.bias"] = (D,)
        shapes.update({
            b + "conv.layer_norm.weight": (D,), b + "conv.layer_norm.bias": (D,),
            b + "conv.glu.ext_pw_conv_1d.weight": (2 * D, D, 1), b + "conv.glu.ext_pw_conv_1d.bias": (2 * D,),
            b + "conv.glu.b1": (1, D, 1), b + "conv.glu.b2": (1, D, 1),
            b + "conv.dw_sep_conv_1d.dw_conv.weight": (D, 1, K), b + "conv.dw_sep_conv_1d.dw_conv.bias": (D,),
            b + "conv.dw_sep_conv_1d.pw_conv.weight": (D, D, 1), b + "conv.dw_sep_conv_1d.pw_conv.bias": (D,),
            b + "conv.ext_pw_conv_1d.weight": (D, D, 1), b + "conv.ext_pw_conv_1d.bias": (D,),
            b + "layer_norm_att.weight": (D,), b + "layer_norm_att.bias": (D,),
            b + "layer_norm.weight": (D,), b + "layer_norm.bias": (D,),
        })
    return shapes


# transformers' names -> the hub's: the inverse of STATE_DICT_MAPPING in transformers'
# convert_phi4_multimodal_weights_to_hf.py (tools/make_phi4mm_fixtures.py checks that
# converting a hub checkpoint with that script and renaming back gives every name again).
TO_HUB = [
    (r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.gate_up_proj",
     r"\1.net.0.linear"),
    (r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.feed_forward_(?:in|out))\.down_proj", r"\1.net.2"),
    (r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.self_attn)\.(q|k|v)_proj", r"\1.linear_\2"),
    (r"^(model\.embed_tokens_extend\.audio_embed\.encoder\.encoders\.\d+\.self_attn)\.o_proj", r"\1.linear_out"),
    (r"^model\.embed_tokens_extend\.image_embed\.img_projection_up", "model.embed_tokens_extend.image_embed.img_projection.0"),
    (r"^model\.embed_tokens_extend\.image_embed\.img_projection_down",
     "model.embed_tokens_extend.image_embed.img_projection.2"),
    (r"^model\.embed_tokens_extend\.image_embed\.global_img_feature_extensor", "model.embed_tokens_extend.image_embed.glb_GN"),
    (r"^model\.embed_tokens_extend\.image_embed\.sub_img_feature_extensor", "model.embed_tokens_extend.image_embed.sub_GN"),
    (r"^model\.embed_tokens_extend\.audio_embed\.up_proj_for_speech",
     "model.embed_tokens_extend.audio_embed.audio_projection.speech.0"),
    (r"^model\.embed_tokens_extend\.audio_embed\.down_proj_for_speech",
     "model.embed_tokens_extend.audio_embed.audio_projection.speech.2"),
    (r"^model\.embed_tokens_extend\.audio_embed\.up_proj_for_vision_speech",
     "model.embed_tokens_extend.audio_embed.audio_projection.vision.0"),
    (r"^model\.embed_tokens_extend\.audio_embed\.down_proj_for_vision_speech",
     "model.embed_tokens_extend.audio_embed.audio_projection.vision.2"),
]


def transformers_to_hub(name: str) -> str:
    """A tensor name of a converted checkpoint -> the hub's name for it (first match wins)."""
    for pattern, replacement in TO_HUB:
        new, n = re.subn(pattern, replacement, name)
        if n:
            return new
    return name
