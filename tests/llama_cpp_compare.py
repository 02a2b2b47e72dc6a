"""minislm's logits next to llama.cpp's on the same GGUF file (tests and tools/gguf_vs_llama_cpp.py).

llama.cpp (through llama-cpp-python) is the engine GGUF was made for; its quantizer
(`llama_model_quantize`, what `llama-quantize` runs) writes the quantized files.
Its logits are not the exact-weight logits: it quantizes the activations too
(to 8 bits per block of 32 or 256) before each quantized dot product, and F16
matrices multiply F16-rounded activations. So the comparison has a tolerance,
measured and stated where it is used, while the weights themselves are checked
bit for bit against `gguf.quants.dequantize`.
"""

from pathlib import Path

import numpy as np


def llama_cpp_logits(path: Path, ids, n_ctx: int = 64) -> np.ndarray:
    """(T, vocab) float32 logits of every position, one batch, one thread."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=1, n_threads_batch=1, verbose=False)
    try:
        llm.eval([int(i) for i in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def quantize_with_llama_cpp(src: Path, dst: Path, kind: str) -> Path:
    """llama.cpp's own quantizer, with its default per-tensor choices for `kind`."""
    from minislm.bench.gguf_export import quantize

    quantize(src, dst, kind, threads=1)
    return dst


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
