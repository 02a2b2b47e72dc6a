"""`minislm.load`: from a folder or repo id to a ready `Model`.

The order is the order of trust: find the folder, read config.json, open and check
every tensor against the shapes the config implies, and only then convert or pack
weights. A bad checkpoint fails before any large allocation.
"""

import os
from pathlib import Path

import numpy as np

from .cache import DTYPES as KV_DTYPES
from .compile_notice import announce_compilation
from .config import load_config, load_generation_config, read_json
from .errors import MinislmError
from .hub import resolve_model_dir
from .model import Model
from .quantize import QuantConfig, pack_weights, packable, read_packed_weights
from .streaming import release, widen
from .tokenizer import load_tokenizer
from .weights import check_tensors, expected_shapes, read_checkpoint, split_fused_experts

# The small model shipped inside the package: what `load()` and the CLI use by default.
BUNDLED_MODEL = Path(__file__).parent / "assets" / "shakespeare"


def load(
    model: str | os.PathLike | None = None,
    revision: str | None = None,
    quant: str | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    kv_cache: str | None = None,
) -> Model:
    """Load a Phi-3 or PhiMoE checkpoint (local folder or Hugging Face repo id; by
    default the small Shakespeare model shipped inside the package).

    quant=None: float32 weights, the reference path (an int4 checkpoint made by
    `minislm quantize` stays int4). quant="bf16": matrices kept as bf16 words,
    memory-mapped as they are when the checkpoint is bf16. quant="int4": matrices
    quantized now, group-wise along the inputs (`group_size` 32/64/128, default 32;
    symmetric unless symmetric=False). group_size/symmetric that contradict how a
    checkpoint is already quantized, or that ask for nothing (no int4), are refused
    rather than ignored. kv_cache: the KV cache's dtype ("float32", "float16",
    "int8"); by default float32 for float32 weights, float16 for packed ones.
    """
    if kv_cache is not None and kv_cache not in KV_DTYPES:
        raise MinislmError(f"--kv-cache {kv_cache}: choose one of {', '.join(KV_DTYPES)}")
    model_dir = resolve_model_dir(bundled_model() if model is None else model, revision)
    config = load_config(model_dir)
    tensors = split_fused_experts(read_checkpoint(model_dir), config, model_dir)
    stored = stored_quantization(model_dir)
    check_quant_request(model_dir, stored, quant, group_size, symmetric)
    # Everything that can be wrong with the input is found before the slow part.
    tokenizer = load_tokenizer(model_dir)
    generation_config = load_generation_config(model_dir, config)
    if stored is not None:
        weights = read_packed_weights(tensors, config, stored, model_dir)
        check_small_tensors_finite(weights, config, model_dir)
        used = stored
        announce_compilation(used.format)  # the first matmul compiles
    else:
        check_tensors(tensors, config, model_dir)
        small = {name: tensors[name].float32() for name, shape in expected_shapes(config).items() if not packable(name, shape)}
        check_small_tensors_finite(small, config, model_dir)
        used = QuantConfig(quant, group_size or 32, symmetric is not False) if quant else None
        if used is None:
            # Only the tensors the forward reads (a tied checkpoint may carry a spare lm_head copy).
            weights = {name: widened(name, tensors[name]) for name in expected_shapes(config)}
        else:
            announce_compilation(used.format)  # packing compiles the quantizer
            weights = pack_weights(tensors, config, used, model_dir)
    return Model(config, weights, tokenizer=tokenizer, generation_config=generation_config, path=Path(model_dir), quant=used,
                 kv_cache=kv_cache)


def bundled_model() -> Path:
    """The 5.3M-parameter Shakespeare model installed with the package (see its README)."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise MinislmError(
            "no --model given and this install has no bundled model; pass --model with a folder or a Hugging Face repo id"
        )
    return BUNDLED_MODEL


def check_quant_request(model_dir: Path, stored, quant, group_size, symmetric) -> None:
    """--quant/--group-size/--asymmetric against what the checkpoint already is."""
    if stored is not None:
        if quant not in (None, stored.format):
            raise MinislmError(f"--quant {quant}: {model_dir} is already quantized to {stored.describe()}")
        if group_size is not None and group_size != stored.group_size:
            raise MinislmError(
                f"--group-size {group_size}: {model_dir} is already {stored.describe()}; leave --group-size out "
                "(or quantize the original checkpoint again)"
            )
        if symmetric is not None and symmetric != stored.symmetric:
            flag = "--asymmetric" if not symmetric else "symmetric=True"
            raise MinislmError(f"{flag}: {model_dir} is already {stored.describe()}")
    elif quant != "int4" and (group_size is not None or symmetric is not None):
        flag = f"--group-size {group_size}" if group_size is not None else "--asymmetric"
        raise MinislmError(f"{flag}: applies to int4 weights only; add --quant int4")


def check_small_tensors_finite(arrays: dict, config, where: Path) -> None:
    """NaN or Inf in a norm gain, a bias or PhiMoE's router: refused at load, naming the tensor.

    These stay float32 on every path (float32, bf16, int4, and the folder `quantize`
    writes) and are tiny, so the check costs microseconds; one bad value in a norm
    poisons every token. The big matrices are not scanned here (that reads gigabytes
    on the float32 path): a damaged one shows up as non-finite logits, which every
    forward checks (see minislm/finite.py). bf16 and int4 packing check them anyway.
    """
    for name, shape in expected_shapes(config).items():
        if packable(name, shape):
            continue  # a big matrix
        w = arrays[name]
        if not np.isfinite(w).all():
            bad = int(np.count_nonzero(~np.isfinite(w)))
            raise MinislmError(f"{where}: tensor '{name}' has {bad} NaN/Inf values of {w.size}; the checkpoint is damaged")


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
