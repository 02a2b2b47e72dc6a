"""GGUF files (llama.cpp, Ollama): one file holding the config, the weights and the tokenizer.

A GGUF file is a header of typed key/value metadata (`phi3.embedding_length`,
`tokenizer.ggml.tokens`, ...), a table of tensors (name, shape, type, offset), and
the tensor bytes, aligned. `gguf_file.read_gguf` reads the metadata and the table
(with the `gguf` package's tables of types; its own reader takes over a minute on a
200,000-token vocabulary) and memory-maps the file: nothing is read until a tensor
is unpacked.

Three layouts of the Phi-3 family exist in the wild, named by `general.architecture`:

    phi3     llama.cpp's own Phi-3 (and Phi-3.5-mini, Phi-4-mini): fused `attn_qkv`
             with rows [q | k | v] and `ffn_up` holding [gate | up], exactly the hub's
             qkv_proj and gate_up_proj; rotate-half RoPE, as in transformers.
    llama    early community files, converted before llama.cpp knew Phi-3: separate
             q/k/v and gate/up, and llama.cpp runs them with adjacent-pair RoPE. To make
             that give the same attention, its converter reordered the rows of q and k
             in every head: file row 2i + j is hub row j * hd/2 + i (j = 0, 1). We put
             them back (`unpermute_heads`) and run rotate-half as everywhere else.
    phimoe   Phi-3.5-MoE: LayerNorms with biases, q/k/v/o with biases, the router
             `ffn_gate_inp`, and each layer's experts stacked in 3-D tensors.

The tensors get the hub's names (the names the decoder reads), so after loading a
GGUF model is a weights dict like any other. GGUF stores a matrix with its inner
dimension first (ne = [in, out]); NumPy sees (out, in), the hub's layout.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig, parse_config
from ..errors import MinislmError
from ..weights import bf16_to_float32, expected_shapes
from .gguf_blocks import BLOCK_TYPES, K_QUANT_FIELDS, unpack_rows, unpack_superblocks
from .gguf_file import read_gguf
from .grouped import GroupedCodes, RowStack, SuperBlockCodes, take_rows

ARCHITECTURES = ("phi3", "llama", "phimoe")
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = FLOAT_TYPES + tuple(BLOCK_TYPES)
# Microsoft's Phi-3-mini-4k-instruct-gguf has no `phi3.attention.sliding_window`; its
# config.json says 2047, and so did llama.cpp when the key was missing. Phi-4-mini
# files write 0 (no window).
PHI3_4K_SLIDING_WINDOW = 2047
# PhiMoE's sparsemixer threshold; GGUF has no key for it (Phi-3.5-MoE's config.json: 0.01).
PHIMOE_ROUTER_JITTER = 0.01
# llama.cpp also stops on these tokens by their text (its "end of generation" list).
END_OF_TURN_TOKENS = ("<|end|>", "<|endoftext|>")


@dataclass
class GgufFile:
    """An opened GGUF file: its metadata, its tensors by GGUF name, the config they imply."""

    path: Path
    arch: str
    metadata: dict  # key -> value, tokenizer arrays included
    tensors: dict  # GGUF name -> gguf.ReaderTensor (memory-mapped)
    config: ModelConfig
    reader: object  # gguf_file.GgufContents (its `fields` feed the tokenizer)
    hub_config: dict | None = None  # the config.json the metadata amounts to


def open_gguf(path: Path) -> GgufFile:
    """Open and check a GGUF file: magic, architecture, tensor types, metadata, shapes.
    Every problem is found here, before any weight is unpacked."""
    path = Path(path)
    reader = open_reader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise MinislmError(
            f"{path}: GGUF architecture {arch!r} is not supported (minislm reads {', '.join(ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise MinislmError(
                f"{path}: tensor '{t.name}' has type {t.tensor_type.name}, which minislm cannot read "
                f"(it reads {', '.join(SUPPORTED_TYPES)})"
            )
    gg = GgufFile(path, arch, metadata, tensors, config=None, reader=reader)
    gg.config = config_from_metadata(gg)
    check_shapes(gg)
    return gg


def open_reader(path: Path):
    """The file's metadata and tensor table (`gguf_file.read_gguf`), or one line saying why not."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise MinislmError(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise MinislmError(f"{path}: not a GGUF file (it starts with {magic!r}; a GGUF file starts with b'GGUF')")
    try:
        return read_gguf(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinislmError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {reason[:160]})") from None


# ---------------------------------------------------------------- config from metadata


