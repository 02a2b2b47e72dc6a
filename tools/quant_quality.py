"""How much int4 changes a model's predictions: top-1 agreement and KL divergence.

    python tools/quant_quality.py                 # fixtures + the shipped Shakespeare model
    python tools/quant_quality.py --markdown      # the same, as the table in docs/kernels.md
    python tools/quant_quality.py --shipped-only  # only the Shakespeare rows

For each golden fixture the baseline is transformers' own float32 logits, stored
in tests/fixtures/*/reference.safetensors; for the Shakespeare model it is
minislm's float32 forward on the held-out excerpt (equal to transformers' to
1e-4, see tests/test_shipped_model.py), where we also report the perplexity
change, the figure that matters for text. Per variant and int4 setting:

- top-1: the fraction of positions whose most likely next token is unchanged;
- KL: mean over positions of KL(p_fp32 || p_int4) in nats, how much probability
  mass moved, even where the argmax did not change.

Read the fixture rows with care: random weights give near-flat next-token
distributions (logits of standard deviation ~1 over a few hundred ids; the top
token has ~3 % of the probability and leads the next by ~0.3), so any logit
error of a few tenths flips the argmax while moving little probability mass.
Their top-1 agreement measures how fragile random models are; the trained
Shakespeare model is the figure that says what int4 does to text.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minislm  # noqa: E402
from minislm.load import BUNDLED_MODEL  # noqa: E402
from minislm.kernels import set_threads  # noqa: E402
from minislm.perplexity import log_softmax, score_text  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
HELDOUT = ROOT / "tests" / "data" / "shakespeare_heldout.txt"
# (group size, symmetric, output layer bits): every int4 variant minislm offers.
SETTINGS = [(32, True, 8), (32, False, 8), (64, True, 8), (64, False, 8), (128, True, 8), (128, False, 8),
            (32, True, 4), (128, True, 4)]
KL_TOKENS = 256  # the comparison: mean KL over the first 256 held-out tokens (one forward)


def compare(reference_logits: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || other) in nats) over the rows."""
    p_log = log_softmax(reference_logits)  # (T, V) float64
    q_log = log_softmax(logits)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)  # (T,)
    agree = (reference_logits.argmax(-1) == logits.argmax(-1)).mean()
    return float(agree), float(kl.mean())


def fixture_rows():
    for folder in sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file()):
        reference = load_file(folder / "reference.safetensors")
        cases = sorted({k.split(".")[1] for k in reference if k.startswith("case.")})
        for group_size, symmetric, output_bits in SETTINGS:
            model = minislm.load(folder, quant="int4", group_size=group_size, symmetric=symmetric,
                                 output_bits=output_bits)
            agree, kl, n = [], [], 0
            for case in cases:
                ref = reference[f"case.{case}.logits"]
                a, k = compare(ref, model.logits(reference[f"case.{case}.input_ids"]))
                agree.append(a * len(ref))
                kl.append(k * len(ref))
                n += len(ref)
            yield dict(model=folder.name, variant=variant_name(group_size, symmetric, output_bits),
                       positions=n, top1=sum(agree) / n, kl=sum(kl) / n, ppl=None, kl256=None, nbytes=None)


def variant_name(group_size, symmetric, output_bits):
    return f"g{group_size} {'sym' if symmetric else 'asym'}, output {output_bits}-bit"


def matrix_bytes(model) -> int:
    return sum(int(w.nbytes) for w in model.weights.values() if len(w.shape) == 2)


