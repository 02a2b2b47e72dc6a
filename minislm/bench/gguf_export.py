"""The same weights as a GGUF file for llama.cpp, so both engines read one model.

llama.cpp's own converter (convert_hf_to_gguf.py) needs the tokenizer files of
a real download. We write the file ourselves with the `gguf` package instead:
the random safetensors checkpoint's tensors under llama.cpp's names, the
hyper-parameters from config.json, and the tokenizer metadata copied from
llama.cpp's Phi-3 vocabulary file `ggml-vocab-phi-3.gguf` (shipped in the
llama-cpp-python source package under vendor/llama.cpp/models/; the bench
downloads that package with pip into its cache the first time, `fetch_vocab`). Q8_0 and
Q4_0 are then made from the F16 file by llama.cpp's own quantizer, with its
default choices (e.g. it keeps `output.weight` at Q6_K for Q4_0), as a user's
`llama-quantize` would.

Both optional packages (`gguf`, `llama_cpp`) are imported inside the functions
that need them: the runtime never imports this module.

Names (phi3, llama.cpp src/models/phi3.cpp):
    model.embed_tokens.weight              token_embd.weight
    model.layers.N.input_layernorm         blk.N.attn_norm        (f32: llama.cpp wants 1-D norms in f32)
    model.layers.N.self_attn.qkv_proj      blk.N.attn_qkv         rows [q | k | v], as in the hub file
    model.layers.N.self_attn.o_proj        blk.N.attn_output
    model.layers.N.post_attention_layernorm blk.N.ffn_norm        (f32)
    model.layers.N.mlp.gate_up_proj        blk.N.ffn_up           2F rows [gate | up]: ggml_swiglu
                                                                  applies silu to the first half
    model.layers.N.mlp.down_proj           blk.N.ffn_down
    model.norm, lm_head                    output_norm (f32), output
phimoe (src/models/phimoe.cpp) adds norm and projection biases, separate
attn_q/k/v, the router `ffn_gate_inp` (f32, as convert_hf_to_gguf keeps it) and
the experts stacked into 3-D tensors: w1 -> ffn_gate_exps, w3 -> ffn_up_exps,
w2 -> ffn_down_exps, each (experts, rows, cols).
"""

import shutil
import tarfile
from pathlib import Path

import numpy as np

from ..errors import MinislmError
from ..weights import read_checkpoint

VOCAB_FILE = "ggml-vocab-phi-3.gguf"
QUANT_TYPES = ("Q8_0", "Q4_0")  # made from the F16 file by llama.cpp's quantizer

PHI3_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
PHIMOE_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "input_layernorm.bias": "attn_norm.bias",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "post_attention_layernorm.bias": "ffn_norm.bias",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
}


def gguf_path(checkpoint: Path, weights: str) -> Path:
    """Where the GGUF of `weights` (F16, Q8_0, Q4_0) for this checkpoint is cached."""
    return Path(checkpoint) / f"ggml-model-{weights}.gguf"


