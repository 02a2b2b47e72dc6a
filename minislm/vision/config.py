"""The image side of a phi3_v config.json, validated once.

Phi-3-vision's config.json describes its image encoder in two small dicts:

    "embd_layer":    {"embedding_cls": "image", "hd_transform_order": "sub_glb",
                      "projection_cls": "mlp", "use_hd_transform": true,
                      "with_learnable_separator": true}
    "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                      "name": "clip_vision_model", "num_img_tokens": 144}

The CLIP tower's own sizes are not in the file: the reference code hard-codes
ViT-L/14-336 (24 blocks, 16 heads, MLP 4096), and so do we. Two optional keys say
which hidden state feeds the projector (`layer_idx`, default -2: the penultimate
block's output; `type_feature`, default "patch": drop the class token).

minislm's small test checkpoints also set `num_hidden_layers`, `intermediate_size`
and `num_attention_heads` under img_processor to shrink the tower; hub files never
do. preprocessor_config.json gives the default `num_crops`.
"""

from dataclasses import dataclass

from ..errors import MinislmError

# The crops' geometry, fixed by CLIP ViT-L/14-336 and the projector (minislm/vision/image.py cuts them).
CROP_SIZE = 336  # CLIP ViT-L/14-336's input: 24 x 24 patches of 14 x 14 pixels
TOKENS_PER_CROP = 144  # 24 x 24 patches merged 2 x 2 -> 12 x 12
CELLS_PER_SIDE = 12  # each row of 12 merged cells ends with a separator token
MAX_NUM_CROPS = 16
DEFAULT_NUM_CROPS = 16  # Phi-3-vision's preprocessor_config.json; Phi-3.5-vision asks for 4 or 16

CLIP_MODEL_NAME = "openai/clip-vit-large-patch14-336"
# What the reference code accepts; anything else it refuses too.
EXPECTED_EMBD_LAYER = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT-L/14-336 and how its output becomes image tokens."""

    hidden_size: int = 1024  # C: CLIP's width (the reference's image_dim_out)
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = CROP_SIZE  # 336
    patch_size: int = 14  # 336 / 14 = 24 patches a side
    layer_norm_eps: float = 1e-5
    layer_idx: int = -2  # which of the tower's hidden states (0 = embeddings) the projector reads
    num_crops: int = DEFAULT_NUM_CROPS  # the default for images of this model (--num-crops overrides)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patches plus the class token: 24 * 24 + 1 = 577."""
        return self.patches_per_side**2 + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def blocks_used(self) -> int:
        """How many blocks run: hidden_states[layer_idx] is the output of this many
        (hidden_states[0] being the embeddings). 23 of 24 for Phi-3-vision."""
        return self.layer_idx if self.layer_idx >= 0 else self.num_hidden_layers + 1 + self.layer_idx


def parse_vision(raw: dict, source: str, preprocessor: dict | None = None) -> VisionConfig:
    """The vision part of a phi3_v config.json (and preprocessor_config.json's num_crops)."""
    embd = raw.get("embd_layer")
    if not isinstance(embd, dict):
        raise MinislmError(f"{source}: a phi3_v config needs an 'embd_layer' object")
    for key, expected in EXPECTED_EMBD_LAYER.items():
        if embd.get(key, expected) != expected:
            raise MinislmError(f"{source}: embd_layer.{key} is {embd.get(key)!r}; only {expected!r} is supported")
    proc = raw.get("img_processor")
    if not isinstance(proc, dict):
        raise MinislmError(f"{source}: a phi3_v config needs an 'img_processor' object")
    if proc.get("name", "clip_vision_model") != "clip_vision_model" or proc.get("model_name", CLIP_MODEL_NAME) != CLIP_MODEL_NAME:
        raise MinislmError(f"{source}: img_processor must be CLIP ({CLIP_MODEL_NAME}), got {proc.get('model_name')!r}")
    if proc.get("image_dim_out", 1024) != 1024:
        raise MinislmError(f"{source}: img_processor.image_dim_out is {proc['image_dim_out']}; CLIP ViT-L/14 gives 1024")
    if proc.get("num_img_tokens", TOKENS_PER_CROP) != TOKENS_PER_CROP:
        raise MinislmError(f"{source}: img_processor.num_img_tokens must be {TOKENS_PER_CROP}, got {proc['num_img_tokens']!r}")
    if proc.get("type_feature", "patch") != "patch":
        raise MinislmError(f"{source}: img_processor.type_feature {proc['type_feature']!r} is not supported (only 'patch')")

    sizes = {}
    for key in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "layer_idx"):
        value = proc.get(key, getattr(VisionConfig, key))
        if not isinstance(value, int) or isinstance(value, bool):
            raise MinislmError(f"{source}: img_processor.{key} must be an integer, got {value!r}")
        sizes[key] = value
    layers = sizes["num_hidden_layers"]
    if layers < 1 or sizes["intermediate_size"] < 1 or sizes["num_attention_heads"] < 1:
        raise MinislmError(f"{source}: img_processor sizes must be positive, got {sizes}")
    if 1024 % sizes["num_attention_heads"]:
        raise MinislmError(f"{source}: img_processor.num_attention_heads must divide 1024, got {sizes['num_attention_heads']}")
    if not -(layers + 1) <= sizes["layer_idx"] <= layers:
        raise MinislmError(f"{source}: img_processor.layer_idx {sizes['layer_idx']} is not one of the {layers + 1} hidden states")
    return VisionConfig(**sizes, num_crops=preprocessor_num_crops(preprocessor, source))


