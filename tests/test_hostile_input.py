"""Issue 11's classes of bad input, one parametrised test per class.

Every refused case must end as the CLI promises: exit status 2, exactly one line on
stderr that starts "minislm: error:" and names the file or flag, no traceback,
nothing on stdout, nothing written half-way. Legal cases must do what a user
expects. Most cases run `minislm.cli.main` in this process (fast, and any
traceback fails the test); the few that need a real process (argv bytes,
dropped privileges, signals) run one.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from threadpoolctl import threadpool_limits

import minislm
from minislm.cli import main
from minislm.compile_notice import NOTICE
from minislm.errors import MinislmError
from conftest import FIXTURES, ROOT

GQA = FIXTURES / "gqa"  # 2 layers, hidden 32, context 128, vocab 384, float32, a chat template


@pytest.fixture(autouse=True)
def one_blas_thread():
    """The fixtures are tiny: BLAS threads only contend on a shared machine."""
    with threadpool_limits(1):
        yield


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without the compile notice: a cold Numba cache legitimately announces
    itself before the kernel that finds a damaged matrix runs."""
    return [line for line in err.strip().splitlines() if line != NOTICE]


def assert_refused(result, *fragments):
    code, out, err = result
    lines = error_lines(err)
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("minislm: error: "), lines[0]
    assert "Traceback" not in err
    assert out == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_ran(result):
    code, out, err = result
    assert code == 0, err
    assert "Traceback" not in err and "error" not in err
    return out


