"""Phi-3-small's config.json (`model_type: "phi3small"`), read once and checked.

Phi-3-small is the one Phi-3 model transformers never adopted: its model is remote
code in the hub repository (modeling_phi3_small.py and friends), and its config.json
names things its own way:

    layer_norm_epsilon       the LayerNorms' eps (phi3: rms_norm_eps)
    ff_intermediate_size     the feed-forward size F (or ff_dim_multiplier, see below)
    rope_embedding_base      RoPE's theta; rope_position_scale multiplies positions
    hidden_act "gegelu"      GEGELU, gated by the even columns of up_proj
    mup_*                    muP's multipliers: embedding x10, logits / 8, attention
                             scale mup_attn_multiplier / head_dim instead of 1/sqrt(hd)
    blocksparse_*            the block-sparse attention pattern (minislm/blocksparse.py)
    dense_attention_every_n_layers   which layers skip the pattern

What each key means was read from the remote code (docs/architecture.md has the
section, with its line numbers); where the remote code has a default, minislm takes
the same one, except for the sizes, which a config.json must state.
"""

import math
from dataclasses import dataclass

from .errors import MinislmError

# What the hub's configuration_phi3_small.py assumes when a key is absent.
DEFAULT_KERNEL_BLOCK_SIZE = 64
DEFAULT_GEGELU_LIMIT = 20.0
DEFAULT_ROPE_BASE = 1e6
DEFAULT_TOKEN_ID = 100257  # <|endoftext|>: Phi-3-small's bos and eos
# The keys LongRopeConfig.from_dict (positional_embedding.py) accepts in rope_scaling;
# it refuses any other (when the `dacite` package is absent; with it, extra keys pass).
LONGROPE_KEYS = {"type", "short_factor", "long_factor", "original_max_position_embeddings", "short_mscale", "long_mscale"}


@dataclass(frozen=True)
class Phi3SmallConfig:
    """What Phi-3-small adds to the shared ModelConfig.

    block_size, local_blocks, vert_stride, homo_head: the attention pattern (see
    minislm/blocksparse.py); kernel_block_size only has to be a size the remote Triton
    kernel can take, it changes nothing computed. dense_every: layer i attends
    densely when (i + 1) % dense_every == 0 (None: no dense layer).
    """

    embedding_multiplier: float | None  # scales the token embeddings (None: off)
    width_multiplier: float | None  # divides the logits (None: off)
    attention_scale: float  # multiplies q.k: mup_attn_multiplier / head_dim, or 1/sqrt(head_dim)
    gegelu_limit: float | None  # clamps GEGELU's inputs (None: no clamp)
    block_size: int
    kernel_block_size: int
    local_blocks: int
    vert_stride: int
    homo_head: bool
    dense_every: int | None
    masked_token_ids: tuple[int, ...]  # logits set to float32's lowest: the tokenizer's unused ids


def dummy_token_ids() -> tuple[int, ...]:
    """The 91 ids Phi-3-small's tokenizer (tokenization_phi3_small.py) never produces,
    whose logits the model sets to float32's lowest value: its `<|dummy_id_N|>` tokens
    (100256, 100264-100265, 100267-100275, 100277-100351) and four cl100k specials it
    does not use, `<|fim_prefix|>`, `<|fim_middle|>`, `<|fim_suffix|>` (100258-100260)
    and `<|endofprompt|>` (100276). tests/test_phi3_small.py holds this list to the one
    the remote tokenizer code computes (recorded in the fixture)."""
    kept = {100257, 100261, 100262, 100263, 100266}  # endoftext, system, user, assistant, end
    return tuple(i for i in range(100256, 100352) if i not in kept)


