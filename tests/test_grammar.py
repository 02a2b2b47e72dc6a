"""Output that follows a JSON schema (minislm/grammar.py): every reply parses and is
valid under its schema, checked by `jsonschema` (the reference validator, not
minislm's automaton), over many seeds, greedy and sampled, through the one policy
the library, the CLI and the server share; and a schema that cannot be compiled is
refused with a message that names the problem.

The shipped model writes Shakespeare, not JSON: whatever it prefers, the mask must
keep it inside the schema. Strings are bounded (maxLength) so that it finishes a
document within the token budget.
"""

import json
import sys

import jsonschema
import numpy as np
import pytest

import minislm
from minislm.errors import MinislmError
from minislm.grammar import JsonSchemaError
from minislm.load import BUNDLED_MODEL
from minislm.runtime import json_grammar

SCHEMAS = {
    "nested object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {"type": "object", "properties": {
                "city": {"enum": ["Verona", "Mantua", "Padua"]},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "array of integers": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                          "minItems": 1, "maxItems": 5},
    "enum and number": {"type": "object", "properties": {"mood": {"enum": ["glad", "sad", "wroth"]},
                                                         "score": {"type": "number", "minimum": 0, "maximum": 10}},
                        "required": ["mood", "score"], "additionalProperties": False},
    "strings with escapes": {"type": "object", "properties": {"line": {"type": "string", "maxLength": 40},
                                                              "speaker": {"type": "string", "maxLength": 8}},
                             "required": ["speaker", "line"], "additionalProperties": False},
    "array of objects": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"who": {"enum": ["ROMEO", "JULIET"]}, "lines": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "alive": {"type": "boolean"}}, "required": ["who", "alive"],
        "additionalProperties": False}},
}
# Text that makes the model want newlines and quotes inside strings.
PROMPT = 'ROMEO:\n"But soft! what light through yonder window breaks?"\nJULIET:\n'


@pytest.fixture(scope="module")
def model():
    return minislm.load(BUNDLED_MODEL)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_reply_parses_and_validates_greedy_and_sampled(model, name):
    schema = SCHEMAS[name]
    ids = model.tokenizer.encode(PROMPT)
    replies = []
    for seed in [None, *range(8)]:
        settings = {} if seed is None else {"temperature": 1.0, "seed": seed}
        tokens = list(model.generate(ids, 120, json_schema=schema, **settings))
        assert tokens[-1] in model.generation_config.eos_token_ids, "the document did not end within 120 tokens"
        text = model.tokenizer.decode(tokens)
        jsonschema.validate(json.loads(text), schema)
        replies.append(text)
    assert len(set(replies)) >= 3  # the seeds really sampled different documents


def test_strings_with_quotes_newlines_and_non_ascii_come_out_escaped_and_whole(model):
    """Values that need escapes (quote, newline, backslash, tab) or bytes of characters
    the vocabulary spells as byte pieces (<0xE6>...): the text written is a JSON
    spelling of them (a tab may be \\t or \\u0009), and json.loads gives back exactly the value."""
    values = ['he said "soft!"\n', "back\\slash\ttab", "naïve — 東京"]
    schema = {"type": "object", "properties": {"quote": {"enum": values}}, "required": ["quote"], "additionalProperties": False}
    ids = model.tokenizer.encode(PROMPT)
    seen = set()
    for seed in [None, *range(10)]:
        settings = {} if seed is None else {"temperature": 1.5, "seed": seed}
        text = model.tokenizer.decode(list(model.generate(ids, 60, json_schema=schema, **settings)))
        value = json.loads(text)["quote"]
        assert value in values and not any(c in text for c in "\n\t")  # control characters only as escapes
        seen.add(value)
    assert len(seen) >= 2


def test_speculative_decoding_keeps_the_schema(model):
    """Guesses from prompt lookup ignore the schema; the target's mask rejects those that break it."""
    schema = SCHEMAS["array of objects"]
    ids = model.tokenizer.encode(PROMPT + json.dumps([{"who": "ROMEO", "lines": 3, "alive": True}] * 2))
    for seed in (None, 1, 2):
        settings = {} if seed is None else {"temperature": 1.0, "seed": seed}
        plain = list(model.generate(ids, 120, json_schema=schema, **settings))
        spec = list(model.generate(ids, 120, json_schema=schema, speculate="lookup", **settings))
        jsonschema.validate(json.loads(model.tokenizer.decode(spec)), schema)
        if seed is None:
            assert spec == plain  # greedy: the same document


def test_the_mask_keeps_exactly_the_ids_that_continue_a_valid_document(model):
    """After '{"mood": "', the ids allowed are those whose text continues one of the enum's
    words (checked against the tokenizer's own pieces), and nothing else."""
    grammar = json_grammar(model, SCHEMAS["enum and number"])
    for token in model.tokenizer.encode('{"mood": "', add_bos=False)[1:]:  # [1:]: drop the word-start piece
        grammar.advance(token)
    allowed = np.flatnonzero(grammar.mask())
    from minislm.logprobs import token_bytes

    for i in allowed:
        assert any(word.startswith(token_bytes(model.tokenizer, int(i)).decode()) for word in ("glad", "sad", "wroth"))
    assert len(allowed) >= 3


@pytest.mark.parametrize("schema, problem", [
    ({"type": "foo"}, "Invalid type: foo"),
    ({"$ref": "#/nowhere"}, "nowhere"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed group"),
    ({"not": {"type": "string"}}, "not"),
    ('{"type": ', "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_a_schema_that_cannot_be_compiled_is_refused_naming_the_problem(model, schema, problem):
    with pytest.raises(JsonSchemaError, match="JSON schema") as e:
        model.generate([1, 2], 5, json_schema=schema)
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_without_llguidance_the_error_says_how_to_install_it(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if it were not installed
    with pytest.raises(MinislmError, match=r"pip install 'minislm\[json\]'"):
        model.generate([1, 2], 5, json_schema={"type": "object"})