@pytest.fixture
def model_dir(tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(GQA, target)
    return target


def edit_json(path: Path, **changes) -> None:
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


DELETE = object()


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def generate(model, *flags):
    return ["generate", "--model", model, "hello", "-n", "4", "--no-chat-template", *flags]


# ---------------------------------------------------------------- damaged weights


def poison(name, index, value):
    def edit(tensors):
        tensors[name].reshape(-1)[index] = value
    return edit


def poison_embedding_row_of_the_prompt(tensors):
    from minislm.tokenizer import load_tokenizer

    first = load_tokenizer(GQA).encode("hello")[1]
    tensors["model.embed_tokens.weight"][first, 3] = np.nan


DAMAGED = [
    # (edit, command flags, what the one line must name)
    (poison("model.layers.0.input_layernorm.weight", 5, np.nan), [], ["model.layers.0.input_layernorm.weight", "NaN/Inf"]),
    (poison("model.norm.weight", 0, np.inf), [], ["model.norm.weight"]),
    (poison("model.layers.1.post_attention_layernorm.weight", 2, np.nan), ["--quant", "bf16"], ["post_attention_layernorm"]),
    (poison("model.layers.1.post_attention_layernorm.weight", 2, -np.inf), ["--quant", "int4"], ["post_attention_layernorm"]),
    # big matrices on the float32 path: found by the logits check, named by the re-run
    (poison("model.layers.1.mlp.down_proj.weight", 7, np.nan), [], ["NaN/Inf logits", "layer 1", "model.layers.1.mlp.down_proj.weight"]),
    (poison("model.layers.0.self_attn.qkv_proj.weight", 7, np.inf), [], ["layer 0", "qkv_proj"]),
    (poison("lm_head.weight", 100, np.nan), [], ["lm_head", "'lm_head.weight'"]),
    (poison_embedding_row_of_the_prompt, [], ["embedding rows", "model.embed_tokens.weight"]),
    # packed paths check every matrix while packing
    (poison("model.layers.0.mlp.gate_up_proj.weight", 3, np.nan), ["--quant", "bf16"], ["model.layers.0.mlp.gate_up_proj.weight"]),
    (poison("model.layers.0.mlp.gate_up_proj.weight", 3, np.inf), ["--quant", "int4"], ["model.layers.0.mlp.gate_up_proj.weight"]),
]


@pytest.mark.parametrize("edit, flags, fragments", DAMAGED)
def test_damaged_weights_are_named(capsys, model_dir, edit, flags, fragments):
    edit_tensors(model_dir, edit)
    assert_refused(cli(capsys, *generate(model_dir, *flags)), *fragments)


@pytest.mark.parametrize("command", ["chat", "perplexity"])
def test_damaged_matrix_stops_chat_and_perplexity_too(capsys, monkeypatch, model_dir, tmp_path, command):
    """`perplexity` used to print "nan nats/char"; chat an empty reply."""
    edit_tensors(model_dir, poison("model.layers.1.mlp.down_proj.weight", 7, np.nan))
    if command == "chat":
        monkeypatch.setattr("builtins.input", lambda prompt="": "hello")
        result = cli(capsys, "chat", "--model", model_dir)
    else:
        (tmp_path / "t.txt").write_text("some text to score")
        result = cli(capsys, "perplexity", "--model", model_dir, "--file", tmp_path / "t.txt")
    code, out, err = result
    err = "\n".join(line for line in err.splitlines() if not line.startswith("minislm chat with"))  # the banner
    assert_refused((code, "", err), "layer 1", "down_proj")
    assert "nan" not in out


def test_quantize_refuses_a_damaged_norm_and_writes_nothing(capsys, model_dir, tmp_path):
    edit_tensors(model_dir, poison("model.layers.1.input_layernorm.weight", 0, np.nan))
    assert_refused(cli(capsys, "quantize", "--model", model_dir, "--out", tmp_path / "q"), "input_layernorm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_finder_names_the_first_non_finite_layer_on_packed_weights(model_dir):
    """The diagnosis reads packed (bf16/int4) weights too: an int4 scale set to a bf16 NaN."""
    from minislm.finite import first_non_finite

    model = minislm.load(model_dir, quant="int4")
    model.weights["model.layers.1.mlp.down_proj.weight"].scales[0, 0, 0] = 0x7FC0  # bf16 NaN
    where = first_non_finite(model, [1, 5, 9, 13])
    assert "layer 1" in where and "model.layers.1.mlp.down_proj.weight" in where
    with pytest.raises(MinislmError, match="layer 1"):
        model.logits([1, 5, 9, 13])
    with pytest.raises(MinislmError, match="layer 1"):
        list(model.generate([1, 5, 9, 13], 3))


# ---------------------------------------------------------------- the safetensors file itself


def overlap_fully(header):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


def overlap_partly(header):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    begin, end = header[a]["data_offsets"]
    header[b]["data_offsets"] = [begin + 4, end + 4]


def huge_shape(shape, offsets=None):
    def edit(header):
        entry = header["model.norm.weight"]
        entry["shape"] = shape
        if offsets is not None:
            entry["data_offsets"] = offsets
    return edit


SAFETENSORS = [
    (overlap_fully, ["model.safetensors", "overlap"]),
    (overlap_partly, ["model.safetensors", "overlap"]),
    # a size that wraps around in int64 must not look like a small one
    (huge_shape([2**32, 2**32]), ["model.safetensors", "model.norm.weight"]),
    (huge_shape([2**62, 4]), ["model.safetensors", "model.norm.weight"]),
    (huge_shape([0, 2**60], offsets=[0, 0]), ["model.safetensors", "model.norm.weight"]),
    (huge_shape([-1, 32]), ["model.safetensors", "model.norm.weight"]),
    (huge_shape([1.5, 32]), ["model.safetensors", "model.norm.weight"]),
    (huge_shape(["32"]), ["model.safetensors", "model.norm.weight"]),
    (huge_shape("32"), ["model.safetensors", "model.norm.weight"]),
    (lambda h: h["model.norm.weight"].update(data_offsets=[1.0, 129.0]), ["model.norm.weight"]),
    (lambda h: h["model.norm.weight"].update(data_offsets=[-4, 124]), ["model.norm.weight"]),
    (lambda h: h["model.norm.weight"].update(dtype="F8_E9M9"), ["model.norm.weight", "dtype"]),
    (lambda h: h.update({"model.norm.weight": "x"}), ["model.norm.weight"]),
]


@pytest.mark.parametrize("edit, fragments", SAFETENSORS)
def test_safetensors_header_lies(capsys, model_dir, edit, fragments):
    header, body = read_header(model_dir / "model.safetensors")
    edit(header)
    write_header(model_dir / "model.safetensors", header, body)
    assert_refused(cli(capsys, *generate(model_dir)), *fragments)


def test_bytes_that_belong_to_no_tensor(capsys, model_dir):
    with open(model_dir / "model.safetensors", "ab") as f:
        f.write(b"#!/bin/sh\necho polyglot\n")
    assert_refused(cli(capsys, *generate(model_dir)), "model.safetensors", "belong to no tensor")


@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    target = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "sharded_bf16", target)
    return target


@pytest.mark.parametrize("shard", ["/etc/passwd", "../model/model.safetensors", "a/../../b.safetensors", "C:/x.safetensors", 5, ""])
def test_shard_paths_must_stay_in_the_folder(capsys, sharded_dir, tmp_path, shard):
    shutil.copytree(GQA, tmp_path / "model")  # a real file a "../" path would reach
    index = sharded_dir / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    first = next(iter(raw["weight_map"]))
    raw["weight_map"][first] = shard
    index.write_text(json.dumps(raw))
    assert_refused(cli(capsys, *generate(sharded_dir)), "model.safetensors.index.json")


# ---------------------------------------------------------------- config.json


CONFIG_VALUES = [
    ("rms_norm_eps", "abc"), ("rms_norm_eps", -1e-5), ("rms_norm_eps", 0), ("rms_norm_eps", float("inf")),
    ("rope_theta", "abc"), ("rope_theta", -10000.0),
    ("eos_token_id", "abc"), ("eos_token_id", [354, "x"]), ("eos_token_id", -3), ("eos_token_id", True),
    ("rope_scaling", "linear"), ("rope_scaling", ["longrope"]), ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_scaling", {"type": "longrope", "short_factor": "abc", "long_factor": [1.0] * 2}),
    ("rope_parameters", 7),
    ("hidden_size", "32"), ("hidden_size", 32.0), ("hidden_size", 0), ("hidden_size", -32),
    ("num_hidden_layers", 10**9), ("num_hidden_layers", None), ("num_key_value_heads", "2"),
    ("tie_word_embeddings", "false"), ("sliding_window", True), ("bos_token_id", "x"),
    ("max_position_embeddings", "128"), ("max_position_embeddings", 0), ("partial_rotary_factor", "x"),
    ("head_dim", "x"), ("vocab_size", None), ("original_max_position_embeddings", "4096"),
]


@pytest.mark.parametrize("key, value", CONFIG_VALUES, ids=[f"{k}={v!r}"[:40] for k, v in CONFIG_VALUES])
def test_config_values_of_the_wrong_type_or_range(capsys, model_dir, key, value):
    if key in ("partial_rotary_factor", "rope_theta"):
        edit_json(model_dir / "config.json", rope_parameters=DELETE)  # else the nested value wins
    edit_json(model_dir / "config.json", **{key: value})
    code, out, err = cli(capsys, *generate(model_dir))
    assert_refused((code, out, err), "config.json")
    assert key in err or ("rope" in key and "rope" in err), err


# ---------------------------------------------------------------- sizes that do not fit


def test_a_huge_context_allocates_only_what_the_run_needs(capsys, model_dir):
    edit_json(model_dir / "config.json", max_position_embeddings=10**15)
    assert assert_ran(cli(capsys, *generate(model_dir)))


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", "{model}", "hello", "--no-chat-template", "--max-tokens", str(10**13)],
        ["chat", "--model", "{model}", "--ctx-size", str(10**12)],
    ],
    ids=["generate --max-tokens", "chat --ctx-size"],
)
def test_a_kv_cache_larger_than_memory_is_refused_before_allocating(capsys, model_dir, argv):
    edit_json(model_dir / "config.json", max_position_embeddings=10**15)
    argv = [str(model_dir) if a == "{model}" else a for a in argv]
    assert_refused(cli(capsys, *argv), "KV cache", "GiB", "--ctx-size")


