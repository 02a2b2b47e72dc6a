"""minislm's logits next to llama.cpp's on the same GGUF file (tests and tools/gguf_vs_llama_cpp.py).

llama.cpp (through llama-cpp-python) is the engine GGUF was made for; its quantizer
(`llama_model_quantize`, what `llama-quantize` runs) writes the quantized files.
Its logits are not the exact-weight logits: it quantizes the activations too
(to 8 bits per block of 32 or 256) before each quantized dot product, and F16
matrices multiply F16-rounded activations. llama.cpp allocates at least 256
positions of context, and chooses LongRoPE's factors from that size (long, once
it exceeds the original context), where transformers and minislm choose them
from the sequence length. So the comparison has a tolerance,
measured and stated where it is used, while the weights themselves are checked
bit for bit against `gguf.quants.dequantize`.
"""

import ctypes
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from optional import require_module


def _quiet(level, text, user_data):
    pass


def quiet_callback():
    L = require_module("llama_cpp")

    return L.llama_log_callback(_quiet)


QUIET = None  # made on first use (importing llama_cpp is optional)


def llama_cpp_logits(path: Path, ids, n_ctx: int = 256, one_at_a_time: bool = False) -> np.ndarray:
    """(T, vocab) float32 logits of every position through llama.cpp's C API: the
    prompt as one batch, or (`one_at_a_time`) token by token through the KV cache as
    in generation. One thread, a float32 KV cache and no flash attention (the default F16 cache, or
    flash attention's F16 arithmetic, alone moves these logits by ~4e-3).

    `use_extra_bufts = False` keeps llama.cpp on its plain CPU kernels: with
    GGML_NATIVE on a CPU that reports AMX, it otherwise moves quantized matrices to
    its AMX buffer type, whose tile instructions die with SIGILL on the VMs we test on.
    """
    L = require_module("llama_cpp")

    global QUIET
    QUIET = QUIET or quiet_callback()  # kept alive: llama.cpp calls it later
    L.llama_log_set(QUIET, None)
    L.llama_backend_init()
    model_params = L.llama_model_default_params()
    model_params.use_extra_bufts = False
    model = L.llama_model_load_from_file(str(path).encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    params = L.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_threads = params.n_threads_batch = 1
    params.type_k = params.type_v = L.GGML_TYPE_F32
    params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED  # its CPU kernel rounds K.Q to F16
    ctx = L.llama_init_from_model(model, params)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(len(ids), 0, 1)
    steps = [[i] for i in range(len(ids))] if one_at_a_time else [list(range(len(ids)))]
    rows = []
    try:
        for positions in steps:
            for j, pos in enumerate(positions):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = int(ids[pos]), pos, 1, 1
                batch.seq_id[j][0] = 0
            batch.n_tokens = len(positions)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on {path}")
            rows += [np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, j), shape=(n_vocab,)).copy()
                     for j in range(len(positions))]
        return np.stack(rows).astype(np.float32)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)


@contextmanager
def llama_cpp_vocab(path: Path):
    """(llama_cpp, vocab) of a GGUF file loaded vocab-only by llama.cpp's C API."""
    L = require_module("llama_cpp")

    global QUIET
    QUIET = QUIET or quiet_callback()
    L.llama_log_set(QUIET, None)
    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the vocabulary of {path}")
    try:
        yield L, L.llama_model_get_vocab(model)
    finally:
        L.llama_model_free(model)


def llama_cpp_tokenize(path: Path, texts: list[str], parse_special: bool = False) -> list[list[int]]:
    """llama.cpp's own tokenizer on a GGUF file's vocabulary (loaded vocab-only), no BOS added."""
    with llama_cpp_vocab(path) as (L, vocab):
        result = []
        for text in texts:
            data = text.encode("utf-8")
            room = (L.llama_token * (len(data) + 8))()
            n = L.llama_tokenize(vocab, data, len(data), room, len(room), False, parse_special)
            result.append(list(room[:n]))
        return result