def number(raw: dict, key: str, source: str, default=None, minimum=None, kind=float, allow_null=False):
    """raw[key] as a finite number (an integer with kind=int), `default` when absent."""
    if key not in raw or (raw[key] is None and not allow_null):
        if default is None and not allow_null:
            raise MinislmError(f"{source}: missing required key '{key}' (Phi-3-small needs it)")
        return default
    value = raw[key]
    if value is None:
        return None
    integer = isinstance(value, int) and not isinstance(value, bool)
    if kind is int and not integer:
        raise MinislmError(f"{source}: '{key}' must be an integer, got {value!r:.80}")
    if kind is float and not (integer or isinstance(value, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise MinislmError(f"{source}: '{key}' must be a finite number, got {value!r:.80}")
    if minimum is not None and value < minimum:
        raise MinislmError(f"{source}: '{key}' must be >= {minimum}, got {value!r}")
    return value


def flag(raw: dict, key: str, source: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise MinislmError(f"{source}: '{key}' must be true or false, got {value!r:.80}")
    return value


def feed_forward_size(raw: dict, hidden_size: int, source: str) -> int:
    """F: ff_intermediate_size, or ff_dim_multiplier * (hidden_size // 3) * 2, rounded up
    to a multiple of 256 when gegelu_pad_to_256 (configuration_phi3_small.py). Exactly
    one of the two must be given (the remote code raises otherwise)."""
    size = number(raw, "ff_intermediate_size", source, kind=int, minimum=1, allow_null=True)
    multiplier = number(raw, "ff_dim_multiplier", source, kind=int, minimum=1, allow_null=True)
    if (size is None) == (multiplier is None):
        raise MinislmError(f"{source}: give exactly one of 'ff_intermediate_size' and 'ff_dim_multiplier' "
                           f"(got {size!r} and {multiplier!r})")
    if size is not None:
        return size
    size = multiplier * (hidden_size // 3) * 2
    if flag(raw, "gegelu_pad_to_256", source, True):
        size = -(-size // 256) * 256
    return size


def check_block_sizes(block: int, kernel_block: int, source: str) -> None:
    """The sizes the remote code's Triton kernel takes (triton_blocksparse_attention_layer.py
    and get_sparse_attn_op): a kernel tile of a power of two >= 16, dividing the block."""
    if kernel_block < 16 or kernel_block & (kernel_block - 1):
        raise MinislmError(f"{source}: 'blocksparse_triton_kernel_block_size' is {kernel_block}; the block-sparse "
                           "kernel takes a power of two >= 16")
    if block % kernel_block:
        raise MinislmError(f"{source}: 'blocksparse_block_size' ({block}) must be a multiple of "
                           f"'blocksparse_triton_kernel_block_size' ({kernel_block}), as the block-sparse kernel requires")


def parse_phi3small(raw: dict, source: str, hidden_size: int, n_heads: int, vocab_size: int) -> Phi3SmallConfig:
    """The Phi-3-small settings of config.json `raw` (its shared sizes already read)."""
    act = raw.get("hidden_act", "gegelu")
    if act != "gegelu":
        raise MinislmError(f"{source}: hidden_act {act!r:.80} is not supported for phi3small (only 'gegelu')")
    head_dim = hidden_size // n_heads
    block = number(raw, "blocksparse_block_size", source, kind=int, minimum=1)
    kernel_block = number(raw, "blocksparse_triton_kernel_block_size", source, DEFAULT_KERNEL_BLOCK_SIZE, kind=int, minimum=1)
    check_block_sizes(block, kernel_block, source)
    if "dense_attention_every_n_layers" not in raw:
        raise MinislmError(f"{source}: missing required key 'dense_attention_every_n_layers' (null: no dense layer)")
    dense_every = number(raw, "dense_attention_every_n_layers", source, kind=int, minimum=0, allow_null=True)
    embedding = number(raw, "mup_embedding_multiplier", source, 10.0, allow_null=True)
    width = number(raw, "mup_width_multiplier", source, 8.0, allow_null=True)
    attn = number(raw, "mup_attn_multiplier", source, 1.0)
    scale = attn / head_dim if flag(raw, "mup_use_scaling", source, True) else 1.0 / math.sqrt(head_dim)
    limit = number(raw, "gegelu_limit", source, DEFAULT_GEGELU_LIMIT, allow_null=True)
    if limit is not None and limit <= 0:
        raise MinislmError(f"{source}: 'gegelu_limit' must be > 0 or null, got {limit!r}")
    return Phi3SmallConfig(
        # the remote code applies them only when truthy / > 0 (modeling_phi3_small.py)
        embedding_multiplier=float(embedding) if embedding is not None and embedding > 0 else None,
        width_multiplier=float(width) if width else None,
        attention_scale=float(scale),
        gegelu_limit=None if limit is None else float(limit),
        block_size=block,
        kernel_block_size=kernel_block,
        local_blocks=number(raw, "blocksparse_num_local_blocks", source, kind=int, minimum=1),
        vert_stride=number(raw, "blocksparse_vert_stride", source, kind=int, minimum=1),
        homo_head=flag(raw, "blocksparse_homo_head_pattern", source, False),
        dense_every=dense_every or None,
        masked_token_ids=tuple(i for i in dummy_token_ids() if i < vocab_size),
    )


def phi3small_sizes(raw: dict, source: str) -> dict:
    """The shared ModelConfig fields under Phi-3-small's own key names."""
    hidden = number(raw, "hidden_size", source, kind=int, minimum=1)
    heads = number(raw, "num_attention_heads", source, kind=int, minimum=1)
    kv_heads = number(raw, "num_key_value_heads", source, kind=int, minimum=1)
    if hidden % heads:
        raise MinislmError(f"{source}: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})")
    if heads % kv_heads:
        raise MinislmError(f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    eps = number(raw, "layer_norm_epsilon", source, 1e-5)
    if eps <= 0:
        raise MinislmError(f"{source}: 'layer_norm_epsilon' must be > 0, got {eps!r}")
    return dict(
        vocab_size=number(raw, "vocab_size", source, kind=int, minimum=1),
        hidden_size=hidden,
        intermediate_size=feed_forward_size(raw, hidden, source),
        num_hidden_layers=number(raw, "num_hidden_layers", source, kind=int, minimum=1),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        rms_norm_eps=float(eps),  # the LayerNorms' eps, under the shared name
        max_position_embeddings=number(raw, "max_position_embeddings", source, kind=int, minimum=1),
        sliding_window=None,
        tie_word_embeddings=flag(raw, "tie_word_embeddings", source, True),  # PretrainedConfig's default
    )


def phi3small_rope(raw: dict, head_dim: int, max_pos: int, source: str) -> dict:
    """RopeConfig's fields: plain RoPE over the whole head (theta rope_embedding_base,
    positions times rope_position_scale), or LongRoPE with positional_embedding.py's
    rules, which ignore rope_position_scale: long factors once the sequence is
    longer than rope_scaling's original_max_position_embeddings; cos/sin times
    short_mscale (1.0 when absent or <= 0) or long_mscale (when absent or <= 0:
    sqrt(1 + ln(max/orig) / ln(orig)), 1.0 if max <= orig)."""
    theta = float(number(raw, "rope_embedding_base", source, DEFAULT_ROPE_BASE))
    if theta <= 0:
        raise MinislmError(f"{source}: 'rope_embedding_base' must be > 0, got {theta!r}")
    position_scale = float(number(raw, "rope_position_scale", source, 1.0))
    if position_scale <= 0:
        raise MinislmError(f"{source}: 'rope_position_scale' must be > 0, got {position_scale!r}")
    scaling = raw.get("rope_scaling")
    if scaling is None:
        return dict(kind="default", theta=theta, rotary_dim=head_dim, original_max_position_embeddings=max_pos,
                    position_scale=position_scale)
    where = f"{source}: rope_scaling"
    if not isinstance(scaling, dict):
        raise MinislmError(f"{where} must be a JSON object or null, got {scaling!r:.80}")
    unknown = sorted(set(scaling) - LONGROPE_KEYS)
    if unknown:
        raise MinislmError(f"{where}: unknown key {unknown[0]!r:.40}; Phi-3-small's LongRoPE takes "
                           f"{', '.join(sorted(LONGROPE_KEYS))}")
    if scaling.get("type", "longrope") not in ("longrope", "su"):
        raise MinislmError(f"{where}: type {scaling.get('type')!r:.40} is not supported (longrope or su)")
    original = number(scaling, "original_max_position_embeddings", where, kind=int, minimum=2)
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = scaling.get(name)
        if not (isinstance(values, list) and len(values) == head_dim // 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)):
            raise MinislmError(f"{where}: '{name}' must be a list of {head_dim // 2} positive numbers (head_dim / 2)")
        factors[name] = tuple(float(v) for v in values)
    short = number(scaling, "short_mscale", where, -1.0)
    long = number(scaling, "long_mscale", where, -1.0)
    ratio = max_pos / original
    computed = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
    return dict(
        kind="longrope", theta=theta, rotary_dim=head_dim, original_max_position_embeddings=original,
        short_factor=factors["short_factor"], long_factor=factors["long_factor"],
        short_scale=float(short) if short > 0 else 1.0, long_scale=float(long) if long > 0 else computed,
    )
