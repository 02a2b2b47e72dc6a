"""The engines the benchmark compares, and how each one is loaded and driven.

Each engine is one row of the table. Its `load_*` function runs inside the
worker process (never in the orchestrator, so no engine's libraries or memory
touch another's) and returns a `Loaded`: the `generate(prompt, n, stats)`
function `measure.py` times, and the bytes of each weight as the engine holds
it, for the roofline. `skip_reason` decides in the orchestrator, cheaply and
without importing the engine, whether an engine can run here at all.
"""

import importlib.util
import inspect
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

GiB = 2**30


@dataclass(frozen=True)
class Engine:
    name: str  # the table's row label
    family: str  # "minislm", "llama.cpp" or "transformers"
    weights: str  # the format the engine computes with
    bytes_per_param: float  # to check RAM before starting it
    options: dict = field(default_factory=dict)  # passed to minislm.load
    decode_peer: str | None = None  # the row the issue compares our decode speed with
    # minislm only: load the folder `minislm quantize` wrote (run.py makes it) instead
    # of quantizing the f16 checkpoint at load: memory-mapped, nothing converted
    prequantized: bool = False
    # minislm only: run llama.cpp's GGUF of `weights` (the very file the llama.cpp row of
    # that type runs) through minislm's GGUF reader, its codes multiplied as they are
    gguf: bool = False


ENGINES = [
    Engine("minislm-fp32", "minislm", "fp32", 4.0),
    Engine("minislm-bf16", "minislm", "bf16", 2.0, {"quant": "bf16"}, decode_peer="llama.cpp-F16"),
    # the same words, every product's input rounded to bf16 as transformers-bf16 does
    # (--decoder-activations bf16): the row at transformers' own precision
    Engine("minislm-bf16xbf16", "minislm", "bf16", 2.0, {"quant": "bf16", "decoder_activations": "bf16"},
           decode_peer="llama.cpp-F16"),
    Engine("minislm-int4-g32", "minislm", "int4", 0.5 + 2 / 32,
           {"quant": "int4", "group_size": 32}, decode_peer="llama.cpp-Q4_0"),
    # Candidates for the "best variant": group 64 had the fastest GEMVs in
    # tools/bench_kernels.py; group 128 reads the fewest bytes (4.125 bits per weight
    # instead of 4.5). Both cost a little accuracy (docs/kernels.md).
    Engine("minislm-int4-g64", "minislm", "int4", 0.5 + 2 / 64,
           {"quant": "int4", "group_size": 64}, decode_peer="llama.cpp-Q4_0"),
    Engine("minislm-int4-g128", "minislm", "int4", 0.5 + 2 / 128,
           {"quant": "int4", "group_size": 128}, decode_peer="llama.cpp-Q4_0"),
    # the same weights from a `minislm quantize` folder: what loading costs when
    # nothing is converted (issue 13, goal 4: first token in ~1 s, RSS ~1.04x the weights)
    Engine("minislm-int4-g128-folder", "minislm", "int4", 0.5 + 2 / 128, prequantized=True),
    # a user's GGUF (Q4_0, llama.cpp's quantizer: Q6_K output layer), run by minislm
    Engine("minislm-gguf-Q4_0", "minislm", "Q4_0", 18 / 32, gguf=True, decode_peer="llama.cpp-Q4_0"),
    # Q4_K_M (what Microsoft's Phi-3-mini GGUF repository ships): Q4_K and Q6_K codes, kept
    # in their super-blocks (kernels/kquant.py): ~0.64 bytes a weight, the file's +1.8 %
    # (0.85 here: loading holds a tensor's unpacked codes beside the memory-mapped file)
    Engine("minislm-gguf-Q4_K_M", "minislm", "Q4_K_M", 0.85, gguf=True, decode_peer="llama.cpp-Q4_K_M"),
    Engine("llama.cpp-F16", "llama.cpp", "F16", 2.0),
    Engine("llama.cpp-Q8_0", "llama.cpp", "Q8_0", 34 / 32),
    Engine("llama.cpp-Q4_0", "llama.cpp", "Q4_0", 18 / 32),
    Engine("llama.cpp-Q4_K_M", "llama.cpp", "Q4_K_M", 0.61),
    Engine("transformers-bf16", "transformers", "bf16", 2.0),
]
PREFILL_PEER = "transformers-bf16"  # the prefill goal: minislm >= transformers bf16
MEMORY_MARGIN = 1.5 * GiB  # activations, KV cache, interpreter, libraries


