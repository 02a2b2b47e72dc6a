"""Build 4-bit hub-style folders (AWQ, GPTQ, MLX) from the committed fixtures, for the tests.

Each test file packs with its own packer, written from its format's definition; this
module only does the common part: pick known integer codes, zero points and scales for
every matrix of a fixture, let the packer store them, and write (a) the packed folder
and (b) a float32 folder holding the weights those integers define, which minislm
loads through its ordinary float path. The two must give the same model.
"""

import json
import shutil
from pathlib import Path

import numpy as np

from minislm.weights import read_checkpoint, save_safetensors, write_safetensors

COMPANIONS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")


def known_integers(rng, shape, group_size, symmetric, zero_range=(0, 15)):
    """Codes in 0..15, zero points (8 when symmetric) and positive fp16 scales per group."""
    out, n = shape
    codes = rng.integers(0, 16, (out, n), dtype=np.uint8)
    zeros = np.full((out, n // group_size), 8, np.uint8) if symmetric else \
        rng.integers(zero_range[0], zero_range[1] + 1, (out, n // group_size), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.5, (out, n // group_size)) / (4 * np.sqrt(n))).astype(np.float16)
    return codes, zeros, scales


def write_folders(fixture: Path, root: Path, quantization: dict, pack, config_key="quantization_config",
                  packed=lambda name: True):
    """Pack every 2-D `.weight` of `fixture` for which `packed(name)` holds with `pack(name, w_shape)`,
    which returns ({part name: array}, float32 weights the parts define). Writes
    root/"packed" (the format's folder) and root/"float" (those weights as float32)."""
    config = json.loads((fixture / "config.json").read_text())
    hub = {name: t.float32() for name, t in read_checkpoint(fixture).items()}
    packed_arrays, float_arrays = {}, {}
    for name, w in hub.items():
        if w.ndim == 2 and name.endswith(".weight") and packed(name):
            parts, dequantized = pack(name, w.shape)
            packed_arrays.update(parts)
            float_arrays[name] = dequantized
        else:
            packed_arrays[name] = float_arrays[name] = w
    for kind, arrays in (("packed", packed_arrays), ("float", float_arrays)):
        folder = root / kind
        folder.mkdir(parents=True)
        save(folder / "model.safetensors", arrays)
        for companion in COMPANIONS:
            if (fixture / companion).is_file():
                shutil.copy(fixture / companion, folder / companion)
        written = dict(config, **({config_key: quantization} if kind == "packed" else {}))
        (folder / "config.json").write_text(json.dumps(written, indent=1))
    return root / "packed", root / "float", float_arrays


def save(path: Path, arrays: dict) -> None:
    """float16 and bfloat16 (given as ("BF16", uint16 words)) beside the usual dtypes."""
    plain = {k: v for k, v in arrays.items() if not isinstance(v, tuple)}
    if len(plain) == len(arrays):
        save_safetensors(path, arrays)
        return
    tags = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
            np.dtype(np.uint32): "U32", np.dtype(np.uint8): "U8"}
    entries = {k: (v[0], v[1].shape) if isinstance(v, tuple) else (tags[v.dtype], v.shape) for k, v in arrays.items()}
    write_safetensors(path, entries, [v[1] if isinstance(v, tuple) else v for v in arrays.values()])


def set_quantization(folder: Path, quantization: dict, key="quantization_config") -> None:
    config = json.loads((folder / "config.json").read_text())
    config[key] = quantization
    (folder / "config.json").write_text(json.dumps(config))
