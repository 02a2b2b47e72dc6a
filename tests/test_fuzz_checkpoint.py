"""Fuzz: the shipped model's safetensors header and config.json, corrupted at random.

A seeded mutator (the same cases every run; the seed is the case number) damages a
copy of minislm/assets/shakespeare in one way per case, then runs
`minislm generate` on it in this process. Every outcome must be one of:

* a clean error: exit status 2 and exactly one line "minislm: error: ...";
* a correct load: exit 0 with text, where
  - for a damaged header, every tensor minislm read is byte for byte the tensor
    the safetensors format's own reader (`safetensors.deserialize`, the Rust
    implementation) reads from the same file, and a file that reader refuses is
    refused by minislm too (except damage confined to `__metadata__`, which
    minislm does not read);
  - for a damaged config.json that still parses to the same ModelConfig and
    GenerationConfig as the original, the text is the original's text.

Never a traceback (any exception but the CLI's own return fails the test) and
never a hang (a watchdog ends the process if one case runs past 60 s).
"""

import faulthandler
import json
import random
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors
from threadpoolctl import threadpool_limits

from minislm.cli import main
from minislm.config import load_config, load_generation_config
from minislm.errors import MinislmError
from minislm.load import BUNDLED_MODEL
from minislm.weights import read_safetensors

HEADER_CASES = 120
CONFIG_CASES = 160
CASE_TIMEOUT_SECONDS = 60
PROMPT_ARGS = ["-n", "3", "--no-chat-template", "ROMEO:"]

JUNK = ["abc", "", -1, 0, 1, 3, 2**31, 2**63, 10**30, 1e308, -1e-9, 0.5, 1.5, None, True, False, [], [1], [1, "x"],
        {}, {"type": "x"}, "1e-5", float("nan"), float("inf")]
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "I64", "F64", "BOOL", "U16", "F8_E4M3", "bf16", 7]


@pytest.fixture(scope="module")
def original():
    raw = (BUNDLED_MODEL / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return {
        "header": json.loads(raw[8 : 8 + n]),
        "body": raw[8 + n :],
        "config": json.loads((BUNDLED_MODEL / "config.json").read_text()),
    }


@pytest.fixture(scope="module")
def expected_text(tmp_path_factory):
    folder = model_copy(tmp_path_factory.mktemp("pristine"))
    return run(folder)[1]


def model_copy(folder: Path) -> Path:
    """The shipped model's folder, with model.safetensors linked (cases replace it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BUNDLED_MODEL / name, folder / name)
    (folder / "model.safetensors").symlink_to(BUNDLED_MODEL / "model.safetensors")
    return folder


def run(folder: Path):
    """`minislm generate` in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    faulthandler.dump_traceback_later(CASE_TIMEOUT_SECONDS, exit=True)  # a hang ends the run, loudly
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), threadpool_limits(1):
            code = main(["generate", "--model", str(folder), *PROMPT_ARGS])
    finally:
        faulthandler.cancel_dump_traceback_later()
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- the mutator


def mutate_header(rng: random.Random, header: dict, body: bytes) -> tuple[bytes, str]:
    """One random corruption of the file; returns its bytes and a word for the kind."""
    header = json.loads(json.dumps(header))
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["field", "shape", "offsets", "swap", "overlap", "dtype", "delete", "duplicate",
                       "metadata", "flip", "length", "truncate", "append"])
    if kind == "field":
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(JUNK)
    elif kind == "shape":
        shape = entry["shape"]
        op = rng.choice(["reverse", "extra", "double", "zero", "huge", "drop"])
        if op == "reverse":
            shape.reverse()
        elif op == "extra":
            shape.insert(rng.randrange(len(shape) + 1), 1)
        elif op == "double":
            shape[rng.randrange(len(shape))] *= 2
        elif op == "zero":
            shape[rng.randrange(len(shape))] = 0
        elif op == "huge":
            shape[rng.randrange(len(shape))] = 2 ** rng.choice([31, 32, 40, 62, 63, 64, 100])
        elif shape:
            shape.pop()
    elif kind == "offsets":
        begin, end = entry["data_offsets"]
        delta = rng.choice([-8, -2, -1, 1, 2, 8, 4096, 2**40])
        entry["data_offsets"] = rng.choice([[begin + delta, end + delta], [begin, end + delta], [begin + delta, end]])
    elif kind in ("swap", "overlap"):
        other = header[rng.choice(names)]
        if kind == "swap":  # same-sized tensors swapped: a valid, different file
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
        else:
            entry["data_offsets"] = list(other["data_offsets"])
    elif kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == "delete":
        del header[name]
    elif kind == "duplicate":
        header[name + rng.choice([".copy", "_", ""]) + "x"] = dict(entry)
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 5}, "junk", [], {"a": {"b": 1}}, None])
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + body
    if kind == "flip":  # a random byte of the header text
        at = rng.randrange(8, 8 + len(raw))
        data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    elif kind == "length":
        n = len(raw) + rng.choice([-16, -1, 1, 7, 10**6, 2**63])
        data = struct.pack("<Q", max(n, 0) % 2**64) + data[8:]
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "append":
        data = data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100])))
    return data, kind