def llama_cpp_q4_0_rule(model):
    """The shipped model with llama.cpp's Q4_0 quantization, as gguf-py (the
    llama.cpp project's Python package) writes it, entered through
    Int4Weight.from_codes; the output layer (the tied embedding) at Q8_0, the
    closest type gguf-py can write: llama.cpp's own quantizer picks Q6_K there,
    which is coarser, so this row flatters llama.cpp slightly. None if gguf is
    not installed."""
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        return None
    from minislm.kernels import Int4Weight, Int8Weight
    from minislm.quantize import output_layer

    def blocks(w, kind, block_bytes):
        n, k = w.shape
        raw = quants.quantize(w, kind).reshape(n, k // 32, block_bytes)
        d = raw[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)   # fp16 scale first
        return d, raw[:, :, 2:]

    for name, w in list(model.weights.items()):
        if len(w.shape) != 2 or name.endswith("block_sparse_moe.gate.weight"):
            continue
        w = np.ascontiguousarray(w, dtype=np.float32)
        if name == output_layer(model.config):   # Q8_0: d, then 32 int8
            d, q = blocks(w, GGMLQuantizationType.Q8_0, 34)
            codes = (q.view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(w.shape)
            model.weights[name] = Int8Weight.from_codes(codes, d, 32, zero=128)
        else:                                      # Q4_0: d, then byte j = q[j] | q[j+16] << 4
            d, q = blocks(w, GGMLQuantizationType.Q4_0, 18)
            codes = np.concatenate([q & 15, q >> 4], axis=2).reshape(w.shape)
            model.weights[name] = Int4Weight.from_codes(codes, d, 32, zero=8)
    return model


def shakespeare_rows():
    text = HELDOUT.read_text(encoding="utf-8")
    fp32 = minislm.load(BUNDLED_MODEL)
    window = fp32.config.max_position_embeddings
    ids = fp32.tokenizer.encode(text, add_bos=True)
    chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]  # disjoint windows
    reference = [fp32.logits(c) for c in chunks]
    reference256 = fp32.logits(ids[:KL_TOKENS])
    base = score_text(fp32, text)

    def row(variant, model):
        pairs = [compare(r, model.logits(c)) for r, c in zip(reference, chunks)]
        weights = [len(c) for c in chunks]
        scored = score_text(model, text)
        return dict(model="shakespeare (held-out excerpt)", variant=variant, positions=sum(weights),
                    top1=float(np.average([p[0] for p in pairs], weights=weights)),
                    kl=float(np.average([p[1] for p in pairs], weights=weights)),
                    kl256=compare(reference256, model.logits(ids[:KL_TOKENS]))[1],
                    ppl=(base.token_perplexity, scored.token_perplexity), nbytes=matrix_bytes(model))

    for group_size, symmetric, output_bits in SETTINGS:
        model = minislm.load(BUNDLED_MODEL, quant="int4", group_size=group_size, symmetric=symmetric,
                             output_bits=output_bits)
        yield row(variant_name(group_size, symmetric, output_bits), model)
    q4_0 = llama_cpp_q4_0_rule(minislm.load(BUNDLED_MODEL))
    if q4_0 is not None:
        yield row("llama.cpp Q4_0 rule (gguf-py), output Q8_0", q4_0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--shipped-only", action="store_true", help="skip the golden fixtures")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.markdown:
        print(f"| model | int4 | matrix bytes | positions | top-1 agreement | mean KL (nats) | "
              f"KL, first {KL_TOKENS} tokens | token perplexity fp32 → int4 |")
        print("|---|---|---:|---|---|---|---|---|")
    rows = shakespeare_rows() if args.shipped_only else (*fixture_rows(), *shakespeare_rows())
    for row in rows:
        ppl = kl256 = nbytes = ""
        if row["ppl"]:
            before, after = row["ppl"]
            ppl = f"{before:.3f} → {after:.3f} ({100 * (after / before - 1):+.2f}%)"
        if row["kl256"] is not None:
            kl256 = f"{row['kl256']:.5f}"
        if row["nbytes"]:
            nbytes = f"{row['nbytes']:,}"
        if args.markdown:
            print(f"| {row['model']} | {row['variant']} | {nbytes} | {row['positions']} | {100 * row['top1']:.1f}% | "
                  f"{row['kl']:.5f} | {kl256} | {ppl} |")
        else:
            print(f"{row['model']:32s} {row['variant']:45s} n={row['positions']:5d} top-1 {100 * row['top1']:5.1f}%  "
                  f"KL {row['kl']:.5f} nats  KL@{KL_TOKENS} {kl256:8s} {ppl}  {nbytes}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
