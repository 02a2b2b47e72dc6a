"""minislm/runtime.py: the loaded model and the one generation policy that the Python
API, the command line and the server all go through.

The same ids with the same settings must give the same tokens from
`minislm.load(...).generate`, `python -m minislm generate --no-chat-template` and
`/v1/completions`; beam search must agree between the API and the CLI; and no path
may emit an id the tokenizer has no piece for (Phi-3 pads its vocabulary with such
ids). The command line and the server print text, so they are compared with the
text of the API's ids as the streaming detokenizer both use turns them into text,
and by their token counts.
"""

import threading
from pathlib import Path
from contextlib import contextmanager

import openai
import pytest

import minislm
import minislm.kernels
from conftest import FIXTURES
from gguf_files import write_gguf
from minislm.cli import main
from minislm.generate import generate_text
from minislm.load import BUNDLED_MODEL
from minislm.runtime import allowed_ids, sampling_settings
from minislm.serve import Server, ServeSettings

MODELS = {"shipped": (BUNDLED_MODEL, "ROMEO:\nWhat light"), "phimoe": (FIXTURES / "moe", "hello world")}
# (API keywords, the same as CLI flags); the server takes the API's names.
SETTINGS = {
    "greedy": ({}, []),
    "sampled": ({"temperature": 0.9, "top_p": 0.9, "seed": 7}, ["--temp", "0.9", "--top-p", "0.9", "--seed", "7"]),
    "hot": ({"temperature": 2.0, "seed": 3}, ["--temp", "2", "--seed", "3"]),  # OpenAI allows up to 2
}
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=sorted(MODELS))
def loaded(request):
    path, text = MODELS[request.param]
    return path, text, minislm.load(path)


