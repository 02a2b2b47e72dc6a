"""KL divergence between two models' next-token distributions on the same text.

    python tools/logits_kl.py                                  # shipped model: fp32 vs every int4 variant
    python tools/logits_kl.py --candidate model.gguf           # fp32 vs any model minislm.load reads
    python tools/logits_kl.py --reference A --candidate B@quant=int4,group_size=64
    python tools/logits_kl.py --candidate-logits llama_q4_0.npy  # logits computed elsewhere

A model spec is a path (or repo id) that `minislm.load` reads, optionally followed
by `@key=value,...` load options (quant, group_size, symmetric, output_bits).
`--candidate-logits FILE.npy` takes a (tokens, vocab) float array written by another
program for the same token ids (`--save-ids FILE` writes them), so engines minislm
cannot run can be compared too.

What is measured, as llama.cpp's `perplexity --kl-divergence` does: the text is
tokenized by the reference model's tokenizer (BOS first), cut to `--tokens` ids
(default 256, one forward: the shipped model's context is 512), both models run
one full forward over those ids, and for each position t

    KL_t = sum_v p_ref(v | ids[:t+1]) * (log p_ref(v | ...) - log p_cand(v | ...))

in nats; we print the mean over positions, the top-1 agreement (same most likely
next token), and the perplexity of each model on the same ids (positions 1..n-1
predicting the next id) with its relative change. Both models must share the
tokenizer (same vocabulary size is checked).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import minislm  # noqa: E402
from minislm.load import BUNDLED_MODEL  # noqa: E402
from minislm.kernels import set_threads  # noqa: E402
from minislm.perplexity import log_softmax  # noqa: E402

HELDOUT = ROOT / "tests" / "data" / "shakespeare_heldout.txt"
# The shipped model's int4 variants: (label, load options).
DEFAULT_CANDIDATES = [
    "@quant=int4,group_size=32",
    "@quant=int4,group_size=32,symmetric=false",
    "@quant=int4,group_size=64",
    "@quant=int4,group_size=128",
    "@quant=int4,group_size=128,symmetric=false",
]


def parse_spec(spec: str, default_path: str) -> tuple[str, dict]:
    """`PATH@key=value,...` -> (path, load options); an empty PATH means `default_path`."""
    path, _, opts = spec.partition("@")
    options = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            options[key] = value.lower() == "true"
        elif value.isdigit():
            options[key] = int(value)
        else:
            options[key] = value
    return path or default_path, options


def kl_and_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, float]:
    """(KL(reference || other) per row in nats, top-1 agreement)."""
    p_log = log_softmax(reference_logits)  # (T, V) float64
    q_log = log_softmax(logits)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)  # (T,)
    return kl, float((reference_logits.argmax(-1) == logits.argmax(-1)).mean())


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean NLL) of ids[1:] predicted from positions 0..n-2."""
    lp = log_softmax(logits[:-1])
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", default=str(BUNDLED_MODEL), help="model spec (default: the shipped model, fp32)")
    ap.add_argument("--candidate", action="append", help="model spec; repeat for several (default: int4 variants)")
    ap.add_argument("--candidate-logits", action="append", default=[], help=".npy (tokens, vocab) logits")
    ap.add_argument("--text", default=str(HELDOUT))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--save-ids", help="write the token ids used to this .npy file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    set_threads(args.threads)

    ref_path, ref_opts = parse_spec(args.reference, str(BUNDLED_MODEL))
    reference = minislm.load(ref_path, **ref_opts)
    ids = np.asarray(reference.tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_bos=True)[: args.tokens])
    if args.save_ids:
        np.save(args.save_ids, ids)
    ref_logits = reference.logits(ids)
    ref_ppl = perplexity(ref_logits, ids)

    rows = []
    specs = args.candidate if args.candidate else ([] if args.candidate_logits else DEFAULT_CANDIDATES)
    for spec in specs:
        path, opts = parse_spec(spec, ref_path)
        model = minislm.load(path, **opts)
        if model.config.vocab_size != reference.config.vocab_size:
            raise SystemExit(f"{spec}: vocabulary {model.config.vocab_size} != reference {reference.config.vocab_size}")
        rows.append((spec, model, model.logits(ids)))
    for path in args.candidate_logits:
        logits = np.load(path)
        if logits.shape != ref_logits.shape:
            raise SystemExit(f"{path}: logits of shape {logits.shape}, expected {ref_logits.shape}")
        rows.append((path, None, logits))

    print(f"# reference {args.reference} on {len(ids)} tokens of {args.text}; perplexity {ref_ppl:.3f}")
    if args.markdown:
        print("| candidate | bytes (matrices) | mean KL (nats) | top-1 agreement | perplexity | change |")
        print("|---|---:|---:|---:|---:|---:|")
    for spec, model, logits in rows:
        kl, agree = kl_and_agreement(ref_logits, logits)
        ppl = perplexity(logits, ids)
        nbytes = "" if model is None else f"{sum(int(w.nbytes) for w in model.weights.values() if len(w.shape) == 2):,}"
        change = 100 * (ppl / ref_ppl - 1)
        if args.markdown:
            print(f"| {spec} | {nbytes} | {kl.mean():.5f} | {100 * agree:.1f}% | {ppl:.3f} | {change:+.2f}% |")
        else:
            print(f"{spec:50s} KL {kl.mean():.5f} nats (max {kl.max():.3f})  top-1 {100 * agree:5.1f}%  "
                  f"ppl {ppl:.3f} ({change:+.2f}%)  bytes {nbytes}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
