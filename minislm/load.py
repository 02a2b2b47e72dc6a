"""`minislm.load`: from a folder or repo id to a ready `Model`.

The order is the order of trust: find the folder, read config.json, open and check
every tensor against the shapes the config implies, and only then convert or pack
weights. A bad checkpoint fails before any large allocation.
"""

import os
from pathlib import Path

import numpy as np

from .cache import DTYPES as KV_DTYPES
from .config import load_config, load_generation_config, read_json
from .errors import MinislmError
from .hub import resolve_model_dir
from .model import Model
from .quantize import QuantConfig, pack_weights, read_packed_weights
from .streaming import release, widen
from .tokenizer import load_tokenizer
from .weights import check_tensors, expected_shapes, read_checkpoint, split_fused_experts


def load(
    model: str | os.PathLike,
    revision: str | None = None,
    quant: str | None = None,
    group_size: int = 32,
    symmetric: bool = True,
    kv_cache: str | None = None,
) -> Model:
    """Load a Phi-3 or PhiMoE checkpoint (local folder or Hugging Face repo id).

    quant=None: float32 weights, the reference path (an int4 checkpoint made by
    `minislm quantize` stays int4). quant="bf16": matrices kept as bf16 words,
    memory-mapped as they are when the checkpoint is bf16. quant="int4": matrices
    quantized now, group-wise along the inputs (`group_size` 32/64/128, symmetric
    or with zero points). kv_cache: the KV cache's dtype ("float32", "float16",
    "int8"); by default float32 for float32 weights, float16 for packed ones.
    """
    if kv_cache is not None and kv_cache not in KV_DTYPES:
        raise MinislmError(f"--kv-cache {kv_cache}: choose one of {', '.join(KV_DTYPES)}")
    model_dir = resolve_model_dir(model, revision)
    config = load_config(model_dir)
    tensors = split_fused_experts(read_checkpoint(model_dir), config, model_dir)
    stored = stored_quantization(model_dir)
    if stored is not None:
        if quant not in (None, stored.format):
            raise MinislmError(f"--quant {quant}: {model_dir} is already quantized to {stored.describe()}")
        weights = read_packed_weights(tensors, config, stored, model_dir)
        used = stored
    else:
        check_tensors(tensors, config, model_dir)
        used = QuantConfig(quant, group_size, symmetric) if quant else None
        if used is None:
            # Only the tensors the forward reads (a tied checkpoint may carry a spare lm_head copy).
            weights = {name: widened(name, tensors[name]) for name in expected_shapes(config)}
        else:
            weights = pack_weights(tensors, config, used, model_dir)
    return Model(
        config,
        weights,
        tokenizer=load_tokenizer(model_dir),
        generation_config=load_generation_config(model_dir, config),
        path=Path(model_dir),
        quant=used,
        kv_cache=kv_cache,
    )


def widened(name: str, tensor) -> np.ndarray:
    """A float32 weight: F32 stays memory-mapped; F16/BF16 widen in one parallel pass,
    after which the file's pages of that tensor leave our RSS (minislm.streaming)."""
    values = np.ascontiguousarray(widen(name, tensor))
    if tensor.dtype != "F32":
        release(tensor.array)
    return values


def stored_quantization(model_dir: Path) -> QuantConfig | None:
    """The quantization_config a `minislm quantize` checkpoint records, if any."""
    path = Path(model_dir) / "config.json"
    raw = read_json(path).get("quantization_config")
    return None if raw is None else QuantConfig.from_json(raw, str(path))
