"""Write tiny GGUF files from safetensors checkpoints, for the tests (and tools/gguf_vs_llama_cpp.py).

Written from llama.cpp's conventions (convert_hf_to_gguf.py, src/models/phi3.cpp and
phimoe.cpp), independently of minislm's reader: its own name table, its own copy of
the converter's q/k row permutation for `llama` files, its own metadata keys. The
`gguf` package's writer lays the file out and its quantizers (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, BF16) make the blocks; K-quants come from llama.cpp's own quantizer.
"""

import json
import math
from pathlib import Path

import gguf
import numpy as np

from minislm.config import parse_config
from minislm.weights import expected_shapes, read_checkpoint, save_safetensors

PHI3_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
PHIMOE_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "input_layernorm.bias": "attn_norm.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "post_attention_layernorm.bias": "ffn_norm.bias",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    **{f"self_attn.{p}_proj.{kind}": f"attn_{name}.{kind}" for p, name in
       (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for kind in ("weight", "bias")},
}
GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: per head, rows [first half | second half]
    become interleaved pairs (row 2i + j of the file = row j * hd/2 + i of the hub)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model_dir: Path, layout: str) -> tuple[dict, dict]:
    """(config.json, {gguf name: float32 array}) in llama.cpp's names for `layout`."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hub = {name: t.float32() for name, t in read_checkpoint(model_dir).items()}
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or config["hidden_size"] // H
    F = config["intermediate_size"]
    out = {GLOBAL[n]: a for n, a in hub.items() if n in GLOBAL}
    for i in range(config["num_hidden_layers"]):
        layer, blk = f"model.layers.{i}.", f"blk.{i}."
        table = PHIMOE_LAYER if layout == "phimoe" else PHI3_LAYER
        out.update({blk + g: hub[layer + h] for h, g in table.items() if layer + h in hub})
        if layout == "phimoe":
            E = config["num_local_experts"]
            for w, name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                out[f"{blk}{name}.weight"] = np.stack(
                    [hub[f"{layer}block_sparse_moe.experts.{e}.{w}.weight"] for e in range(E)]
                )
            continue
        qkv, gate_up = hub[layer + "self_attn.qkv_proj.weight"], hub[layer + "mlp.gate_up_proj.weight"]
        if layout == "phi3":
            out[blk + "attn_qkv.weight"], out[blk + "ffn_up.weight"] = qkv, gate_up
        else:  # llama: what early community conversions of Phi-3 hold
            q, k, v = np.split(qkv, [H * hd, H * hd + KV * hd])
            out[blk + "attn_q.weight"] = llama_cpp_permute(q, H)
            out[blk + "attn_k.weight"] = llama_cpp_permute(k, KV)
            out[blk + "attn_v.weight"] = v
            out[blk + "ffn_gate.weight"], out[blk + "ffn_up.weight"] = gate_up[:F], gate_up[F:]
    return config, out


def metadata(config: dict, layout: str) -> dict:
    """The `<arch>.*` keys convert_hf_to_gguf writes for Phi-3 / PhiMoE."""
    H = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // H
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    keys = {
        "context_length": ("uint32", config["max_position_embeddings"]),
        "embedding_length": ("uint32", config["hidden_size"]),
        "feed_forward_length": ("uint32", config["intermediate_size"]),
        "block_count": ("uint32", config["num_hidden_layers"]),
        "attention.head_count": ("uint32", H),
        "attention.head_count_kv": ("uint32", config.get("num_key_value_heads") or H),
        "attention.layer_norm_rms_epsilon": ("float32", config["rms_norm_eps"]),
        "rope.dimension_count": ("uint32", int(partial * hd)),
        "rope.freq_base": ("float32", rope.get("rope_theta", config.get("rope_theta", 10000.0))),
    }
    if layout != "llama":
        original = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        keys["rope.scaling.original_context_length"] = ("uint32", original or config["max_position_embeddings"])
        keys["attention.sliding_window"] = ("uint32", config.get("sliding_window") or 0)
    if layout == "phimoe":
        keys["expert_count"] = ("uint32", config["num_local_experts"])
        keys["expert_used_count"] = ("uint32", config["num_experts_per_tok"])
    if rope.get("long_factor"):
        scale = config["max_position_embeddings"] / keys["rope.scaling.original_context_length"][1]
        factor = math.sqrt(1 + math.log(scale) / math.log(keys["rope.scaling.original_context_length"][1])) if scale > 1 else 1.0
        keys["rope.scaling.attn_factor"] = ("float32", factor)  # the converter's formula, PhiMoE too
    return {f"{'llama' if layout == 'llama' else layout}.{k}": v for k, v in keys.items()}


def add_vocab(writer, vocab_size: int, bos: int = 1, eos: int = 2) -> None:
    """A made-up SentencePiece vocabulary of the right size, so llama.cpp can load the file."""
    writer.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(3, vocab_size)]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types([2, 3, 3] + [1] * (vocab_size - 3))
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)


def copy_vocab(writer, vocab_file: Path) -> None:
    """Every `tokenizer.*` key of another GGUF (llama.cpp's ggml-vocab-phi-3.gguf), as is.
    Read with minislm's reader (tests/test_gguf_file.py holds it to gguf-py's), which
    takes a second where gguf-py's takes a minute on a 200,000-token vocabulary."""
    from minislm.formats.gguf_file import read_gguf

    for key, field in read_gguf(vocab_file).fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def quantize(name: str, array: np.ndarray, kind: str):
    """(data, raw dtype) for the writer: 1-D tensors stay F32, as llama.cpp keeps them."""
    if array.ndim == 1 or kind == "F32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if kind == "F16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[kind]
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def write_gguf(path: Path, model_dir: Path, layout: str = "phi3", kind="F32", drop_keys=(), extra_keys=None,
               tensors: dict | None = None, architecture: str | None = None, vocab_from: Path | None = None) -> Path:
    """A GGUF of the checkpoint in `model_dir`: matrices as `kind` (or kind(name) -> type),
    everything else F32. `drop_keys`/`extra_keys`/`architecture` change the metadata (for bad-file tests);
    `tensors` replaces the tensor dict (name -> (data, raw dtype or None)); `vocab_from`
    copies a real vocabulary (and chat template) from another GGUF."""
    config, arrays = gguf_tensors(model_dir, layout)
    arch = "llama" if layout == "llama" else layout
    writer = gguf.GGUFWriter(str(path), architecture or arch)
    writer.add_name(Path(model_dir).name)
    for key, (vtype, value) in metadata(config, layout).items():
        if key.split(".", 1)[1] not in drop_keys:
            getattr(writer, f"add_{vtype}")(key, value)
    for key, (vtype, value) in (extra_keys or {}).items():
        getattr(writer, f"add_{vtype}")(key, value)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if vocab_from is not None:
        copy_vocab(writer, vocab_from)
    else:
        add_vocab(writer, config["vocab_size"], config.get("bos_token_id") or 1, config.get("eos_token_id") or 2)
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("long_factor"):
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    if tensors is None:
        tensors = {name: quantize(name, a, kind(name) if callable(kind) else kind) for name, a in arrays.items()}
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def wide_checkpoint(folder, seed=0, hidden=256, vocab=320, eos=2):
    """A random Phi-3 256 wide (K-quant rows hold 256 weights), 2 layers, GQA."""
    config = dict(model_type="phi3", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                  sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=eos)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(parse_config(config)).items():
        if len(shape) == 1:
            tensors[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    folder.mkdir()
    save_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference_weights(path, config) -> dict:
    """Every hub weight from the file, unpacked by the `gguf` package (independently of
    minislm): the reader's raw blocks through `gguf.quants.dequantize`, mapped to hub
    names by the tests' own table (phi3 and llama layouts)."""
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    H, KV, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    weights = {hub: raw[name] for hub, name in GLOBAL.items() if name in raw}
    for i in range(config.num_hidden_layers):
        layer, blk = f"model.layers.{i}.", f"blk.{i}."
        weights.update({layer + h: raw[blk + g] for h, g in PHI3_LAYER.items()})
        if blk + "attn_qkv.weight" in raw:
            weights[layer + "self_attn.qkv_proj.weight"] = raw[blk + "attn_qkv.weight"]
            weights[layer + "mlp.gate_up_proj.weight"] = raw[blk + "ffn_up.weight"]
        else:  # llama: invert the permutation by applying it to row numbers
            q_rows = np.argsort(llama_cpp_permute(np.arange(H * hd), H))
            k_rows = np.argsort(llama_cpp_permute(np.arange(KV * hd), KV))
            q, k = raw[blk + "attn_q.weight"][q_rows], raw[blk + "attn_k.weight"][k_rows]
            weights[layer + "self_attn.qkv_proj.weight"] = np.concatenate([q, k, raw[blk + "attn_v.weight"]])
            weights[layer + "mlp.gate_up_proj.weight"] = np.concatenate([raw[blk + "ffn_gate.weight"], raw[blk + "ffn_up.weight"]])
    return weights


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode, written out again from its definition: printable
    Latin-1 bytes stand for themselves, the other 68 take U+0100.. in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(0x100 + i) for i, b in enumerate(others)}}