def test_logits_refuse_ids_past_the_context():
    model = minislm.load(GQA)
    with pytest.raises(MinislmError, match="context is 128"):
        model.logits(np.ones(129, dtype=np.int64))


# ---------------------------------------------------------------- generation_config.json


GENERATION_VALUES = [
    ("temperature", -1), ("temperature", "hot"), ("top_p", 5), ("top_p", 0), ("top_k", -3), ("top_k", 2.5),
    ("min_p", 2), ("repetition_penalty", 0), ("repetition_penalty", float("nan")), ("do_sample", "yes"),
    ("eos_token_id", "abc"),
]


@pytest.mark.parametrize("key, value", GENERATION_VALUES)
def test_generation_config_values_out_of_range(capsys, model_dir, key, value):
    edit_json(model_dir / "generation_config.json", **{"do_sample": True, key: value})
    assert_refused(cli(capsys, *generate(model_dir)), "generation_config.json", key)


# ---------------------------------------------------------------- chat templates


HOSTILE_TEMPLATES = [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ messages + 1 }}", "TypeError"),
    ("{% if %}", "TemplateSyntaxError"),
    ("{{ raise_exception('this template wants a system message') }}", "wants a system message"),
    ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    ("{{ 'x' * 10**10 }}", "memory"),  # 10 GB in one string
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "characters"),  # 100 MB of output
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
     "{% endfor %}{% endfor %}{% endfor %}", "longer than"),  # 10**15 iterations
]


