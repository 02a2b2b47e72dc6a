"""llama.cpp's own logits for a model, quantized by llama.cpp's own quantizer.

    python tools/llama_cpp_logits.py --kinds Q4_0,Q4_K_M --out DIR      # the shipped model
    python tools/logits_kl.py --candidate-logits DIR/Q4_0.npy --candidate-logits DIR/Q4_K_M.npy

Needs llama-cpp-python (built from source, see docs/performance.md) and gguf. Writes
the model (default: the shipped Shakespeare model) as an F32 GGUF with the same
writer the tests use (tests/gguf_files.py), has llama.cpp quantize it to each kind
with its default per-tensor choices (Q4_0 keeps the output layer at Q6_K, Q4_K_M
mixes Q4_K/Q6_K and falls back to Q5_0 where a row is not a multiple of 256), and
saves llama.cpp's logits of the same token ids `tools/logits_kl.py` uses (the text's
first --tokens ids, BOS first) as DIR/KIND.npy: llama.cpp's whole arithmetic,
activation rounding and all, one thread, a float32 KV cache. `F32.npy` is written
too: llama.cpp on the unquantized file, the baseline of the comparison.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the GGUF writer and llama.cpp helpers the tests use

import minislm  # noqa: E402
from minislm.load import BUNDLED_MODEL  # noqa: E402

HELDOUT = ROOT / "tests" / "data" / "shakespeare_heldout.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    ap.add_argument("--kinds", default="Q4_0,Q4_K_M")
    ap.add_argument("--text", default=str(HELDOUT))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from gguf_files import write_gguf
    from llama_cpp_compare import llama_cpp_logits, quantize_with_llama_cpp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = minislm.load(args.model)
    ids = model.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_bos=True)[: args.tokens]
    np.save(out / "ids.npy", np.asarray(ids))
    f32 = write_gguf(out / "F32.gguf", Path(args.model), "phi3", "F32")
    files = {"F32": f32}
    for kind in filter(None, args.kinds.split(",")):
        files[kind] = quantize_with_llama_cpp(f32, out / f"{kind}.gguf", kind)
    n_ctx = max(256, len(ids))
    for kind, path in files.items():
        logits = llama_cpp_logits(path, ids, n_ctx=n_ctx)
        np.save(out / f"{kind}.npy", logits)
        print(f"{out / (kind + '.npy')}: llama.cpp {kind}, {path.stat().st_size:,} bytes of GGUF")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
