"""Log-probabilities of the generated tokens, from the distribution they were drawn from.

For each generated token the generation loop hands `Logprobs.record` the sampler's
stages (minislm/sampling.py); what is recorded is log_softmax of the *last* stage:
after the allowed-ids mask, the JSON-schema mask, the repetition penalty, the
temperature and the filters. So at temperature 0.7 the numbers are those of
logits / 0.7, and an id that top-p filtered out has no entry at all: these are the
probabilities the token really had. (OpenAI's API does not say which distribution
it reports; vLLM reports the raw one by default. The issue that asked for logprobs
asks for the one the sampler saw, so greedy decoding reports the model's
distribution after the repetition penalty, and sampling the one it drew from.)

The top alternatives are the `top` most likely ids of that same distribution, most
likely first; ids with probability 0 (-inf) are never listed, so there may be fewer.
"""

from dataclasses import dataclass

import numpy as np

from .sampling import Stage, log_probabilities


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # natural log of the probability the token had when it was chosen
    top: tuple[tuple[int, float], ...]  # (id, logprob) of the most likely ids, most likely first


class Logprobs:
    """What the generation loop records into, one `TokenLogprob` per generated token."""

    def __init__(self, top: int = 0):
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
            raise ValueError(f"logprobs: the number of top alternatives must be an integer >= 0, got {top!r}")
        self.top = int(top)
        self.entries: list[TokenLogprob] = []

    def record(self, token: int, stages: list[Stage]) -> TokenLogprob:
        entry = token_logprob(token, stages[-1].logits, self.top)
        self.entries.append(entry)
        return entry


def token_logprob(token: int, logits: np.ndarray, top: int) -> TokenLogprob:
    """`token`'s log-probability under softmax(logits), and the `top` most likely ids."""
    logp = log_probabilities(logits)  # (V,)
    best = []
    if top:
        candidates = np.argpartition(-logp, top - 1)[:top] if top < logp.size else np.arange(logp.size)
        candidates = candidates[np.isfinite(logp[candidates])]
        order = candidates[np.lexsort((candidates, -logp[candidates]))]  # most likely first, ties by id
        best = [(int(i), float(logp[i])) for i in order]
    return TokenLogprob(int(token), float(logp[token]), tuple(best))


# ---------------------------------------------------------------- the text of a token


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one id stands for: what OpenAI's logprobs call a token's `bytes`.

    Phi-3's SentencePiece pieces write a space as "▁" and spell rare characters as
    byte pieces ("<0xE6>"); byte-level vocabularies (Phi-4's o200k, Phi-3-small's
    cl100k) spell every byte as a printable character (GPT-2's table). Decoding one id
    with the tokenizer would drop a leading space and turn a lone byte into U+FFFD."""
    return vocabulary_bytes(tokenizer)[token_id] if token_id < len(vocabulary_bytes(tokenizer)) else b""


def token_text(tokenizer, token_id: int) -> str:
    """A token's bytes as text; a token that is part of a character spells its bytes
    ("bytes:\\xe6"), as OpenAI does."""
    data = token_bytes(tokenizer, token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


_BYTES_CACHE: dict[int, tuple[object, list[bytes]]] = {}


def vocabulary_bytes(tokenizer) -> list[bytes]:
    """Every id's bytes, built once per tokenizer (~30 ms for Phi-3's 32k pieces)."""
    cached = _BYTES_CACHE.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    import json

    spec = json.loads(tokenizer.backend.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
    to_byte = {c: b for b, c in gpt2_byte_characters().items()}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    table = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.backend.id_to_token(i) or ""
        if i in added:
            table.append(piece.encode("utf-8"))
        elif byte_level:
            table.append(bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
    _BYTES_CACHE[id(tokenizer)] = (tokenizer, table)
    return table


def gpt2_byte_characters() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies use:
    printable Latin-1 bytes stand for themselves, the other 68 for the characters from
    U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