@pytest.mark.parametrize("template, fragment", HOSTILE_TEMPLATES, ids=[f for _, f in HOSTILE_TEMPLATES])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_hostile_chat_templates_end_cleanly(capsys, monkeypatch, model_dir, template, fragment, command):
    monkeypatch.setattr("minislm.tokenizer.TIMEOUT_SECONDS", 3.0)  # the default 5 s, shortened for the suite
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("chat must stop before the first prompt"))
    edit_json(model_dir / "tokenizer_config.json", chat_template=template)
    start = time.perf_counter()
    argv = ["generate", "--model", model_dir, "hello", "-n", "2"] if command == "generate" else ["chat", "--model", model_dir]
    assert_refused(cli(capsys, *argv), "tokenizer_config.json", "chat template", fragment)
    assert time.perf_counter() - start < 30


def test_template_bound_works_off_the_main_thread(model_dir):
    """A server renders templates in request threads, where SIGALRM cannot reach."""
    import threading

    from minislm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    tokenizer.template_timeout = 1.0
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(MinislmError, tokenizer.render_chat, [])))
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive() and "longer than 1 s" in str(errors[0].value)


# ---------------------------------------------------------------- flags and values users get wrong


FLAGS = [
    (["--model", ""], ["--model", "empty"]),
    (["--model", "   "], ["--model", "empty"]),
    (["--temp", "inf"], ["--temp", "finite"]),
    (["--temp", "nan"], ["--temp"]),
    (["--repeat-penalty", "inf"], ["--repeat-penalty"]),
    (["--seed", "-2"], ["--seed", "-1 for a random seed"]),
    (["--top-k", "-1"], ["--top-k"]),
    (["--group-size", "64"], ["--group-size 64", "int4 weights only"]),
    (["--asymmetric"], ["--asymmetric", "int4 weights only"]),
    (["--quant", "bf16", "--group-size", "64"], ["--group-size 64"]),
]


