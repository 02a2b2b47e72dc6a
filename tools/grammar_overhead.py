"""What a JSON schema costs per token, and why minislm uses llguidance (docs/decoding.md).

    python tools/grammar_overhead.py [--model INT4_DIR] [--threads 2]

On Phi-3's real vocabulary (tests/fixtures/phi3-tokenizer, 32,064 ids, byte
fallback), for several schemas:

1. compile time with llguidance and, when installed, outlines-core (its index over
   the whole vocabulary is built up front);
2. minislm's per-token cost with a schema: `JsonGrammar.mask()` (the library's
   bitmask, unpacked to one bool per id), the sampler's "grammar" stage
   (`np.where(mask, logits, -inf)` over 32,064 logits) and `advance()`, driven
   through the tokens of a valid document; against one decode step of the model
   in --model (an int4 Phi-3-mini-shaped folder, see tools/bench_speculative.py);
3. byte fallback: inside a JSON string, how many of the 256 `<0xNN>` byte pieces
   each library allows (UTF-8 lead and continuation bytes must be; control
   characters, '"' and '\\' must not).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from minislm.grammar import JSON_LAYOUT, JsonGrammar
from minislm.sampling import Sampler, SamplingSettings
from minislm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32064
STOPS = (32000, 32007)
SCHEMAS = {
    "object of 6 fields, nested": ({
        "type": "object", "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"}, "city": {"enum": ["Paris", "Zürich", "東京"]},
            "tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "number"},
            "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["street", "zip"]}},
        "required": ["name", "age", "city", "tags", "score", "address"], "additionalProperties": False},
        {"name": 'Ann "the" Smith\n', "age": 42, "city": "Zürich", "tags": ["a", "b c", "é"], "score": -1.5e3,
         "address": {"street": "1 Main St", "zip": "0123"}}),
    "12 optional fields": ({"type": "object", "properties": {f"field{i}": {"type": ["string", "integer", "null"]}
                                                             for i in range(12)}}, None),
    "array of objects": ({"type": "array", "minItems": 1, "maxItems": 8, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["x", "y"]}},
                                         "note": {"type": "string", "maxLength": 40}}, "required": ["id"]}}, None),
    "recursive tree ($ref)": ({"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value", "children"]}}, "$ref": "#/$defs/node"}, None),
    "any JSON object (json_object)": ({"type": "object"}, None),
}


def timed(f) -> tuple[float, object]:
    start = time.perf_counter()
    result = f()
    return time.perf_counter() - start, result


def outlines_index(schema, tokenizer):
    """outlines-core's index for `schema`, its vocabulary built from the same pieces
    (byte pieces as bytes, "▁" as a space); None when the package is missing."""
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        return None
    vocabulary = {}
    for piece, i in tokenizer.backend.get_vocab(with_added_tokens=False).items():
        data = bytes([int(piece[3:5], 16)]) if len(piece) == 6 and piece.startswith("<0x") else piece.replace("\u2581", " ").encode()
        if i not in (0, 1, 2, *STOPS):
            vocabulary.setdefault(data, []).append(i)
    regex = build_regex_from_schema(json.dumps(schema))
    return outlines_core.Index(regex, outlines_core.Vocabulary(STOPS[0], vocabulary))


def document_tokens(tokenizer, document) -> list[int]:
    """A document's ids as the model would write them after other text (no word-start piece)."""
    text = json.dumps(document, ensure_ascii=False, separators=(JSON_LAYOUT["item_separator"], JSON_LAYOUT["key_separator"]))
    return tokenizer.encode("\n" + text, add_bos=False)[2:]  # drop "▁" and "\n"


def decode_step_ms(model_dir: str, repeats: int = 10) -> list[float]:
    import minislm

    model = minislm.load(model_dir)
    cache = model.new_cache(200)
    ids = np.random.default_rng(0).integers(0, 32000, size=130)
    model.forward(ids[:128], cache)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.lm_head(model.forward(ids[128:129], cache))
        out.append(1e3 * (time.perf_counter() - start))
        cache.truncate(128)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an int4 Phi-3-mini-shaped folder: time a decode step to compare with")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    tokenizer = load_tokenizer(ROOT / "tests/fixtures/phi3-tokenizer")
    JsonGrammar(tokenizer, {"type": "object"}, VOCAB, STOPS)  # reads the vocabulary once (~0.3 s)

    print("1. compile time per schema (Phi-3 vocabulary, 32,064 ids)")
    for name, (schema, _) in SCHEMAS.items():
        ours, _ = timed(lambda: JsonGrammar(tokenizer, schema, VOCAB, STOPS).mask())
        theirs, index = timed(lambda: outlines_index(schema, tokenizer))
        other = "not installed" if index is None else f"{1e3 * theirs:9.1f} ms"
        print(f"   {name:32s} llguidance {1e3 * ours:7.1f} ms (first mask included) | outlines-core {other}")

    schema, document = SCHEMAS["object of 6 fields, nested"]
    tokens = document_tokens(tokenizer, document)
    sampler = Sampler(SamplingSettings(temperature=0.0), allowed_ids=tokenizer.vocab_size)
    logits = np.random.default_rng(0).normal(size=VOCAB).astype(np.float32)
    per_token = []
    for _ in range(5):
        grammar = JsonGrammar(tokenizer, schema, VOCAB, STOPS)
        for token in tokens:
            start = time.perf_counter()
            mask = grammar.mask()
            sampler.stages(logits, (), mask)
            grammar.advance(token)
            per_token.append(1e3 * (time.perf_counter() - start))
        assert grammar.complete
    plain = []
    for _ in range(5 * len(tokens)):
        start = time.perf_counter()
        sampler.stages(logits, ())
        plain.append(1e3 * (time.perf_counter() - start))
    extra = statistics.median(per_token) - statistics.median(plain)
    print(f"2. per token, through a {len(tokens)}-token document: mask + stages + advance "
          f"{statistics.median(per_token):.3f} ms (p90 {np.percentile(per_token, 90):.3f}), stages alone "
          f"{statistics.median(plain):.3f} ms: the schema adds {extra:.3f} ms")
    if args.model:
        from minislm.kernels import set_threads

        set_threads(args.threads)
        steps = decode_step_ms(args.model)
        step = statistics.median(steps)
        print(f"   one decode step of {args.model} at {args.threads} threads: {step:.1f} ms "
              f"(min {min(steps):.1f}, max {max(steps):.1f}); the schema adds {100 * extra / step:.2f} % (goal <= 10 %)")

    grammar = JsonGrammar(tokenizer, {"type": "string"}, VOCAB, STOPS)
    grammar.advance(document_tokens(tokenizer, "x")[0])  # the opening quote
    byte_ids = [tokenizer.token_id(f"<0x{b:02X}>") for b in range(256)]
    allowed = grammar.mask()
    print(f"3. inside a string, llguidance allows {sum(bool(allowed[i]) for i in byte_ids)} of the 256 byte pieces "
          f"and {int(allowed.sum())} ids in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
