"""`minislm perplexity`: how well a model predicts a text, with minislm's own forward.

Per-token perplexity depends on the tokenizer (a vocabulary with longer tokens
has fewer, harder predictions), so we also report nats and bits per *character*,
which compare across tokenizers: the total negative log-likelihood of the text
divided by its length in characters.

A text longer than the context is scored in overlapping windows: each window
runs one forward, and only its tokens not scored by an earlier window count, so
every token is predicted once, with at least `window - stride` tokens of
context (except at the very start).
"""

import math
from dataclasses import dataclass

import numpy as np

from .errors import MinislmError


@dataclass(frozen=True)
class Perplexity:
    tokens: int  # tokens predicted (scored)
    characters: int
    nll: float  # total negative log-likelihood, nats

    @property
    def nats_per_char(self) -> float:
        return self.nll / self.characters

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2)

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, in float64 so the sum over a long text stays exact."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def windows(n_tokens: int, window: int, stride: int):
    """(begin, end, first scored position) for each forward; positions 1.. are scored."""
    scored_up_to = 1  # token 0 has no context: it is never predicted
    begin = 0
    while scored_up_to < n_tokens:
        end = min(begin + window, n_tokens)
        yield begin, end, scored_up_to
        scored_up_to = end
        begin += stride


def score_text(model, text: str, window: int | None = None, stride: int | None = None, progress: bool = False) -> Perplexity:
    """Total NLL of `text` under `model`, BOS first when the tokenizer has one (so
    that the first character is predicted too)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MinislmError(f"{model.path}: perplexity needs a tokenizer.json in the model folder")
    if not text:
        raise MinislmError("the text is empty")
    ids = tokenizer.encode(text, add_bos=tokenizer.bos_id is not None)
    characters = len(text) if tokenizer.bos_id is not None else len(tokenizer.decode(ids[1:]))
    context = model.config.max_position_embeddings
    if window is not None and window < 2:
        raise MinislmError(f"--window must be >= 2, got {window}")
    window = context if window is None else min(window, context)
    stride = max(1, window // 2) if stride is None else stride
    if not 0 < stride < window:
        raise MinislmError(f"--stride must be in [1, {window - 1}] (below the window, {window}), got {stride}")

    spans = list(windows(len(ids), window, stride))
    if progress:
        from tqdm import tqdm

        spans = tqdm(spans, desc="perplexity", unit="window", disable=None, leave=False)  # a bar on terminals only
    nll, scored = 0.0, 0
    for begin, end, first in spans:
        logits = model.logits(ids[begin:end])  # (end - begin, V)
        # logits at position p predict token p + 1
        predicted = np.arange(first, end)  # token positions scored by this window
        log_probs = log_softmax(logits[predicted - 1 - begin])
        nll -= float(log_probs[np.arange(len(predicted)), np.asarray(ids)[predicted]].sum())
        scored += len(predicted)
    return Perplexity(tokens=scored, characters=characters, nll=nll)


def run_perplexity(args) -> int:
    from pathlib import Path

    from .commands import load_model
    from .text_input import read_text_file

    path = Path(args.file)
    text = read_text_file(args.file, "--file")
    model = load_model(args)
    result = score_text(model, text, args.window, args.stride, progress=True)
    print(
        f"{path}: {result.characters} characters, {result.tokens} tokens | "
        f"{result.nats_per_char:.4f} nats/char, {result.bits_per_char:.4f} bits/char, "
        f"token perplexity {result.token_perplexity:.3f}"
    )
    return 0