def mutate_config(rng: random.Random, config: dict) -> tuple[str, str]:
    config = json.loads(json.dumps(config))
    kind = rng.choice(["value", "value", "value", "delete", "add", "rope", "flip", "truncate"])
    key = rng.choice(sorted(config))
    if kind == "value":
        config[key] = rng.choice(JUNK)
    elif kind == "delete":
        del config[key]
    elif kind == "add":
        config[rng.choice(["head_dim", "partial_rotary_factor", "sliding_window", "rope_parameters", "x"])] = rng.choice(JUNK)
    elif kind == "rope":
        length = rng.choice([0, 8, 16, 17])
        config["rope_scaling"] = {
            "type": rng.choice(["longrope", "su", "default", "linear", 3]),
            "short_factor": [rng.choice([1.0, 2.0, -1.0, "x"]) for _ in range(length)],
            "long_factor": [1.0] * 16,
        }
        config["original_max_position_embeddings"] = rng.choice([1, 2, 128, 512, "x", None])
    text = json.dumps(config, allow_nan=True)
    if kind == "flip":
        at = rng.randrange(len(text))
        text = text[:at] + chr(rng.randrange(32, 127)) + text[at + 1 :]
    elif kind == "truncate":
        text = text[: rng.randrange(len(text))]
    return text, kind


# ---------------------------------------------------------------- the checks


def assert_clean_error(code, out, err, what):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("minislm: error: "), f"{what}: {code} {err!r}"
    assert out == "", what


def reference_tensors(data: bytes):
    """The safetensors format's own reader, or None where it refuses the file."""
    try:
        return {name: spec for name, spec in safetensors.deserialize(data)}
    except Exception:  # SafetensorError and friends: refused
        return None


def test_corrupted_safetensors_headers(tmp_path, original, expected_text):
    outcomes = Counter()
    for case in range(HEADER_CASES):
        rng = random.Random(case)
        data, kind = mutate_header(rng, original["header"], original["body"])
        folder = model_copy(tmp_path / f"h{case}")
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").write_bytes(data)
        code, out, err = run(folder)
        what = f"header case {case} ({kind})"
        reference = reference_tensors(data)
        if code != 0:
            assert_clean_error(code, out, err, what)
            outcomes["refused"] += 1
        else:
            assert reference is not None or kind == "metadata", f"{what}: loaded a file the safetensors reader refuses"
            ours = read_safetensors(folder / "model.safetensors")
            if reference is not None:
                assert sorted(ours) == sorted(reference), what
                for name, tensor in ours.items():
                    spec = reference[name]
                    assert (tensor.dtype, list(tensor.array.shape)) == (spec["dtype"], list(spec["shape"])), what
                    assert np.ascontiguousarray(tensor.array).tobytes() == bytes(spec["data"]), what
            outcomes["loaded, same text" if out == expected_text else "loaded, other weights"] += 1
        shutil.rmtree(folder)
    print(f"\n{HEADER_CASES} header cases: {dict(outcomes)}")
    assert sum(outcomes.values()) == HEADER_CASES
    assert outcomes["refused"] > HEADER_CASES // 2  # the mutator does damage


def test_corrupted_config_json(tmp_path, original, expected_text):
    pristine = model_copy(tmp_path / "pristine")
    expected_configs = (load_config(pristine), load_generation_config(pristine, load_config(pristine)))
    outcomes = Counter()
    for case in range(CONFIG_CASES):
        rng = random.Random(10_000 + case)
        text, kind = mutate_config(rng, original["config"])
        folder = model_copy(tmp_path / f"c{case}")
        (folder / "config.json").write_text(text)
        code, out, err = run(folder)
        what = f"config case {case} ({kind}): {text[:200]}"
        if code != 0:
            assert_clean_error(code, out, err, what)
            outcomes["refused"] += 1
        else:
            try:
                same = (load_config(folder), load_generation_config(folder, load_config(folder))) == expected_configs
            except MinislmError:
                pytest.fail(f"{what}: generate ran but the config does not load")
            if same:
                assert out == expected_text, what
            outcomes["loaded, same config, same text" if same else "loaded, another valid config"] += 1
        shutil.rmtree(folder)
    print(f"\n{CONFIG_CASES} config cases: {dict(outcomes)}")
    assert sum(outcomes.values()) == CONFIG_CASES