def config_from_metadata(gg: GgufFile) -> ModelConfig:
    """The `<arch>.*` keys, written as the config.json transformers would have, then
    parsed and checked by the same `parse_config` every checkpoint goes through."""
    arch, meta = gg.arch, gg.metadata

    def key(name, what, default=None):
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is not None:
            return default
        raise MinislmError(f"{gg.path}: GGUF metadata has no '{full}' ({what}); minislm cannot run the file without it")

    hidden = int(key("embedding_length", "the hidden size"))
    heads = int(key("attention.head_count", "the number of attention heads"))
    head_dim = int(key("attention.key_length", "the head size", default=hidden // heads))
    rotary_dim = int(key("rope.dimension_count", "rotated dims per head", default=head_dim))
    max_pos = int(key("context_length", "the context length"))
    if "token_embd.weight" not in gg.tensors:
        raise MinislmError(f"{gg.path}: missing tensor 'token_embd.weight' (the token embedding)")
    raw = {
        "model_type": "phimoe" if arch == "phimoe" else "phi3",
        "vocab_size": int(logical_shape(gg.tensors["token_embd.weight"])[0]),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length", "the feed-forward size")),
        "num_hidden_layers": int(key("block_count", "the number of layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", "key/value heads", default=heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", "the norm epsilon")),
        "max_position_embeddings": max_pos,
        "original_max_position_embeddings": int(key("rope.scaling.original_context_length", "", default=max_pos)),
        "rope_theta": float(key("rope.freq_base", "", default=10000.0)),
        "partial_rotary_factor": rotary_fraction(rotary_dim, head_dim),
        "sliding_window": sliding_window(gg, max_pos),
        "tie_word_embeddings": "output.weight" not in gg.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if arch == "llama" and rotary_dim != head_dim:
        raise MinislmError(
            f"{gg.path}: a 'llama' GGUF with partial rotary ({rotary_dim} of {head_dim} dims) is not supported: "
            "its q/k row order cannot be undone"
        )
    if "rope_freqs.weight" in gg.tensors:
        raise MinislmError(f"{gg.path}: tensor 'rope_freqs.weight' (Llama-3-style RoPE scaling) is not supported")
    rope = longrope_settings(gg, raw)
    if rope:
        raw["rope_scaling"] = rope
    if arch == "phimoe":
        raw.update(
            num_local_experts=int(key("expert_count", "the number of experts")),
            num_experts_per_tok=int(key("expert_used_count", "experts per token")),
            attention_bias="blk.0.attn_q.bias" in gg.tensors,
            lm_head_bias="output.bias" in gg.tensors,
            router_jitter_noise=PHIMOE_ROUTER_JITTER,
        )
    gg.hub_config = raw
    return parse_config(raw, source=f"{gg.path} (GGUF metadata)")


def rotary_fraction(rotary_dim: int, head_dim: int) -> float:
    """partial_rotary_factor such that int(head_dim * factor) == rotary_dim, as the
    config parser computes it (n / hd * hd can round to just below n)."""
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, 2.0)
    return factor


def sliding_window(gg: GgufFile, max_pos: int) -> int | None:
    """`<arch>.attention.sliding_window`: 0 means none (Phi-4-mini). Missing in a `phi3`
    file with a 4k context (Microsoft's own Phi-3-mini-4k GGUF): 2047, what its
    config.json says. (llama.cpp today runs no window at all for Phi-3, so the two
    differ past 2047 tokens.)"""
    value = gg.metadata.get(f"{gg.arch}.attention.sliding_window")
    if value is None:
        return PHI3_4K_SLIDING_WINDOW if gg.arch == "phi3" and max_pos == 4096 else None
    return int(value) or None


def longrope_settings(gg: GgufFile, raw: dict) -> dict | None:
    """LongRoPE (128k models) from the `rope_factors_long/short` tensors and the
    attention factor the converter wrote (`rope.scaling.attn_factor`)."""
    long_t, short_t = gg.tensors.get("rope_factors_long.weight"), gg.tensors.get("rope_factors_short.weight")
    if long_t is None and short_t is None:
        return None
    if long_t is None or short_t is None:
        missing = "rope_factors_long.weight" if long_t is None else "rope_factors_short.weight"
        raise MinislmError(f"{gg.path}: has one LongRoPE factor tensor but not '{missing}'")
    rope = {
        "type": "longrope",
        "long_factor": [float(v) for v in unpack(gg, long_t)],
        "short_factor": [float(v) for v in unpack(gg, short_t)],
    }
    scale = gg.metadata.get(f"{gg.arch}.rope.scaling.attn_factor")
    if scale is None:  # transformers' default for LongRoPE
        ratio = raw["max_position_embeddings"] / raw["original_max_position_embeddings"]
        scale = 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(raw["original_max_position_embeddings"]))
    if gg.arch == "phimoe":
        # Phi-3.5-MoE's config.json names its own multiplier (short/long_mscale 1.2432);
        # the GGUF converter writes the Phi-3 formula's 1.1902 instead, and llama.cpp runs
        # that. We run what the file says.
        rope.update(short_mscale=float(scale), long_mscale=float(scale))
    else:
        rope["attention_factor"] = float(scale)
    return rope


def load_gguf_tokenizer(gg: GgufFile):
    """The tokenizer in the file's `tokenizer.ggml.*` metadata (see gguf_tokenizer.py),
    as a minislm Tokenizer; None if the file has no vocabulary."""
    if "tokenizer.ggml.model" not in gg.metadata:
        return None
    from ..tokenizer import Tokenizer, bos_policy
    from .gguf_tokenizer import tokenizer_from_gguf

    try:
        backend, settings = tokenizer_from_gguf(gg.reader)
    except MinislmError as e:
        raise MinislmError(f"{gg.path}: {e}") from None
    special = {k: settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(settings.get(k), str)}
    return Tokenizer(backend, special, bos_policy(backend, settings, special), settings.get("chat_template"))


def write_hub_files(path: Path, folder: Path) -> None:
    """The files a hub folder would hold beside the weights: config.json from the
    metadata, tokenizer.json and tokenizer_config.json from the vocabulary, and
    generation_config.json with the stop ids (`minislm quantize -m file.gguf` uses them)."""
    import json

    gg = open_gguf(path)
    (folder / "config.json").write_text(json.dumps(gg.hub_config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(generation_stop_ids(gg))}) + "\n")
    if "tokenizer.ggml.model" in gg.metadata:
        from .gguf_tokenizer import tokenizer_from_gguf

        backend, settings = tokenizer_from_gguf(gg.reader)
        backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def generation_stop_ids(gg: GgufFile) -> tuple[int, ...]:
    """eos, eot and eom ids from the metadata, plus Phi-3's end-of-turn tokens by text."""
    meta = gg.metadata
    ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    tokens = meta.get("tokenizer.ggml.tokens") or []
    for text in END_OF_TURN_TOKENS:
        if text in tokens:
            ids.append(tokens.index(text))
    return tuple(dict.fromkeys(int(i) for i in ids))


# ---------------------------------------------------------------- tensors


def logical_shape(t) -> tuple[int, ...]:
    """The tensor's shape in NumPy (hub) order: GGUF lists the innermost dimension first."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def unpack(gg: GgufFile, t, index: int | None = None):
    """One tensor (or one expert of a stacked 3-D tensor) as float32, GroupedCodes or
    (K-quants) SuperBlockCodes."""
    data = t.data if index is None else t.data[index]
    kind = t.tensor_type.name
    if kind == "F32":
        return np.asarray(data, dtype=np.float32)
    if kind == "F16":
        return data.astype(np.float32)
    if kind == "BF16":
        return bf16_to_float32(np.ascontiguousarray(data).view(np.uint16))
    if data.ndim != 2:
        raise MinislmError(f"{gg.path}: tensor '{t.name}' is a {data.ndim}-D {kind} tensor; expected a matrix")
    if kind in K_QUANT_FIELDS:  # kept with its two levels of scales (kernels/kquant.py)
        q = unpack_superblocks(kind, data)
        finite = np.isfinite(q.d).all() and (q.dmin is None or np.isfinite(q.dmin).all())
    else:
        q = unpack_rows(kind, data)
        finite = np.isfinite(q.scales).all() and np.isfinite(q.offsets).all()
    if not finite:
        raise MinislmError(f"{gg.path}: tensor '{t.name}' has a scale that is not a finite number (corrupt file)")
    return q


def unpermute_heads(rows_per_head: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation for `llama` files: hub row
    (head h, half j, i) sits at file row (head h, i, half j)."""
    file_rows = np.arange(n_heads * rows_per_head).reshape(n_heads, rows_per_head // 2, 2)
    return file_rows.transpose(0, 2, 1).reshape(-1)


@dataclass(frozen=True)
class Planned:
    """How one hub tensor is made from the file, without making it yet."""

    shape: tuple[int, ...]
    sources: tuple  # GGUF tensor names it reads (for error messages)
    make: object  # () -> float32 array, GroupedCodes, SuperBlockCodes or RowStack


def weight_plan(gg: GgufFile) -> dict[str, Planned]:
    """Every tensor the decoder reads, under its hub name, with the recipe to unpack it."""
    config, T = gg.config, gg.tensors
    plan = {}

    def direct(hub, name, index=None, shape=None):
        t = need_tensor(gg, name)
        plan[hub] = Planned(shape or logical_shape(t), (name,), lambda: unpack(gg, t, index))

    def stacked(hub, names, row_orders=None):
        ts = [need_tensor(gg, n) for n in names]
        row_orders = row_orders or [None] * len(ts)
        shapes = [logical_shape(t) for t in ts]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])

        def make():
            parts = [unpack(gg, t) for t in ts]
            parts = [p if order is None else reorder_rows(p, order) for p, order in zip(parts, row_orders)]
            return RowStack(tuple(parts))

        plan[hub] = Planned(shape, tuple(names), make)

    direct("model.embed_tokens.weight", "token_embd.weight")
    direct("model.norm.weight", "output_norm.weight")
    if not config.tie_word_embeddings:
        direct("lm_head.weight", "output.weight")
    if config.model_type == "phimoe":
        direct("model.norm.bias", "output_norm.bias")
        if config.lm_head_bias:
            direct("lm_head.bias", "output.bias")
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    for i in range(config.num_hidden_layers):
        blk, hub = f"blk.{i}.", f"model.layers.{i}."
        direct(hub + "input_layernorm.weight", blk + "attn_norm.weight")
        direct(hub + "post_attention_layernorm.weight", blk + "ffn_norm.weight")
        direct(hub + "self_attn.o_proj.weight", blk + "attn_output.weight")
        if config.model_type == "phimoe":
            phimoe_layer(gg, plan, direct, blk, hub)
            continue
        if gg.arch == "llama":
            q_rows, k_rows = unpermute_heads(hd, H), unpermute_heads(hd, KV)
            stacked(hub + "self_attn.qkv_proj.weight", [blk + "attn_q.weight", blk + "attn_k.weight", blk + "attn_v.weight"], [q_rows, k_rows, None])
        elif blk + "attn_qkv.weight" in T or blk + "attn_q.weight" not in T:
            direct(hub + "self_attn.qkv_proj.weight", blk + "attn_qkv.weight")
        else:  # a phi3 file may also store q, k, v apart (same rotate-half order)
            stacked(hub + "self_attn.qkv_proj.weight", [blk + "attn_q.weight", blk + "attn_k.weight", blk + "attn_v.weight"])
        if blk + "ffn_gate.weight" in T:
            stacked(hub + "mlp.gate_up_proj.weight", [blk + "ffn_gate.weight", blk + "ffn_up.weight"])
        else:  # phi3: ffn_up already holds [gate | up]
            direct(hub + "mlp.gate_up_proj.weight", blk + "ffn_up.weight")
        direct(hub + "mlp.down_proj.weight", blk + "ffn_down.weight")
    return plan


def phimoe_layer(gg: GgufFile, plan: dict, direct, blk: str, hub: str) -> None:
    config = gg.config
    for norm, name in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
        direct(f"{hub}{norm}.bias", f"{blk}{name}.bias")
    for p, name in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
        if p != "o":
            direct(f"{hub}self_attn.{p}_proj.weight", f"{blk}{name}.weight")
        if config.attention_bias:
            direct(f"{hub}self_attn.{p}_proj.bias", f"{blk}{name}.bias")
    direct(hub + "block_sparse_moe.gate.weight", blk + "ffn_gate_inp.weight")
    for w, name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
        t = need_tensor(gg, f"{blk}{name}.weight")
        shape = logical_shape(t)
        if len(shape) != 3 or shape[0] != config.num_local_experts:
            raise MinislmError(
                f"{gg.path}: tensor '{t.name}' has shape {list(shape)}; expected ({config.num_local_experts} experts, rows, cols)"
            )
        for e in range(config.num_local_experts):
            direct(f"{hub}block_sparse_moe.experts.{e}.{w}.weight", t.name, index=e, shape=shape[1:])


def reorder_rows(stored, rows: np.ndarray):
    return take_rows(stored, rows) if isinstance(stored, (GroupedCodes, SuperBlockCodes)) else stored[rows]


def need_tensor(gg: GgufFile, name: str):
    if name not in gg.tensors:
        raise MinislmError(f"{gg.path}: missing tensor '{name}' (a {gg.arch} GGUF of this config needs it)")
    return gg.tensors[name]


CONSUMED_ELSEWHERE = ("rope_factors_long.weight", "rope_factors_short.weight")


def check_shapes(gg: GgufFile) -> None:
    """Every tensor the decoder needs, with the shape the metadata implies; nothing unknown."""
    plan = weight_plan(gg)
    for hub, shape in expected_shapes(gg.config).items():
        planned = plan[hub]
        if planned.shape != shape:
            raise MinislmError(
                f"{gg.path}: tensor '{planned.sources[0]}' has shape {list(planned.shape)}, "
                f"the GGUF metadata implies {list(shape)}"
            )
    used = {name for p in plan.values() for name in p.sources} | set(CONSUMED_ELSEWHERE)
    unknown = sorted(set(gg.tensors) - used)
    if unknown:
        raise MinislmError(f"{gg.path}: unknown tensor '{unknown[0]}' (not part of a {gg.arch} model of this config)")