@contextmanager
def serving(model):
    server = Server(model, ServeSettings(port=0, model_id="m"), log=lambda line: None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def cli_text(capsys, path, text, flags, count: int) -> str:
    assert main(["generate", "--model", str(path), "--no-chat-template", "-n", str(NEW_TOKENS), *flags, text]) == 0
    out, err = capsys.readouterr()
    assert f"generated {count} tokens" in err
    assert out.endswith("\n")
    return out[:-1]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_api_the_cli_and_the_server_give_the_same_tokens(loaded, setting, capsys):
    path, text, model = loaded
    keywords, flags = SETTINGS[setting]
    ids = model.tokenizer.encode(text)  # what the CLI feeds with --no-chat-template
    tokens = list(model.generate(ids, NEW_TOKENS, **keywords))
    assert tokens and max(tokens) < allowed_ids(model), "an id the tokenizer has no piece for"
    expected = "".join(generate_text(model.tokenizer, iter(tokens)))  # the streamed text both print
    assert cli_text(capsys, path, text, flags, len(tokens)) == expected
    with serving(model) as client:
        answer = client.completions.create(model="m", prompt=ids, max_tokens=NEW_TOKENS, **keywords)
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == len(tokens)


def test_the_api_and_the_cli_agree_on_beam_search(loaded, capsys):
    path, text, model = loaded
    ids = model.tokenizer.encode(text)
    best = list(model.generate(ids, 12, num_beams=3))
    assert max(best) < allowed_ids(model)
    assert best == list(model.beam_search(ids, 12, 3)[0].ids)
    assert main(["generate", "--model", str(path), "--no-chat-template", "-n", "12", "--num-beams", "3", text]) == 0
    assert capsys.readouterr().out == model.tokenizer.decode(list(best)) + "\n"


def test_generation_config_decides_what_the_call_leaves_out():
    """do_sample and temperature from generation_config.json, as transformers' generate()
    and the CLI read them: a model that asks for sampling samples through the API too."""
    model = minislm.load(FIXTURES / "mha")
    assert not model.generation_config.do_sample
    assert sampling_settings(model).temperature == 0.0
    sampled = minislm.load(FIXTURES / "mha")
    sampled.generation_config = type(model.generation_config)(
        eos_token_ids=model.generation_config.eos_token_ids, do_sample=True, temperature=0.7, top_k=20)
    settings = sampling_settings(sampled)
    assert (settings.temperature, settings.top_k) == (0.7, 20)
    assert sampling_settings(sampled, temperature=0.0).temperature == 0.0  # the call's value wins
    ids = [1, 5, 9]
    assert list(sampled.generate(ids, 8, seed=1)) == list(sampled.generate(ids, 8, seed=1))
    assert list(sampled.generate(ids, 8, seed=1)) != list(sampled.generate(ids, 8, temperature=0.0))


def test_the_api_stops_on_the_tokenizers_end_token_too():
    """generation_config.json may omit the tokenizer's eos; the CLI always stopped there,
    and now the API does as well. Near-uniform sampling (temperature 1000 over 359 ids)
    draws the eos within a few seeds; it must be the last token."""
    model = minislm.load(FIXTURES / "mha")
    eos = model.tokenizer.token_id(model.tokenizer.special["eos_token"])
    model.generation_config = type(model.generation_config)(eos_token_ids=())
    ends = []
    for seed in range(20):
        tokens = list(model.generate([1, 5, 9], 120, temperature=1000.0, seed=seed))
        assert eos not in tokens[:-1]
        ends.append(tokens[-1] == eos)
    assert any(ends)


def test_arguments_are_checked_when_called_not_at_the_first_token():
    model = minislm.load(FIXTURES / "mha")
    for bad, error in [(dict(max_new_tokens=-1), ValueError), (dict(max_new_tokens=2.5), TypeError),
                       (dict(temperature=-1.0), ValueError), (dict(top_p=0.0), ValueError)]:
        arguments = {"max_new_tokens": 4, **bad}
        with pytest.raises(error):
            model.generate([1, 2, 3], arguments.pop("max_new_tokens"), **arguments)
    with pytest.raises(ValueError, match="beam search is deterministic"):
        model.generate([1, 2, 3], 4, num_beams=2, seed=1)


# ---------------------------------------------------------------- what the weights are


def test_the_model_says_what_its_weights_really_are():
    plain = minislm.load(BUNDLED_MODEL)
    assert (plain.weights_format.format, plain.weights_format.bits, plain.kv_cache) == ("float32", 32, "float32")
    int4 = minislm.load(BUNDLED_MODEL, quant="int4", group_size=64)
    fmt = int4.weights_format
    assert (fmt.format, fmt.bits, fmt.group_size, fmt.kv_cache) == ("int4", 4, 64, "float16")
    assert dict(fmt.kinds)["int8 g64"] == 1  # the output layer at 8 bits
    assert fmt.describe() == "int4 g64 (1 matrix int8 g64), KV cache float16"
    assert minislm.load(BUNDLED_MODEL, quant="bf16").weights_format.describe() == "bf16, KV cache float16"


def test_a_file_quantized_elsewhere_reports_its_codes_not_float32(tmp_path):
    """A GGUF Q4_0 file asked nothing of minislm's quantizer, yet holds int4 codes."""
    model = minislm.load(write_gguf(tmp_path / "m.gguf", FIXTURES / "gqa", "phi3", "Q4_0"))
    assert model.weights_format.format == "int4" and model.weights_format.group_size == 32
    assert model.packing is None  # not packed by minislm


# ---------------------------------------------------------------- one token, few files


def test_one_decode_step_runs_in_at_most_eight_files():
    """A learner follows one token from its id to the next sampled id on the float32
    path through few files: counted by a profiler hook over one decode step of the
    shipped model, every minislm source file one of whose functions runs. (Eight since
    batched decoding: a decode step multiplies by the GEMV of kernels/fp32.py, which
    gives a sequence the same bits alone and in a batch, and kernels/checks.py checks
    its input; before, BLAS's GEMV was called from model.py.)"""
    import sys

    model = minislm.load(BUNDLED_MODEL)
    tokens = model.generate(model.tokenizer.encode("ROMEO:"), 4)
    next(tokens), next(tokens)  # the prefill, then one step to warm everything up
    roots = {Path(minislm.__file__).parent: "", Path(minislm.kernels.__file__).parent: "kernels/"}
    files = set()

    def watch(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            for root, label in roots.items():
                if path.is_relative_to(root):
                    files.add(label + path.relative_to(root).as_posix())

    sys.setprofile(watch)
    try:
        next(tokens)
    finally:
        sys.setprofile(None)
    assert len(files) <= 8, sorted(files)
    assert {"model.py", "sampling.py", "kernels/fp32.py"} <= files
