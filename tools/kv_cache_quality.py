"""What storing the KV cache in fewer bits does to a model's outputs.

    python tools/kv_cache_quality.py             # fixtures + the shipped Shakespeare model
    python tools/kv_cache_quality.py --markdown  # the same, as the tables in docs/performance.md

Two measurements per cache dtype (float32, float16, int8):

- golden fixtures (tests/fixtures, float32 weights): the largest |logit difference|
  from transformers' float32 logits over every case, and whether the top-1 token
  is unchanged at every position. The fixtures' random weights give logits spread
  over ~10 units, so these are worst cases for absolute error; PhiMoE fixtures
  also flip a router's choice once a logit moves enough, which turns a small
  error into a large one.
- the shipped Shakespeare model on its held-out excerpt, with float32 weights and
  with the default int4 weights: token perplexity and the mean KL divergence of
  each position's next-token distribution from the float32-cache model with the
  same weights, i.e. the cost of the cache alone.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minislm  # noqa: E402
from minislm.cache import DTYPES  # noqa: E402
from minislm.load import BUNDLED_MODEL  # noqa: E402
from minislm.kernels import set_threads  # noqa: E402
from minislm.perplexity import log_softmax, score_text  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
HELDOUT = ROOT / "tests" / "data" / "shakespeare_heldout.txt"


def fixture_rows():
    for folder in sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").is_file()):
        reference = load_file(folder / "reference.safetensors")
        cases = sorted({k.split(".")[1] for k in reference if k.startswith("case.")})
        row = {"model": folder.name}
        for dtype in DTYPES:
            model = minislm.load(folder, kv_cache=dtype)
            worst, same_top1 = 0.0, True
            for case in cases:
                got = model.logits(reference[f"case.{case}.input_ids"])
                expected = reference[f"case.{case}.logits"]
                worst = max(worst, float(np.abs(got - expected).max()))
                same_top1 &= bool((got.argmax(-1) == expected.argmax(-1)).all())
            row[dtype] = (worst, same_top1)
        yield row


def mean_kl(reference_logits, logits) -> float:
    p_log, q_log = log_softmax(reference_logits), log_softmax(logits)
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


def shakespeare_rows():
    text = HELDOUT.read_text(encoding="utf-8")
    for weights, options in (("float32", {}), ("int4 g32", {"quant": "int4", "group_size": 32})):
        base = minislm.load(BUNDLED_MODEL, kv_cache="float32", **options)
        ids = base.tokenizer.encode(text, add_bos=True)
        window = base.config.max_position_embeddings
        chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]  # disjoint windows
        reference = [base.logits(c) for c in chunks]
        base_ppl = score_text(base, text).token_perplexity
        for dtype in DTYPES:
            model = minislm.load(BUNDLED_MODEL, kv_cache=dtype, **options)
            kl = np.average([mean_kl(r, model.logits(c)) for r, c in zip(reference, chunks)],
                            weights=[len(c) for c in chunks])
            ppl = score_text(model, text).token_perplexity
            yield {"weights": weights, "cache": dtype, "positions": sum(map(len, chunks)),
                   "ppl": ppl, "base_ppl": base_ppl, "kl": float(kl)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    dtypes = list(DTYPES)
    if args.markdown:
        print("| fixture | " + " | ".join(f"{d} cache: max abs Δ logits (top-1 same)" for d in dtypes) + " |")
        print("|---|" + "---|" * len(dtypes))
    for row in fixture_rows():
        cells = [f"{row[d][0]:.2e} ({'yes' if row[d][1] else 'no'})" for d in dtypes]
        print(f"| {row['model']} | " + " | ".join(cells) + " |" if args.markdown
              else f"{row['model']:18s} " + "  ".join(f"{d}: {c}" for d, c in zip(dtypes, cells)), flush=True)
    if args.markdown:
        print("\n| Shakespeare held-out | KV cache | positions | token perplexity | vs float32 cache | mean KL (nats) |")
        print("|---|---|---|---|---|---|")
    for row in shakespeare_rows():
        delta = 100 * (row["ppl"] / row["base_ppl"] - 1)
        if args.markdown:
            print(f"| {row['weights']} weights | {row['cache']} | {row['positions']} | {row['ppl']:.4f} | "
                  f"{delta:+.3f}% | {row['kl']:.2e} |")
        else:
            print(f"shakespeare {row['weights']:9s} cache {row['cache']:8s} ppl {row['ppl']:.4f} "
                  f"({delta:+.3f}%)  KL {row['kl']:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