def write_gpt2_vocab(writer, ranks: dict, special: dict, pre: str, vocab_size: int, bos: int, eos: int,
                     chat_template: str | None = None) -> None:
    """A byte-level BPE vocabulary as convert_hf_to_gguf's _set_vocab_gpt2 writes one from a
    hub tokenizer: every embedding row named ("[PAD{i}]" UNUSED where no token is), the
    `<|...|>` tokens CONTROL, merges as "left right" (every split of each token, ranked by
    the token: what transformers' TikTokenConverter puts in a tokenizer.json)."""
    alphabet = gpt2_byte_alphabet()
    text = {rank: "".join(alphabet[b] for b in token) for token, rank in ranks.items()}
    by_id = {**text, **{i: s for s, i in special.items()}}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [gguf.TokenType.NORMAL if i in text else gguf.TokenType.CONTROL if i in by_id else gguf.TokenType.UNUSED
             for i in range(vocab_size)]
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        merges += [f"{text[ranks[token[:c]]]} {text[ranks[token[c:]]]}" for c in range(1, len(token))
                   if token[:c] in ranks and token[c:] in ranks]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def write_vocab_only(path: Path, arch: str = "phi3", **vocab) -> Path:
    """A metadata-only GGUF (no tensors), as llama.cpp's own ggml-vocab-*.gguf files are."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("vocab only")
    write_gpt2_vocab(writer, **vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
