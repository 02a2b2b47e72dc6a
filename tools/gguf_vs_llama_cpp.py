"""minislm against llama.cpp on the same GGUF files: max |Δlogit|, top-1 agreement, KL.

    pip install -e '.[test]'
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36 --no-binary :all:
    python tools/gguf_vs_llama_cpp.py [--out DIR]

Builds float GGUFs from the committed fixtures (tests/fixtures, both layouts) and
from a random 256-wide Phi-3 (K-quant rows hold 256 weights), has llama.cpp's own
quantizer make Q8_0, Q4_0, Q4_K_M and Q5_K_M copies, and prints one row per file:
which tensor types it holds, whether minislm's weights equal
`gguf.quants.dequantize` bit for bit, and how far minislm's logits (exact weights,
float32 activations) are from llama.cpp's (which quantizes activations to 8 bits
before each quantized dot product), and how many leading positions the "twin" (the
exact weights times activations rounded as llama.cpp rounds them) matches llama.cpp
to 1e-4. tests/test_gguf_llama_cpp.py asserts the same.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the GGUF writer and comparison helpers the tests use


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the GGUF files here (default: a temporary folder)")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gguf-vs-llama-cpp-"))
    out.mkdir(parents=True, exist_ok=True)

    from test_gguf_llama_cpp import CASES, compare

    print("| model | layout | file | tensor types | weights == gguf.dequantize | max abs dlogit | top-1 | KL (nats) "
          "| twin: positions matching llama.cpp before the first rounding flip |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, layout, kind in CASES:
        row = compare(model, layout, kind, out)
        print(f"| {model} | {layout} | {kind} | {', '.join(row['types'])} | {row['exact']} | "
              f"{row['max_abs']:.2e} | {row['top1']:.3f} | {row['kl']:.1e} | {row['twin_prefix']}/{len(row['twin'])} |")
    print(f"\nfiles in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
