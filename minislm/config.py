"""config.json and generation_config.json -> frozen dataclasses, validated once.

Phi-3 config files exist in two layouts in the wild, and we read both:

* hub files (written by Microsoft / transformers 4.x): top-level `rope_theta`,
  `partial_rotary_factor`, `original_max_position_embeddings`, and
  `rope_scaling = {"type": "longrope" | "su", "short_factor": [...], "long_factor": [...]}`.
* transformers 5 files: everything about RoPE under
  `rope_parameters = {"rope_type", "rope_theta", "short_factor", ...}`.

Where both say something, we resolve it the way transformers' `Phi3Config` does,
because transformers is the reference our logits are checked against.

Six model types: "phi3" (Phi-3/3.5-mini, medium, Phi-4-mini), "phimoe"
(Phi-3.5-MoE), whose extra keys — experts, biases, LongRoPE's `short_mscale` and
`long_mscale` — are read by `parse_moe` and `parse_rope`, "phi3_v"
(Phi-3-vision, Phi-3.5-vision): a phi3 decoder plus an image encoder, whose keys
`minislm.vision.config.parse_vision` reads, "phi4mm" and "phi4_multimodal"
(Phi-4-multimodal in the hub's and in transformers' layout): the Phi-4-mini decoder
plus a SigLIP image tower, a Conformer speech encoder and two LoRA adapters, read by
`minislm.multimodal.config.parse_phi4mm`, and "phi3small" (Phi-3-small, hub remote
code), whose config.json names its keys its own way (minislm/phi3small_config.py).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import MinislmError
from .multimodal.config import MODEL_TYPES as PHI4MM_TYPES
from .multimodal.config import Phi4MMConfig, parse_phi4mm
from .phi3small_config import Phi3SmallConfig, parse_phi3small, phi3small_rope, phi3small_sizes
from .vision.config import VisionConfig, parse_vision

SUPPORTED_MODEL_TYPES = ("phi3", "phimoe", "phi3_v", "phi3small", *PHI4MM_TYPES)
SUPPORTED_ROPE_TYPES = ("default", "longrope")
# Older hub files call LongRoPE "su"; transformers' Phi3Config also maps "yarn" to it.
ROPE_TYPE_ALIASES = {"su": "longrope", "yarn": "longrope"}
# rope_theta when config.json gives none: the defaults of transformers' Phi3Config / PhimoeConfig.
DEFAULT_ROPE_THETA = {"phi3": 10000.0, "phimoe": 1e6}
# PhiMoE's router (sparsemixer) always picks exactly this many experts per token.
SPARSEMIXER_TOP_K = 2


@dataclass(frozen=True)
class RopeConfig:
    """Everything the rotary embedding needs.

    `short_factor`/`long_factor` are LongRoPE's per-frequency divisors (None for plain
    RoPE). `short_scale`/`long_scale` multiply cos and sin (LongRoPE's attention
    factor; 1.0 for plain RoPE). Which set applies is decided by the sequence length
    against `original_max_position_embeddings` (see `model.rope_tables`).
    """

    kind: str  # "default" or "longrope"
    theta: float
    rotary_dim: int  # how many dims of each head are rotated (< head_dim with partial rotary)
    original_max_position_embeddings: int
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    short_scale: float = 1.0
    long_scale: float = 1.0
    position_scale: float = 1.0  # multiplies positions (Phi-3-small's rope_position_scale)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, as read from config.json. Never changes after loading."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # PhiMoE only; a phi3 config keeps these defaults.
    attention_bias: bool = False  # q/k/v/o projections have biases
    lm_head_bias: bool = False
    num_local_experts: int = 0  # experts per layer (E)
    num_experts_per_tok: int = 0  # experts each token uses: always 2 (sparsemixer)
    router_jitter_noise: float = 0.0  # sparsemixer's eps: experts within 2*eps of the best compete
    # phi3_v only: the image encoder (None for text-only models).
    vision: VisionConfig | None = None
    # phi3small only: muP multipliers, GEGELU's limit, the block-sparse attention pattern.
    phi3small: Phi3SmallConfig | None = None
    # Phi-4-multimodal (phi4mm, phi4_multimodal) only: its SigLIP and Conformer encoders, adapters.
    phi4mm: Phi4MMConfig | None = None

    @property
    def q_size(self) -> int:
        """Width of all query heads side by side: H * hd."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of all key (or value) heads side by side: KV * hd."""
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class GenerationConfig:
    """The parts of generation_config.json we honour: the stop ids (Phi-3 lists several)
    and, as transformers does, the model's default sampling settings."""

    eos_token_ids: tuple[int, ...]
    do_sample: bool = False  # False: greedy, whatever the temperature says
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


