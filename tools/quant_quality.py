"""How much int4 changes a model's predictions: top-1 agreement and KL divergence.

    python tools/quant_quality.py                 # fixtures + the shipped Shakespeare model
    python tools/quant_quality.py --markdown      # the same, as the table in docs/kernels.md

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
from minislm.commands import BUNDLED_MODEL  # noqa: E402
from minislm.kernels import set_threads  # noqa: E402
from minislm.perplexity import log_softmax, score_text  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
HELDOUT = ROOT / "tests" / "data" / "shakespeare_heldout.txt"
SETTINGS = [(32, True), (32, False), (128, True), (128, False)]  # (group size, symmetric)


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
        for group_size, symmetric in SETTINGS:
            model = minislm.load(folder, quant="int4", group_size=group_size, symmetric=symmetric)
            agree, kl, n = [], [], 0
            for case in cases:
                ref = reference[f"case.{case}.logits"]
                a, k = compare(ref, model.logits(reference[f"case.{case}.input_ids"]))
                agree.append(a * len(ref))
                kl.append(k * len(ref))
                n += len(ref)
            yield dict(model=folder.name, group_size=group_size, symmetric=symmetric,
                       positions=n, top1=sum(agree) / n, kl=sum(kl) / n, ppl=None)


def shakespeare_rows():
    text = HELDOUT.read_text(encoding="utf-8")
    fp32 = minislm.load(BUNDLED_MODEL)
    window = fp32.config.max_position_embeddings
    ids = fp32.tokenizer.encode(text, add_bos=True)
    chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]  # disjoint windows
    reference = [fp32.logits(c) for c in chunks]
    base = score_text(fp32, text)
    for group_size, symmetric in SETTINGS:
        model = minislm.load(BUNDLED_MODEL, quant="int4", group_size=group_size, symmetric=symmetric)
        pairs = [compare(r, model.logits(c)) for r, c in zip(reference, chunks)]
        weights = [len(c) for c in chunks]
        scored = score_text(model, text)
        yield dict(model="shakespeare (held-out excerpt)", group_size=group_size, symmetric=symmetric,
                   positions=sum(weights),
                   top1=float(np.average([p[0] for p in pairs], weights=weights)),
                   kl=float(np.average([p[1] for p in pairs], weights=weights)),
                   ppl=(base.token_perplexity, scored.token_perplexity))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.markdown:
        print("| model | int4 | positions | top-1 agreement | mean KL (nats) | token perplexity fp32 → int4 |")
        print("|---|---|---|---|---|---|")
    for row in (*fixture_rows(), *shakespeare_rows()):
        kind = f"g{row['group_size']} {'sym' if row['symmetric'] else 'asym'}"
        ppl = ""
        if row["ppl"]:
            before, after = row["ppl"]
            ppl = f"{before:.3f} → {after:.3f} ({100 * (after / before - 1):+.2f}%)"
        if args.markdown:
            print(f"| {row['model']} | {kind} | {row['positions']} | {100 * row['top1']:.1f}% | {row['kl']:.5f} | {ppl} |")
        else:
            print(f"{row['model']:32s} {kind:9s} n={row['positions']:5d} top-1 {100 * row['top1']:5.1f}%  "
                  f"KL {row['kl']:.5f} nats  {ppl}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