def llama_cpp_detokenize(path: Path, id_lists: list[list[int]]) -> list[str]:
    """llama.cpp's bytes for each id list, decoded as UTF-8 with U+FFFD for broken
    characters. We call llama_token_to_piece with room for any piece: the Python
    wrapper's Llama.detokenize gives each token only 32 bytes and returns nothing
    for longer ones (cl100k has an 82-byte comment-rule token)."""
    with llama_cpp_vocab(path) as (L, vocab):
        texts = []
        for ids in id_lists:
            data = b""
            for token in ids:
                room = ctypes.create_string_buffer(1024)
                n = L.llama_token_to_piece(vocab, token, room, len(room), 0, True)
                data += room.raw[:n]
            texts.append(data.decode("utf-8", errors="replace"))
        return texts


def quantize_with_llama_cpp(src: Path, dst: Path, kind: str) -> Path:
    """llama.cpp's own quantizer, with its default per-tensor choices for `kind`."""
    from minislm.bench.gguf_export import quantize

    quantize(src, dst, kind, threads=1)
    return dst


# ---------------------------------------------------------------- llama.cpp's activation rounding


def q8_0_activations(x: np.ndarray) -> np.ndarray:
    """What llama.cpp multiplies Q4_0/Q5_x/Q8_0 weights by: x in blocks of 32, each
    scaled to int8 by 127 / max|x| and rounded; the block scale stored as fp16."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(blocks).max(1)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax != 0, np.float32(1) / (amax / np.float32(127)), np.float32(0)).astype(np.float32)
    return (np.rint(blocks * inverse[:, None]) * d[:, None]).reshape(x.shape)  # ties to even, as _mm256_round_ps


def q8_k_activations(x: np.ndarray) -> np.ndarray:
    """What llama.cpp multiplies K-quant weights by (quantize_row_q8_K_ref): blocks of
    256, scale -127 / (the value of largest magnitude), float32 scale kept."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    peak = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    out = np.zeros_like(blocks)
    nonzero = peak != 0
    scale = (np.float32(-127.0) / peak[nonzero]).astype(np.float32)
    codes = np.minimum(np.rint(scale[:, None] * blocks[nonzero]), 127)
    out[nonzero] = codes * (np.float32(1) / scale)[:, None]
    return out.reshape(x.shape)


def f16_activations(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


ACTIVATION_ROUNDING = {"Q8_0": q8_0_activations, "Q4_0": q8_0_activations, "Q4_1": q8_0_activations,
                       "Q5_0": q8_0_activations, "Q5_1": q8_0_activations, "Q4_K": q8_k_activations,
                       "Q5_K": q8_k_activations, "Q6_K": q8_k_activations, "F16": f16_activations}


class RoundedActivations:
    """A float32 matrix whose row blocks multiply activations rounded as llama.cpp
    rounds them for the type each block had in the file."""

    def __init__(self, w: np.ndarray, parts: list[tuple[int, str]]):
        self.w, self.parts, self.shape = w, parts, w.shape

    def matmul(self, x: np.ndarray) -> np.ndarray:
        outs, start = [], 0
        for rows, kind in self.parts:
            round_x = ACTIVATION_ROUNDING.get(kind, lambda v: v)
            outs.append(round_x(x) @ self.w[start : start + rows].T)
            start += rows
        return np.concatenate(outs, axis=-1)


def with_llama_cpp_activations(model, path: Path):
    """The same exact weights, multiplied the way llama.cpp's single-token path does.
    If minislm's weights are llama.cpp's, this matches llama.cpp's decode logits to
    float32 summation noise: the test of the whole weight path, end to end."""
    import gguf

    from minislm.formats.gguf import open_gguf, weight_plan
    from minislm.runtime import Model

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    weights = dict(model.weights)
    for name, planned in weight_plan(open_gguf(path)).items():
        if name == "model.embed_tokens.weight" or len(planned.shape) != 2:
            continue  # the embedding is looked up, not multiplied
        parts = [(int(tensors[s].shape[1]), tensors[s].tensor_type.name) for s in planned.sources]
        if len(parts) == 1:
            parts = [(planned.shape[0], parts[0][1])]  # (one expert of a stacked tensor)
        weights[name] = RoundedActivations(model.weights[name], parts)
    return Model(model.config, weights, kv_cache=model.kv_cache)


def metrics(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """max |Δlogit|, top-1 agreement over positions, mean KL(llama.cpp || minislm) in nats."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(theirs), log_softmax(ours)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {
        "max_abs": float(np.abs(ours - theirs).max()),
        "top1": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        "kl": float(kl.mean()),
    }


def prompt_ids(vocab_size: int, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab_size, length)
