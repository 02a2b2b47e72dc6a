"""Output that follows a JSON schema: which token ids may come next.

A JSON schema describes a language of texts. After each generated token, some
ids would keep the text a prefix of a valid document and all others would break
it; masking the others (logit -inf) before the sampler's processors guarantees the
reply parses and validates, whatever the model prefers. The mask meets the
logits in one line of minislm/sampling.py (`Sampler.stages`, the "grammar" stage):

    masked = np.where(grammar_mask, logits, -np.inf)

Deciding the mask means running a parser over the token's *bytes*, for each of
the 32,064 ids, at every step: an automaton, which is plumbing, so it comes from
a library. minislm uses Microsoft's `llguidance` (what llama.cpp and vLLM use):

- it reads the model's own tokenizer.json, so Phi-3's byte-fallback pieces
  (`<0xE6>`, the "▁" that stands for a space) and byte-level vocabularies (o200k)
  are handled by the library, not by conversion code here;
- it compiles a schema lazily in about a millisecond and computes a mask in tens of
  microseconds (`python tools/grammar_overhead.py`; docs/decoding.md has the
  figures), against 0.3-15 s to build `outlines-core`'s index for the same schemas
  with the Phi-3 vocabulary (15 s for `{"type": "object"}`, what `json_object` asks);
- it can take tokens back (`rollback`), which a speculative draft needs.

`llguidance` is an optional extra (`pip install 'minislm[json]'`); without it, asking
for a schema is a one-line error that says so. It pulls in nothing else (no torch).

The compiled grammar allows no whitespace between tokens beyond one space after
',' and ':' (as `json.dumps` writes), so the model cannot wander into endless
newlines; when the document is complete only the end-of-sequence ids remain.
"""

import json
from functools import lru_cache

import numpy as np

from .errors import MinislmError

INSTALL_HINT = "pip install llguidance (or the extra: pip install 'minislm[json]')"
# How the compiled grammar writes JSON between values: as json.dumps does.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# What OpenAI's response_format {"type": "json_object"} asks for: any JSON object.
ANY_JSON_OBJECT = {"type": "object"}


class JsonSchemaError(MinislmError):
    """A schema that is not JSON, or one the library cannot compile (the message says why)."""


def import_llguidance():
    try:
        import llguidance
    except ImportError:
        raise MinislmError(f"output that follows a JSON schema needs the llguidance package: {INSTALL_HINT}") from None
    return llguidance


def read_schema(schema) -> dict:
    """A schema given as a dict or as JSON text -> a dict; anything else is refused."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise JsonSchemaError(f"the JSON schema is not valid JSON: {e}") from None
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise JsonSchemaError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    return schema


@lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
    """llguidance's view of the vocabulary: every id's bytes, read from tokenizer.json
    (~0.3 s for Phi-3's 32k pieces, so kept for the next schema)."""
    llguidance = import_llguidance()
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(stop_ids))


class JsonGrammar:
    """The ids that keep the text valid under one schema, step by step.

    `mask()` -> (V,) bool for the next token; `advance(id)` after it is chosen;
    `rollback(n)` forgets the last n (a rejected speculative draft).
    """

    def __init__(self, tokenizer, schema, vocab_size: int, stop_ids):
        llguidance = import_llguidance()
        schema = read_schema(schema)
        stop_ids = tuple(sorted(int(i) for i in stop_ids if i < vocab_size))
        if not stop_ids:
            raise MinislmError("a JSON schema needs an end-of-sequence id to end the document with; this model has none")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except Exception as e:  # ValueError for what is not a schema; the library's own errors otherwise
            raise JsonSchemaError(f"the JSON schema cannot be compiled: {first_line(str(e))}") from None
        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab_size, stop_ids), grammar, log_level=0)
        if self.matcher.is_error():
            raise JsonSchemaError(f"the JSON schema cannot be compiled: {first_line(self.matcher.get_error())}")
        self.vocab_size = vocab_size
        self.bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # one bit per id, filled by the library

    def mask(self) -> np.ndarray:
        """(V,) bool: True where an id may come next."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.matcher.is_error():
            raise MinislmError(f"JSON schema: {first_line(self.matcher.get_error())}")
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise MinislmError(f"JSON schema: token {token} does not continue the document "
                               f"({first_line(self.matcher.get_error())})")

    def rollback(self, n: int) -> None:
        if n and not self.matcher.rollback(n):
            raise MinislmError(f"JSON schema: cannot take back {n} tokens")

    @property
    def complete(self) -> bool:
        """The text so far is a whole valid document."""
        return self.matcher.is_accepting()


def first_line(message: str) -> str:
    """llguidance's messages can run over several lines (a regex error draws a caret)."""
    return " ".join(message.split())