def engine_named(name: str) -> Engine:
    for engine in ENGINES:
        if engine.name == name:
            return engine
    raise KeyError(name)


# ---------------------------------------------------------------- can it run here?


def skip_reason(engine: Engine, config: dict, n_params: int, mem_available: int) -> str | None:
    """Why `engine` cannot run on this machine, or None. Never imports the engine."""
    reason = {
        "minislm": minislm_skip_reason,
        "llama.cpp": llama_cpp_skip_reason,
        "transformers": transformers_skip_reason,
    }[engine.family](engine, config)
    if reason:
        return reason
    need = n_params * engine.bytes_per_param + MEMORY_MARGIN
    if need > mem_available:
        return f"needs ~{need / GiB:.1f} GiB of RAM, {mem_available / GiB:.1f} GiB available"
    return None


def minislm_skip_reason(engine: Engine, config: dict) -> str | None:
    """The bf16/int4 engines need `minislm.load(path, quant=..., group_size=...)` (the
    kernels branch); we look at load's signature rather than call it and guess from
    whatever error comes back."""
    from ..config import parse_config
    from ..errors import MinislmError
    from ..load import load

    try:
        parse_config(config)
    except MinislmError as e:
        return f"minislm cannot run this model yet: {str(e).split(': ', 1)[-1]}"
    accepted = inspect.signature(load).parameters
    missing = [option for option in engine.options if option not in accepted]
    if missing:
        return f"minislm.load has no {', '.join(o + '=' for o in missing)} parameter yet (kernels not merged)"
    return None


def llama_cpp_skip_reason(engine: Engine, config: dict) -> str | None:
    for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (optional peer)"
    return None


def transformers_skip_reason(engine: Engine, config: dict) -> str | None:
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (optional peer)"
    return None


# ---------------------------------------------------------------- load and drive


@dataclass
class Decoder:
    """An engine driven one forward at a time, for the context sweep (`sweep.py`).

    reset() empties the engine's KV cache; extend(ids) runs the ids after those
    already cached and returns the logits of the last one (one id: a decode step);
    kv_bytes(n) is the bytes of KV cache the engine reads in a decode step that
    leaves n positions cached, in its own cache format and attention window.
    """

    reset: object
    extend: object
    kv_bytes: object


@dataclass
class Loaded:
    generate: object  # (prompt_ids, n, stats) -> iterator of n token ids
    tensor_bytes: dict  # {tensor name: bytes as the engine stores it}
    info: dict = field(default_factory=dict)  # versions and settings worth printing
    decoder: Decoder | None = None


def kv_bytes_per_position(config: dict, bytes_per_value: float) -> float:
    """Keys and values of one position in all layers (hub config.json keys)."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * bytes_per_value


def attended(n_positions: int, window) -> int:
    """Positions a query at the end of an n-position sequence attends to (window or all)."""
    return min(n_positions, window) if window else n_positions


def uses_gguf(engine: Engine) -> bool:
    """Does this engine run one of the GGUF files the bench makes with llama.cpp?"""
    return engine.family == "llama.cpp" or engine.gguf


def load_engine(engine: Engine, checkpoint: Path, model_file: Path, threads: int, n_ctx: int) -> Loaded:
    if engine.family == "minislm":
        return load_minislm(engine, model_file if engine.gguf else checkpoint, threads)
    if engine.family == "llama.cpp":
        return load_llama_cpp(model_file, threads, n_ctx)
    return load_transformers(checkpoint, threads)


def minislm_model(engine: Engine, checkpoint: Path, threads: int):
    """minislm.load with the engine's options, BLAS and Numba limited to `threads`."""
    from ..kernels import set_threads
    from ..load import load

    set_threads(threads)  # Numba's kernels and BLAS (the fp32 matmuls)
    return load(checkpoint, **engine.options)