@pytest.mark.parametrize("flags, fragments", FLAGS, ids=[" ".join(f) for f, _ in FLAGS])
def test_flags_that_were_silently_accepted(capsys, flags, fragments):
    argv = ["generate", "hello", "-n", "2", "--no-chat-template", *flags]
    if "--model" not in flags:
        argv += ["--model", GQA]
    assert_refused(cli(capsys, *argv), *fragments)


@pytest.mark.parametrize("flags", [["--stride", "0"], ["--stride", "-4"], ["--window", "0"], ["--window", "16", "--stride", "16"]])
def test_perplexity_window_and_stride(capsys, tmp_path, flags):
    (tmp_path / "t.txt").write_text("some text to score " * 10)
    assert_refused(cli(capsys, "perplexity", "--model", GQA, "--file", tmp_path / "t.txt", *flags), flags[-2])


@pytest.fixture(scope="module")
def int4_g32(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "gqa-int4"
    assert main(["quantize", "--model", str(GQA), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--group-size", "64"], ["--group-size 64", "group 32"]),
        (["--asymmetric"], ["--asymmetric", "symmetric, group 32"]),
        (["--quant", "bf16"], ["--quant bf16", "already quantized"]),
    ],
)
def test_flags_that_contradict_an_int4_folder(capsys, int4_g32, flags, fragments):
    assert_refused(cli(capsys, *generate(int4_g32, *flags)), *fragments)
    assert assert_ran(cli(capsys, *generate(int4_g32, "--group-size", "32", "--quant", "int4")))


def test_verify_refuses_a_minislm_int4_folder(capsys, int4_g32):
    """transformers would load it with random weights in place of qweight/scales."""
    assert_refused(cli(capsys, "verify", "--model", int4_g32), "int4", "transformers cannot load")


def test_seed_minus_one_samples_with_a_random_seed(capsys):
    runs = [assert_ran(cli(capsys, *generate(GQA, "-n", "24", "--temp", "1", "--seed", "-1"))) for _ in range(2)]
    assert runs[0] != runs[1]  # 24 tokens from a near-uniform 384-id model: equal by chance ~never


def test_bench_cache_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    assert_refused(cli(capsys, "bench", "--small", "--cache-dir", tmp_path / "cache"), "--cache-dir", "is a file")


# ---------------------------------------------------------------- output folders


def test_quantize_stops_cleanly_when_the_disk_fails_mid_write(capsys, monkeypatch, tmp_path):
    """Simulated ENOSPC halfway through the weights: one line, no folder, no staging left."""
    import minislm.quantize as quantize

    def write_half_then_fail(path, entries, arrays, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize, "write_safetensors", write_half_then_fail)
    assert_refused(cli(capsys, "quantize", "--model", GQA, "--out", tmp_path / "q"), "--out", "No space left", "nothing was written")
    assert list(tmp_path.iterdir()) == []


# What root cannot do once it drops its capabilities: read a mode-000 folder, write in
# a mode-555 one. (chmod alone proves nothing as root: root reads everything.)
UNPRIVILEGED_CASES = """
import json, sys
from minislm.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    import io, contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_without_privileges(argv_list):
    """Run CLI cases in a child that cannot bypass file permissions (no capabilities,
    or not root at all)."""
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop the capability to read any file")
        prefix = [setpriv, "--bounding-set=-all", "--inh-caps=-all"]
    result = subprocess.run(
        prefix + [sys.executable, "-c", UNPRIVILEGED_CASES, json.dumps(argv_list)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_unreadable_and_unwritable_folders(tmp_path):
    tmp_path.chmod(0o755)
    locked, cases = [], []
    for name, path_in_model in [("folder", None), ("weights", "model.safetensors"), ("config", "config.json"),
                                ("tokenizer", "tokenizer.json"), ("tokenizer_config", "tokenizer_config.json")]:
        folder = tmp_path / name
        shutil.copytree(GQA, folder)
        locked.append(folder if path_in_model is None else folder / path_in_model)
        cases.append(generate(str(folder), "-n", "1"))
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    cases.append(["quantize", "--model", str(GQA), "--out", str(read_only / "q")])
    try:
        for target in locked:
            target.chmod(0o000)
        read_only.chmod(0o555)
        results = run_without_privileges([[str(a) for a in argv] for argv in cases])
    finally:
        for target in locked:
            target.chmod(0o755)
        read_only.chmod(0o755)
    expected = [["permission denied"], ["model.safetensors", "Permission denied"], ["config.json", "Permission denied"],
                ["tokenizer.json"], ["tokenizer_config.json", "Permission denied"], ["--out", "permission denied"]]
    for (code, err), fragments in zip(results, expected, strict=True):
        assert_refused((code, "", err), *fragments)
    assert list(read_only.iterdir()) == []


# ---------------------------------------------------------------- bytes that are not UTF-8


def run_minislm(*args, stdin: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-m", "minislm", *args], capture_output=True, timeout=300,
        input=stdin if stdin is not None else b"", env=dict(os.environ, PYTHONIOENCODING="utf-8"),
    )


@pytest.mark.parametrize(
    "how", ["argument", "--file", "stdin"],
)
def test_a_prompt_that_is_not_utf8(tmp_path, how):
    bad = b"caf\xe9 \xff"
    if how == "argument":
        result = run_minislm("generate", "--model", str(GQA), bad)
        fragment = "PROMPT"
    elif how == "--file":
        (tmp_path / "p.txt").write_bytes(bad)
        result = run_minislm("generate", "--model", str(GQA), "--file", str(tmp_path / "p.txt"))
        fragment = "--file"
    else:
        result = run_minislm("generate", "--model", str(GQA), "-p", "-", stdin=bad)
        fragment = "stdin"
    err = result.stderr.decode()
    assert_refused((result.returncode, result.stdout.decode(), err), fragment, "UTF-8", "0xe9")


def test_a_chat_line_that_is_not_utf8_does_not_end_the_session():
    result = run_minislm("chat", "--model", str(GQA), "-n", "3", stdin=b"caf\xe9\nhello\n/bye\n")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert "not valid UTF-8" in err and "nothing was sent" in err
    assert sum(line.startswith("[prompt") for line in err.splitlines()) == 1  # "hello" got its reply


# ---------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def gqa_model():
    return minislm.load(GQA)


@pytest.mark.parametrize(
    "ids, error",
    [
        ([[1, 2, 3]], ValueError),  # 2-D: would have been flattened
        (np.ones((2, 3), dtype=np.int64), ValueError),
        ([1.7, 2.2], TypeError),  # floats: would have been truncated
        ([True, False], TypeError),  # bools: would have been ids 1 and 0
        (["1", "2"], TypeError),
        ([], ValueError),
        ([1, 384], MinislmError),  # past the vocabulary
        ([-1], MinislmError),
    ],
)
def test_model_logits_refuses_ids_it_would_misread(gqa_model, ids, error):
    with pytest.raises(error):
        gqa_model.logits(ids)


@pytest.mark.parametrize(
    "args, kwargs, error",
    [
        (([1, 2], -1), {}, ValueError),
        (([1, 2], 2.5), {}, TypeError),
        (([1, 2], 4), dict(temperature=-1.0), ValueError),
        (([1, 2], 4), dict(top_p=5.0), ValueError),
        (([1, 2], 4), dict(seed=-7), ValueError),
        ((list(range(1, 130)), 4), {}, MinislmError),  # the prompt alone fills the 128-token context
        (([[1, 2]], 4), {}, ValueError),
    ],
)
def test_model_generate_checks_its_arguments_when_called(gqa_model, args, kwargs, error):
    with pytest.raises(error):
        gqa_model.generate(*args, **kwargs)  # not iterated: the error comes from the call itself


def test_model_generate_is_still_lazy_for_good_arguments(gqa_model):
    tokens = gqa_model.generate([1, 2, 3], 5)
    assert len(list(tokens)) <= 5
