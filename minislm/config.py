"""config.json and generation_config.json -> frozen dataclasses, validated once.

Phi-3 config files exist in two layouts in the wild, and we read both:

* hub files (written by Microsoft / transformers 4.x): top-level `rope_theta`,
  `partial_rotary_factor`, `original_max_position_embeddings`, and
  `rope_scaling = {"type": "longrope" | "su", "short_factor": [...], "long_factor": [...]}`.
* transformers 5 files: everything about RoPE under
  `rope_parameters = {"rope_type", "rope_theta", "short_factor", ...}`.

Where both say something, we resolve it the way transformers' `Phi3Config` does,
because transformers is the reference our logits are checked against.

Two model types: "phi3" (Phi-3/3.5-mini, medium, Phi-4-mini) and "phimoe"
(Phi-3.5-MoE), whose extra keys — experts, biases, LongRoPE's `short_mscale` and
`long_mscale` — are read by `parse_moe` and `parse_rope`.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import MinislmError

SUPPORTED_MODEL_TYPES = ("phi3", "phimoe")
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
    return parse_config(read_json(path), source=str(path))


def need(raw: dict, key: str, source: str, kind=int, default=None):
    """raw[key], checked to be an int (or a number, kind=float); `default` if absent and given."""
    if key not in raw or raw[key] is None:
        if default is not None:
            return default
        raise MinislmError(f"{source}: missing required key '{key}'")
    value = raw[key]
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise MinislmError(f"{source}: '{key}' must be an integer, got {value!r}")
    if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise MinislmError(f"{source}: '{key}' must be a number, got {value!r}")
    return value


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the JSON dict, refusing what we cannot run."""

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise MinislmError(f"{source}: model_type {model_type!r} is not supported (supported: {supported})")
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise MinislmError(f"{source}: hidden_act {hidden_act!r} is not supported (only 'silu')")

    hidden_size = need(raw, "hidden_size", source)
    n_heads = need(raw, "num_attention_heads", source)
    n_kv_heads = raw.get("num_key_value_heads") or n_heads
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
        raise MinislmError(
            f"{source}: num_attention_heads ({n_heads}) must be a positive multiple of "
            f"num_key_value_heads ({n_kv_heads})"
        )
    head_dim = raw.get("head_dim") or hidden_size // n_heads
    if not raw.get("head_dim") and hidden_size % n_heads != 0:
        raise MinislmError(f"{source}: hidden_size ({hidden_size}) is not divisible by num_attention_heads ({n_heads})")

    max_pos = need(raw, "max_position_embeddings", source)
    sliding_window = raw.get("sliding_window")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window <= 0):
        raise MinislmError(f"{source}: sliding_window must be a positive integer or null, got {sliding_window!r}")

    eos = raw.get("eos_token_id")
    return ModelConfig(
        model_type=model_type,
        vocab_size=need(raw, "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=need(raw, "intermediate_size", source),
        num_hidden_layers=need(raw, "num_hidden_layers", source),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=max_pos,
        rope=parse_rope(raw, head_dim, max_pos, source, model_type),
        sliding_window=sliding_window,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_ids=as_id_tuple(eos),
        **(parse_moe(raw, source) if model_type == "phimoe" else {}),
    )


def parse_moe(raw: dict, source: str) -> dict:
    """PhiMoE's keys, with PhimoeConfig's defaults; refuses routing we cannot reproduce."""
    experts = need(raw, "num_local_experts", source, default=16)
    per_token = need(raw, "num_experts_per_tok", source, default=SPARSEMIXER_TOP_K)
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
        attention_bias=bool(raw.get("attention_bias", False)),
        lm_head_bias=bool(raw.get("lm_head_bias", False)),
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        router_jitter_noise=float(jitter),
    )


def parse_rope(raw: dict, head_dim: int, max_pos: int, source: str, model_type: str = "phi3") -> RopeConfig:
    """Resolve RoPE settings from either layout, with transformers' precedence rules."""
    # transformers lets `rope_scaling` win when a file has both.
    params = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    kind = ROPE_TYPE_ALIASES.get(kind, kind)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise MinislmError(
            f"{source}: rope type {kind!r} is not supported (supported: default, longrope/su)"
        )
    theta = float(params.get("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA[model_type])))
    partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * partial)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise MinislmError(
            f"{source}: partial_rotary_factor {partial} gives {rotary_dim} rotary dims of {head_dim}; "
            "need an even number between 2 and head_dim"
        )
    # transformers lets the top-level key win; Phi3Config defaults it to 4096, PhimoeConfig
    # to max_position_embeddings (so LongRoPE never switches to the long factors).
    original_max = raw.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", 4096 if model_type == "phi3" else max_pos
    )
    if kind == "default":
        return RopeConfig("default", theta, rotary_dim, original_max)

    factors = {}
    for name in ("short_factor", "long_factor"):
        values = params.get(name)
        if not isinstance(values, list) or len(values) != rotary_dim // 2:
            raise MinislmError(
                f"{source}: longrope needs '{name}' as a list of {rotary_dim // 2} numbers "
                f"(rotary dims / 2), got {'a list of ' + str(len(values)) if isinstance(values, list) else values!r}"
            )
        factors[name] = tuple(float(v) for v in values)
    if model_type == "phimoe":
        # PhiMoE names its cos/sin multipliers outright, one per factor set (1.2432 for both
        # on Phi-3.5-MoE), instead of deriving one attention factor from the context ratio.
        short_scale, long_scale = (
            need(params, key, f"{source}: PhiMoE longrope", kind=float) for key in ("short_mscale", "long_mscale")
        )
        return RopeConfig(
            "longrope", theta, rotary_dim, original_max, factors["short_factor"], factors["long_factor"],
            short_scale=float(short_scale), long_scale=float(long_scale),
        )
    scale = params.get("attention_factor")
    if scale is None:
        # LongRoPE's attention factor: keeps attention entropy steady when the context is
        # stretched by `factor`. It multiplies cos/sin for short prompts too.
        factor = params.get("factor") or max_pos / original_max
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


def as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load_generation_config(model_dir: Path, config: ModelConfig) -> GenerationConfig:
    """Stop ids: generation_config.json's list plus config.json's eos, in that order.

    Phi-3's config.json names only <|endoftext|> (32000); the chat model ends its turns
    with <|end|> (32007), which only generation_config.json lists. Stopping on
    config.json's id alone is the classic "runs away past <|end|>" bug.
    """
    path = Path(model_dir) / "generation_config.json"
    raw = read_json(path) if path.is_file() else {}
    ids = list(as_id_tuple(raw.get("eos_token_id")))
    for i in config.eos_token_ids:
        if i not in ids:
            ids.append(i)
    numbers = {}
    for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MinislmError(f"{path}: '{key}' must be a number, got {value!r}")
        numbers[key] = value
    return GenerationConfig(eos_token_ids=tuple(ids), do_sample=bool(raw.get("do_sample", False)), **numbers)