def preprocessor_num_crops(preprocessor: dict | None, source: str) -> int:
    """preprocessor_config.json's num_crops (16 for Phi-3-vision), else 16."""
    value = (preprocessor or {}).get("num_crops", DEFAULT_NUM_CROPS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NUM_CROPS:
        raise MinislmError(f"{source}: preprocessor_config.json's num_crops must be 1..{MAX_NUM_CROPS}, got {value!r}")
    return value


# Where the image encoder's tensors live in a phi3_v checkpoint.
IMAGE_EMBED = "model.vision_embed_tokens."
VISION_MODEL = IMAGE_EMBED + "img_processor.vision_model."


def vision_shapes(vision: VisionConfig, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every image-side tensor of a phi3_v checkpoint, with its shape.

    All num_hidden_layers blocks and `post_layernorm` are in the file although only
    `blocks_used` of them run (the checkpoint is the whole CLIP model).
    """
    C, F, D = vision.hidden_size, vision.intermediate_size, text_hidden
    side, patch = vision.patches_per_side, vision.patch_size
    shapes = {
        IMAGE_EMBED + "glb_GN": (1, 1, 4 * C),
        IMAGE_EMBED + "sub_GN": (1, 1, 1, 4 * C),
        IMAGE_EMBED + "img_projection.0.weight": (D, 4 * C),
        IMAGE_EMBED + "img_projection.0.bias": (D,),
        IMAGE_EMBED + "img_projection.2.weight": (D, D),
        IMAGE_EMBED + "img_projection.2.bias": (D,),
        VISION_MODEL + "embeddings.class_embedding": (C,),
        VISION_MODEL + "embeddings.patch_embedding.weight": (C, 3, patch, patch),
        VISION_MODEL + "embeddings.position_embedding.weight": (side * side + 1, C),
    }
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes[f"{VISION_MODEL}{norm}.weight"] = (C,)
        shapes[f"{VISION_MODEL}{norm}.bias"] = (C,)
    for i in range(vision.num_hidden_layers):
        shapes.update(vit_block_shapes(f"{VISION_MODEL}encoder.layers.{i}.", C, F))
    return shapes


def vit_block_shapes(layer: str, C: int, F: int) -> dict[str, tuple[int, ...]]:
    """One pre-LN Vision Transformer block's tensors under `layer` (CLIP's and SigLIP's
    share the names): biased q/k/v/out projections, two LayerNorms, a two-layer MLP."""
    shapes = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes[f"{layer}self_attn.{name}.weight"] = (C, C)
        shapes[f"{layer}self_attn.{name}.bias"] = (C,)
    for norm in ("layer_norm1", "layer_norm2"):
        shapes[f"{layer}{norm}.weight"] = (C,)
        shapes[f"{layer}{norm}.bias"] = (C,)
    shapes.update({layer + "mlp.fc1.weight": (F, C), layer + "mlp.fc1.bias": (F,),
                   layer + "mlp.fc2.weight": (C, F), layer + "mlp.fc2.bias": (C,)})
    return shapes