def read_json(path: Path) -> dict:
    """Read a JSON object, turning every way it can fail into a one-line MinislmError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinislmError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinislmError(f"{path}: cannot read ({e})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MinislmError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise MinislmError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MinislmError(f"{model_dir}: no config.json in this folder")
    preprocessor = Path(model_dir) / "preprocessor_config.json"  # images: num_crops (phi3_v), dynamic_hd (phi4mm)
    return parse_config(read_json(path), str(path), read_json(preprocessor) if preprocessor.is_file() else None)


# More layers or experts than any real model: a damaged config.json, refused before
# we build a list of millions of expected tensor names.
MAX_LAYERS = 1024
MAX_EXPERTS = 1024
# Positions are int64 in the forward; far beyond any context a model could have.
MAX_POSITIONS = 2**53


def need(raw: dict, key: str, source: str, kind=int, default=None, minimum=None):
    """raw[key], checked to be an int (or a finite number, kind=float) >= `minimum`;
    `default` if absent or null and a default is given."""
    if key not in raw or raw[key] is None:
        if default is not None:
            return default
        raise MinislmError(f"{source}: missing required key '{key}'")
    value = raw[key]
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise MinislmError(f"{source}: '{key}' must be an integer, got {value!r:.80}")
    if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise MinislmError(f"{source}: '{key}' must be a finite number, got {value!r:.80}")
    if minimum is not None and value < minimum:
        raise MinislmError(f"{source}: '{key}' must be >= {minimum}, got {value!r}")
    return value


def positive(raw: dict, key: str, source: str, default=None, kind=int):
    """A count or size that must be > 0 (hidden_size, rope_theta, rms_norm_eps ...)."""
    value = need(raw, key, source, kind=kind, default=default)
    if not value > 0:
        raise MinislmError(f"{source}: '{key}' must be > 0, got {value!r}")
    return value


def flag(raw: dict, key: str, source: str, default: bool = False) -> bool:
    """A JSON true/false. A string such as "false" is refused: bool("false") is True."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise MinislmError(f"{source}: '{key}' must be true or false, got {value!r:.80}")
    return value