def gguf_tensors(config: dict, tensors: dict) -> list[tuple]:
    """[(gguf name, numpy shape, dtype, function returning the array)] in file order.
    Arrays are made one at a time as they are written, so exporting never holds
    more than one tensor (one stack of experts) in memory."""
    moe = config["model_type"] == "phimoe"
    layer_names = PHIMOE_NAMES if moe else PHI3_NAMES
    hub_to_gguf = {hub: name for hub, name in GLOBAL_NAMES.items() if hub in tensors}
    for i in range(config["num_hidden_layers"]):
        hub_to_gguf.update({f"model.layers.{i}.{hub}": f"blk.{i}.{name}" for hub, name in layer_names.items()})
    plan = []
    for hub, name in hub_to_gguf.items():
        stored = tensors[hub]
        # 1-D norms and biases, and the MoE router, stay f32; matrices are f16.
        f32 = stored.array.ndim == 1 or hub.endswith("block_sparse_moe.gate.weight")
        dtype = np.float32 if f32 else np.float16
        plan.append((name, stored.array.shape, dtype, lambda s=stored, d=dtype: as_array(s, d)))
    for i in range(config["num_hidden_layers"] if moe else 0):
        for w, name in EXPERT_NAMES.items():
            parts = [tensors[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"]
                     for e in range(config["num_local_experts"])]
            shape = (len(parts), *parts[0].array.shape)
            plan.append((f"blk.{i}.{name}", shape, np.float16, lambda p=parts: np.stack([as_array(t, np.float16) for t in p])))
    return plan


def as_array(stored, dtype) -> np.ndarray:
    values = stored.float32() if dtype == np.float32 else stored.array
    return np.ascontiguousarray(values, dtype=dtype)


def hyperparameters(config: dict) -> dict:
    """config.json -> llama.cpp's `<arch>.*` keys (as convert_hf_to_gguf.py writes them)."""
    arch = config["model_type"]
    hd = config["hidden_size"] // config["num_attention_heads"]
    keys = {
        "context_length": config["max_position_embeddings"],
        "rope.scaling.original_context_length": config.get("original_max_position_embeddings", 4096),
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "block_count": config["num_hidden_layers"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "rope.dimension_count": hd,
    }
    if arch == "phimoe":
        keys["expert_count"] = config["num_local_experts"]
        keys["expert_used_count"] = config["num_experts_per_tok"]
    else:
        keys["attention.sliding_window"] = config.get("sliding_window") or 0
    return {f"{arch}.{k}": v for k, v in keys.items()}


def write_gguf(checkpoint: Path, vocab: Path) -> Path:
    """Write `ggml-model-F16.gguf` into the checkpoint folder (as .partial, renamed when complete)."""
    import gguf

    from ..config import read_json

    checkpoint = Path(checkpoint)
    config = read_json(checkpoint / "config.json")
    tensors = read_checkpoint(checkpoint)
    plan = gguf_tensors(config, tensors)
    out = gguf_path(checkpoint, "F16")
    tmp = out.with_name(out.name + ".partial")

    writer = gguf.GGUFWriter(tmp, config["model_type"])
    writer.add_name(checkpoint.name)
    for key, value in hyperparameters(config).items():
        writer.add_uint32(key, int(value))
    writer.add_float32(f"{config['model_type']}.attention.layer_norm_rms_epsilon", float(config["rms_norm_eps"]))
    writer.add_float32(f"{config['model_type']}.rope.freq_base", float(config.get("rope_theta", 10000.0)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    copy_tokenizer(gguf.GGUFReader(vocab), writer)

    for name, shape, dtype, _ in plan:
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, _, make in plan:
        writer.write_tensor_data(make())
    writer.close()
    tmp.rename(out)
    return out


def copy_tokenizer(reader, writer) -> None:
    """Every `tokenizer.*` key of llama.cpp's vocabulary file, value and type unchanged."""
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def quantize(src: Path, dst: Path, kind: str, threads: int) -> None:
    """llama.cpp's quantizer, through the bindings (what `llama-quantize src dst Q4_0` does)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    tmp = Path(str(dst) + ".partial")
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if status != 0:
        raise MinislmError(f"llama.cpp could not quantize {src} to {kind} (status {status})")
    tmp.rename(dst)


def find_vocab(cache_dir: Path) -> Path | None:
    """llama.cpp's Phi-3 vocabulary: in the cache, or taken out of a llama-cpp-python
    source package lying in the cache (`fetch_vocab` puts one there)."""
    cache_dir = Path(cache_dir)
    target = cache_dir / VOCAB_FILE
    if target.is_file():
        return target
    for sdist in sorted(cache_dir.glob("llama_cpp_python-*.tar.gz")):
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("models/" + VOCAB_FILE) and m.isfile()), None)
            if member is not None:
                partial = target.with_name(target.name + ".partial")
                with tar.extractfile(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.rename(target)
                return target
    return None


def fetch_vocab(cache_dir: Path) -> Path:
    """Download the source package of the installed llama-cpp-python (~77 MB, with pip,
    no build, no dependencies) into the cache and take the vocabulary out of it.
    Raises MinislmError saying what to do when that fails (no network, no pip)."""
    import subprocess
    import sys
    from importlib.metadata import version

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    package = f"llama-cpp-python=={version('llama-cpp-python')}"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                           package, "-d", str(cache_dir)], capture_output=True, text=True)
    vocab = find_vocab(cache_dir)
    if vocab is None:
        last = (done.stderr.strip().splitlines() or ["no error printed"])[-1]
        raise MinislmError(f"could not fetch {VOCAB_FILE} from the {package} source package ({last}); "
                           f"{vocab_hint(cache_dir)}")
    return vocab


def vocab_hint(cache_dir: Path) -> str:
    from importlib.metadata import version

    return (f"put {VOCAB_FILE} in {cache_dir}, or llama-cpp-python's source package "
            f"(pip download --no-deps --no-binary :all: llama-cpp-python=={version('llama-cpp-python')} "
            f"-d {cache_dir}), and the bench takes the file out of it")
