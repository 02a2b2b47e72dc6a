"""Speculative decoding, JSON schemas and their counts through the command line and the
server: the same policy as `Model.generate` (minislm/runtime.py), so the same text,
with the flags and fields checked one line at a time."""

import json

import jsonschema
import openai
import pytest

import minislm
from conftest import FIXTURES
from minislm.cli import main as minislm_main
from minislm.load import BUNDLED_MODEL
from served import CHAT, client, running

SCHEMA = {"type": "object", "properties": {"speaker": {"enum": ["ROMEO", "JULIET", "NURSE"]},
                                           "line": {"type": "string", "maxLength": 30},
                                           "act": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["speaker", "line", "act"], "additionalProperties": False}
COPY_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 2


@pytest.fixture(scope="module")
def model():
    return minislm.load(BUNDLED_MODEL)


def generated(capsys, *flags) -> tuple[str, str]:
    assert minislm_main(["generate", "--no-chat-template", *flags]) == 0
    return capsys.readouterr()


def test_generate_speculate_prints_the_plain_text_and_counts_the_guesses(capsys):
    plain, _ = generated(capsys, "-n", "40", "--repeat-penalty", "1", COPY_PROMPT)
    for flags in (["--speculate", "lookup"], ["--draft-model", str(BUNDLED_MODEL), "--num-draft", "3"]):
        out, err = generated(capsys, "-n", "40", "--repeat-penalty", "1", *flags, COPY_PROMPT)
        assert out == plain
        drafted, accepted = map(int, __import__("re").search(r"drafted (\d+), accepted (\d+)", err).groups())
        assert 0 < accepted <= drafted


def test_generate_json_schema_prints_a_valid_document(capsys, tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    out, _ = generated(capsys, "-n", "80", "--json-schema", str(path), "ROMEO:")
    jsonschema.validate(json.loads(out), SCHEMA)


@pytest.mark.parametrize("flags, message", [
    (["--num-draft", "0", "--speculate", "lookup"], "--num-draft must be >= 1"),
    (["--speculate", "lookup", "--draft-model", "x"], "choose one"),
    (["--draft-model", str(FIXTURES / "gqa")], "--draft-model: .*tokenizer"),
    (["--json-schema", "/nonexistent/schema.json"], "--json-schema /nonexistent/schema.json: cannot read"),
    (["--logprobs", "21"], "--logprobs must be from 0 to 20"),
    (["--num-beams", "2", "--speculate", "lookup"], "--speculate does not apply to beam search"),
])
def test_bad_flags_are_one_line_errors(capsys, flags, message):
    assert minislm_main(["generate", "--no-chat-template", "-n", "4", *flags, "ROMEO:"]) == 2
    err = capsys.readouterr().err.strip()
    assert __import__("re").search(message, err) and len(err.splitlines()) == 1, err


def test_generate_json_schema_that_cannot_compile_names_the_file_and_the_problem(capsys, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"type": "object", "properties": {"a": {"type": "strnig"}}}')
    assert minislm_main(["generate", "-n", "4", "--json-schema", str(path), "ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert f"--json-schema {path}" in err and "strnig" in err


def test_the_server_follows_response_format(model):
    with running(model) as server:
        c = client(server)
        for seed in (None, 1, 2, 3):
            extra = {} if seed is None else {"temperature": 1.0, "seed": seed}
            reply = c.chat.completions.create(
                model="x", messages=CHAT, max_tokens=80, **extra,
                response_format={"type": "json_schema", "json_schema": {"name": "line", "schema": SCHEMA, "strict": True}})
            assert reply.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in c.chat.completions.create(
            model="x", messages=CHAT, max_tokens=80, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "line", "schema": SCHEMA}}) if chunk.choices)
        jsonschema.validate(json.loads(streamed), SCHEMA)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="x", messages=CHAT, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"minLength": "x"}}}}})
        assert "minLength" in e.value.body["message"] and e.value.body["param"] == "response_format"
        with pytest.raises(openai.BadRequestError, match="response_format.type"):
            c.chat.completions.create(model="x", messages=CHAT, max_tokens=8, response_format={"type": "yaml"})


def test_the_server_speculates_and_reports_the_guesses_as_openai_does(model):
    """A `prediction` (OpenAI's predicted outputs) that is the reply itself: most guesses
    are accepted; the text is the plain greedy one; usage counts accepted and rejected."""
    with running(model) as server:
        plain = client(server).completions.create(model="x", prompt=COPY_PROMPT, max_tokens=30,
                                                  extra_body={"repetition_penalty": 1.0})
        assert plain.usage.completion_tokens_details is None  # no speculation, no counts
    with running(model) as server:
        predicted = client(server).completions.create(
            model="x", prompt=COPY_PROMPT, max_tokens=30,
            extra_body={"repetition_penalty": 1.0, "prediction": {"type": "content", "content": plain.choices[0].text}})
    assert predicted.choices[0].text == plain.choices[0].text
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 15 and details.rejected_prediction_tokens >= 0
    with running(model, speculate="lookup", num_draft=3) as server:
        looked_up = client(server).completions.create(model="x", prompt=COPY_PROMPT, max_tokens=30,
                                                      extra_body={"repetition_penalty": 1.0})
    assert looked_up.choices[0].text == plain.choices[0].text
    assert looked_up.usage.completion_tokens_details.accepted_prediction_tokens > 0