def section(raw: dict, key: str, source: str) -> dict:
    """A nested JSON object such as rope_scaling; {} when absent or null."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MinislmError(f"{source}: '{key}' must be a JSON object or null, got {value!r:.80}")
    return value


def parse_config(raw: dict, source: str = "config.json", preprocessor: dict | None = None) -> ModelConfig:
    """Build a ModelConfig from the JSON dict, refusing what we cannot run.
    `preprocessor` is preprocessor_config.json, read for phi3_v's num_crops."""

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise MinislmError(f"{source}: model_type {model_type!r:.80} is not supported (supported: {supported})")
    if model_type == "phi3small":
        return parse_phi3small_config(raw, source)
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise MinislmError(f"{source}: hidden_act {hidden_act!r:.80} is not supported (only 'silu')")

    hidden_size = positive(raw, "hidden_size", source)
    n_heads = positive(raw, "num_attention_heads", source)
    n_kv_heads = positive(raw, "num_key_value_heads", source, default=n_heads)
    if n_heads % n_kv_heads != 0:
        raise MinislmError(
            f"{source}: num_attention_heads ({n_heads}) must be a positive multiple of "
            f"num_key_value_heads ({n_kv_heads})"
        )
    if raw.get("head_dim") is None and hidden_size % n_heads != 0:
        raise MinislmError(f"{source}: hidden_size ({hidden_size}) is not divisible by num_attention_heads ({n_heads})")
    head_dim = positive(raw, "head_dim", source, default=hidden_size // n_heads)
    n_layers = positive(raw, "num_hidden_layers", source)
    if n_layers > MAX_LAYERS:
        raise MinislmError(f"{source}: num_hidden_layers is {n_layers}, more than any real model (at most {MAX_LAYERS})")

    max_pos = positive(raw, "max_position_embeddings", source)
    if max_pos > MAX_POSITIONS:
        raise MinislmError(f"{source}: max_position_embeddings is {max_pos}, beyond any context (at most 2**53)")
    sliding_window = raw.get("sliding_window")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0
    ):
        raise MinislmError(f"{source}: sliding_window must be a positive integer or null, got {sliding_window!r:.80}")
    if sliding_window is not None and sliding_window >= max_pos:
        sliding_window = None  # a window as long as the context masks nothing
    bos = raw.get("bos_token_id", 1)
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
        raise MinislmError(f"{source}: 'bos_token_id' must be a token id (an integer >= 0) or null, got {bos!r:.80}")

    return ModelConfig(
        model_type=model_type,
        vocab_size=positive(raw, "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=positive(raw, "intermediate_size", source),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(positive(raw, "rms_norm_eps", source, default=1e-5, kind=float)),
        max_position_embeddings=max_pos,
        rope=parse_rope(raw, head_dim, max_pos, source, "phimoe" if model_type == "phimoe" else "phi3"),
        sliding_window=sliding_window,
        tie_word_embeddings=flag(raw, "tie_word_embeddings", source),
        bos_token_id=bos,
        eos_token_ids=as_id_tuple(raw.get("eos_token_id"), f"{source}: 'eos_token_id'"),
        **(parse_moe(raw, source) if model_type == "phimoe" else {}),
        vision=parse_vision(raw, source, preprocessor) if model_type == "phi3_v" else None,
        phi4mm=parse_phi4mm(raw, source, preprocessor) if model_type in PHI4MM_TYPES else None,
    )


def parse_phi3small_config(raw: dict, source: str) -> ModelConfig:
    """Phi-3-small: its own key names (layer_norm_epsilon, ff_intermediate_size,
    rope_embedding_base ...), read by minislm/phi3small_config.py."""
    sizes = phi3small_sizes(raw, source)
    if sizes["num_hidden_layers"] > MAX_LAYERS:
        raise MinislmError(f"{source}: num_hidden_layers is {sizes['num_hidden_layers']}, more than any real model "
                           f"(at most {MAX_LAYERS})")
    if sizes["max_position_embeddings"] > MAX_POSITIONS:
        raise MinislmError(f"{source}: max_position_embeddings is {sizes['max_position_embeddings']}, beyond any context")
    bos = raw.get("bos_token_id", 100257)
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
        raise MinislmError(f"{source}: 'bos_token_id' must be a token id (an integer >= 0) or null, got {bos!r:.80}")
    rope = RopeConfig(**phi3small_rope(raw, sizes["head_dim"], sizes["max_position_embeddings"], source))
    return ModelConfig(
        model_type="phi3small",
        **sizes,
        rope=rope,
        bos_token_id=bos,
        eos_token_ids=as_id_tuple(raw.get("eos_token_id", 100257), f"{source}: 'eos_token_id'"),
        phi3small=parse_phi3small(raw, source, sizes["hidden_size"], sizes["num_attention_heads"], sizes["vocab_size"]),
    )


def parse_moe(raw: dict, source: str) -> dict:
    """PhiMoE's keys, with PhimoeConfig's defaults; refuses routing we cannot reproduce."""
    experts = need(raw, "num_local_experts", source, default=16)
    per_token = need(raw, "num_experts_per_tok", source, default=SPARSEMIXER_TOP_K)
    if experts > MAX_EXPERTS:
        raise MinislmError(f"{source}: num_local_experts is {experts}, more than any real model (at most {MAX_EXPERTS})")
    if experts < SPARSEMIXER_TOP_K:
        raise MinislmError(f"{source}: num_local_experts is {experts}; PhiMoE routes each token to 2 experts, so it needs at least 2")
    if per_token > experts:
        raise MinislmError(
            f"{source}: num_experts_per_tok ({per_token}) is larger than num_local_experts ({experts}); "
            "a token cannot use more experts than its layer has"
        )
    if per_token != SPARSEMIXER_TOP_K:
        # transformers' sparsemixer ignores this key and routes to 2 anyway; we would rather say so.
        raise MinislmError(
            f"{source}: num_experts_per_tok is {per_token}, but PhiMoE's router (sparsemixer) always picks "
            "exactly 2 experts per token; minislm supports only 2"
        )
    jitter = need(raw, "router_jitter_noise", source, kind=float, default=0.01)
    if jitter < 0:
        raise MinislmError(f"{source}: router_jitter_noise must be >= 0, got {jitter}")
    return dict(
        attention_bias=flag(raw, "attention_bias", source),
        lm_head_bias=flag(raw, "lm_head_bias", source),
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        router_jitter_noise=float(jitter),
    )


def parse_rope(raw: dict, head_dim: int, max_pos: int, source: str, model_type: str = "phi3") -> RopeConfig:
    """Resolve RoPE settings from either layout, with transformers' precedence rules."""
    # transformers lets `rope_scaling` win when a file has both.
    scaling, parameters = section(raw, "rope_scaling", source), section(raw, "rope_parameters", source)
    params, where = (scaling, f"{source}: rope_scaling") if scaling else (parameters, f"{source}: rope_parameters")
    kind = params.get("rope_type", params.get("type", "default"))
    kind = ROPE_TYPE_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in SUPPORTED_ROPE_TYPES:
        raise MinislmError(
            f"{source}: rope type {kind!r:.80} is not supported (supported: default, longrope/su)"
        )
    # A key inside the RoPE section wins over the top-level one, as in transformers.
    def setting(key, default):
        if params.get(key) is not None:
            return positive(params, key, where, kind=float)
        return positive(raw, key, source, kind=float, default=default)

    theta = float(setting("rope_theta", DEFAULT_ROPE_THETA[model_type]))
    partial = float(setting("partial_rotary_factor", 1.0))
    if partial > 1:
        raise MinislmError(f"{source}: partial_rotary_factor must be in (0, 1], got {partial}")
    rotary_dim = int(head_dim * partial)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise MinislmError(
            f"{source}: partial_rotary_factor {partial} gives {rotary_dim} rotary dims of {head_dim}; "
            "need an even number between 2 and head_dim"
        )
    # transformers lets the top-level key win; Phi3Config defaults it to 4096, PhimoeConfig
    # to max_position_embeddings (so LongRoPE never switches to the long factors).
    if raw.get("original_max_position_embeddings"):
        original_max = positive(raw, "original_max_position_embeddings", source)
    else:
        default = 4096 if model_type == "phi3" else max_pos
        original_max = positive(params, "original_max_position_embeddings", where, default=default)
    if kind == "default":
        return RopeConfig("default", theta, rotary_dim, original_max)

    if original_max < 2:
        raise MinislmError(f"{source}: longrope needs original_max_position_embeddings >= 2, got {original_max}")
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = params.get(name)
        numbers = isinstance(values, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
        )
        if not numbers or len(values) != rotary_dim // 2:
            got = f"a list of {len(values)}" if numbers else f"{values!r:.80}"
            raise MinislmError(
                f"{source}: longrope needs '{name}' as a list of {rotary_dim // 2} positive numbers "
                f"(rotary dims / 2), got {got}"
            )
        factors[name] = tuple(float(v) for v in values)
    if model_type == "phimoe":
        # PhiMoE names its cos/sin multipliers outright, one per factor set (1.2432 for both
        # on Phi-3.5-MoE), instead of deriving one attention factor from the context ratio.
        short_scale, long_scale = (
            positive(params, key, f"{source}: PhiMoE longrope", kind=float) for key in ("short_mscale", "long_mscale")
        )
        return RopeConfig(
            "longrope", theta, rotary_dim, original_max, factors["short_factor"], factors["long_factor"],
            short_scale=float(short_scale), long_scale=float(long_scale),
        )
    scale = positive(params, "attention_factor", where, kind=float) if params.get("attention_factor") is not None else None
    if scale is None:
        # LongRoPE's attention factor: keeps attention entropy steady when the context is
        # stretched by `factor`. It multiplies cos/sin for short prompts too.
        factor = positive(params, "factor", where, kind=float) if params.get("factor") else max_pos / original_max
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    return RopeConfig(
        "longrope",
        theta,
        rotary_dim,
        original_max,
        factors["short_factor"],
        factors["long_factor"],
        short_scale=float(scale),
        long_scale=float(scale),
    )


def as_id_tuple(value, what: str = "eos_token_id") -> tuple[int, ...]:
    """A token id or a list of them (Phi-3's generation_config lists several) as a tuple."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise MinislmError(f"{what} must be a token id or a list of token ids (integers >= 0), got {value!r:.80}")
    return tuple(values)


def load_generation_config(model_dir: Path, config: ModelConfig) -> GenerationConfig:
    """Stop ids: generation_config.json's list plus config.json's eos, in that order.

    Phi-3's config.json names only <|endoftext|> (32000); the chat model ends its turns
    with <|end|> (32007), which only generation_config.json lists. Stopping on
    config.json's id alone is the classic "runs away past <|end|>" bug.
    """
    path = Path(model_dir) / "generation_config.json"
    raw = read_json(path) if path.is_file() else {}
    from .sampling import check_setting

    ids = list(as_id_tuple(raw.get("eos_token_id"), f"{path}: 'eos_token_id'"))
    for i in config.eos_token_ids:
        if i not in ids:
            ids.append(i)
    numbers = {}
    for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        check_setting(key, raw.get(key), f"{path}: '{key}'")  # the ranges of sampling.SETTING_RANGES
        numbers[key] = raw.get(key)
    return GenerationConfig(eos_token_ids=tuple(ids), do_sample=flag(raw, "do_sample", str(path)), **numbers)