def load_minislm(engine: Engine, checkpoint: Path, threads: int) -> Loaded:
    import numpy as np

    import minislm.kernels as kernels
    from ..generate import generate_tokens
    from ..sampling import Sampler, SamplingSettings

    model = minislm_model(engine, checkpoint, threads)
    greedy = Sampler(SamplingSettings(temperature=0.0))

    def generate(prompt, n, stats):
        return generate_tokens(model, prompt, n, greedy, stats=stats)

    state = {}

    def reset():
        state["cache"] = model.new_cache(model.config.max_position_embeddings)

    def extend(ids):
        return model.lm_head(model.forward(np.asarray(ids), state["cache"])[-1:])[0]

    def kv_bytes(n):
        return attended(n, model.config.sliding_window) * model.new_cache(0).bytes_per_position

    info = {"numpy": version("numpy"), "numba": version("numba"), "kv_cache": model.kv_cache,
            "weights": model.weights_format.describe()}
    if hasattr(kernels, "threading_layer"):
        info["threading_layer"] = kernels.threading_layer()
    if hasattr(kernels, "kernel_paths"):  # which instructions ran: AMX, VNNI or portable
        info["kernel_paths"] = kernels.kernel_paths()
    return Loaded(generate, {name: int(w.nbytes) for name, w in model.weights.items()}, info,
                  Decoder(reset, extend, kv_bytes))


def load_llama_cpp(model_file: Path, threads: int, n_ctx: int) -> Loaded:
    """llama-cpp-python's `Llama`: one context, batch 512 (a 512-token prompt is one
    batch), no logits for prompt positions but the last, the file memory-mapped."""
    import gguf
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(model_file), n_ctx=n_ctx, n_batch=512, n_ubatch=512,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def prefill(ids):
        llm.reset()  # eval() then drops the KV cache past position 0
        llm.eval(ids)
        return last_logits()

    def step(token):
        llm.eval([token])
        return last_logits()

    from .measure import greedy_tokens

    reader = gguf.GGUFReader(model_file)
    tensor_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    config = gguf_config(reader)
    per_position = kv_bytes_per_position(config, 2)  # the default K and V cache type is F16

    def extend(ids):
        llm.eval(list(ids))
        return last_logits()

    # llama.cpp (0.3.36) turns Phi-3's sliding window off when it loads the model
    # ("Phi SWA is currently disabled"): every cached position is attended to.
    decoder = Decoder(llm.reset, extend, lambda n: attended(n, None) * per_position)
    return Loaded(
        lambda prompt, n, stats: greedy_tokens(prefill, step, prompt, n, stats),
        tensor_bytes,
        {"llama_cpp_python": llama_cpp.__version__, "tensor_types": types,
         "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()},
        decoder,
    )


def gguf_config(reader) -> dict:
    """The hub config.json keys kv_bytes_per_position needs, from a GGUF's metadata."""
    arch = reader.fields["general.architecture"].contents()
    key = {"hidden_size": "embedding_length", "num_attention_heads": "attention.head_count",
           "num_key_value_heads": "attention.head_count_kv", "num_hidden_layers": "block_count"}
    return {name: int(reader.fields[f"{arch}.{k}"].contents()) for name, k in key.items()}


def load_transformers(checkpoint: Path, threads: int) -> Loaded:
    """transformers in bf16 on the CPU, driven by a manual forward loop with its
    DynamicCache (what generate() does, minus its per-step bookkeeping), computing
    logits for the last position only (`logits_to_keep=1`), as minislm does."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    model.eval()
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns).
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    state = {}

    @torch.inference_mode()
    def run(ids, past):
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1, **{cache_arg: past})
        state["past"] = getattr(out, cache_arg)
        return out.logits[0, -1].float().numpy()

    def prefill(ids):
        return run(ids, None)

    def step(token):
        return run([token], state["past"])

    from .measure import greedy_tokens

    def reset():
        state["past"] = None

    def extend(ids):
        return run(list(ids), state.get("past"))

    config = model.config.to_dict()
    per_position = kv_bytes_per_position(config, 2)  # bf16, the model's dtype
    # DynamicCache keeps sliding_window - 1 positions of a sliding-window layer (Phi-3).
    decoder = Decoder(reset, extend, lambda n: attended(n, config.get("sliding_window")) * per_position)
    tensor_bytes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    return Loaded(
        lambda prompt, n, stats: greedy_tokens(prefill, step, prompt, n, stats),
        tensor_bytes,
        {"torch": torch.__version__, "transformers": transformers.__version__,
         "attention": model.config._attn_implementation},
        decoder,
    )
