"""`minislm.load`: from a folder, a repo id or a GGUF file to a ready `Model`.

The order is the order of trust: find the folder, read config.json, open and check
every tensor against the shapes the config implies, and only then convert or pack
weights. A bad checkpoint fails before any large allocation.

What `--model` can name:
    a folder with config.json and safetensors   hub float (fp32/bf16/fp16) checkpoints,
                                                minislm's own int4 folders, and the hub's
                                                4-bit AWQ, GPTQ and MLX folders
    a .gguf file                                llama.cpp's format (minislm/formats/gguf.py)
    a Hugging Face repo id                      downloaded, then as a folder
"""

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .cache import DTYPES as KV_DTYPES
from .compile_notice import announce_compilation
from .config import GenerationConfig, load_config, load_generation_config, read_json
from .errors import MinislmError
from .formats import kernel_weights
from .formats.grouped import GroupedCodes, RowStack, SuperBlockCodes, to_float32
from .formats.hub_quantized import hub_quantization
from .hub import resolve_model_dir
from .lora import packed_adapter
from .multimodal.checkpoint import load_adapters, split_checkpoint
from .quantize import (QuantConfig, check_decoder_activations, check_encoder_activations, pack_weights, packable,
                       read_packed_weights, with_decoder_activations, with_encoder_activations)
from .runtime import Model
from .streaming import release, widen
from .tokenizer import load_tokenizer
from .weights import StoredTensor, check_tensors, expected_shapes, read_checkpoint, split_fused_experts

# The small model shipped inside the package: what `load()` and the CLI use by default.
BUNDLED_MODEL = Path(__file__).parent / "assets" / "shakespeare"


def load(
    model: str | os.PathLike | None = None,
    revision: str | None = None,
    quant: str | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    output_bits: int | None = None,
    kv_cache: str | None = None,
    encoder_activations: str | None = None,
    decoder_activations: str | None = None,
) -> Model:
    """Load a Phi-3 or PhiMoE checkpoint (local folder, Hugging Face repo id or GGUF
    file; by default the small Shakespeare model shipped inside the package).

    quant=None: float32 weights, the reference path (an int4 checkpoint made by
    `minislm quantize` stays int4). quant="bf16": matrices kept as bf16 words,
    memory-mapped as they are when the checkpoint is bf16. quant="int4": matrices
    quantized now, group-wise along the inputs (`group_size` 32/64/128, default 32;
    symmetric unless symmetric=False; the output layer at `output_bits` 8, the
    default, or 4). group_size/symmetric that contradict how a
    checkpoint is already quantized, or that ask for nothing (no int4), are refused
    rather than ignored. kv_cache: the KV cache's dtype ("float32", "float16",
    "int8"); by default float32 for float32 weights, float16 for packed ones.
    encoder_activations: "bf16" rounds the activations of Phi-3-vision's and
    Phi-4-multimodal's encoders to bf16 before each matrix product, as transformers
    does in bf16 (their matrices must be bf16: quant="bf16" or "int4"); by default
    "float32", the activations as they are. decoder_activations: the same for the
    decoder's matrices (quant="bf16" only): "bf16" computes every product as
    transformers does in bf16, about twice as fast as the default's exact products.

    A GGUF file, or an AWQ/GPTQ/MLX folder, keeps its own codes and scales: each
    matrix becomes a packed weight holding exactly the format's weights, multiplied
    by minislm's group-wise kernels (float32 where this install has no such kernels;
    see formats/kernel_weights.py). quant="float32" unpacks them to float32 instead,
    the exact path the tests use; "bf16"/"int4" re-quantize the unpacked weights
    (no longer the file's exact weights).
    """
    if kv_cache is not None and kv_cache not in KV_DTYPES:
        raise MinislmError(f"--kv-cache {kv_cache}: choose one of {', '.join(KV_DTYPES)}")
    announce_compilation()  # says so, once per process, if a kernel really compiles
    check_decoder_activations(decoder_activations, quant)
    exact = quant == "float32"
    quant = None if exact else quant
    if model is not None and Path(model).expanduser().is_file():
        check_quant_request(Path(model), None, quant, group_size, symmetric, output_bits)
        check_encoder_activations(encoder_activations, None, quant, Path(model))  # a GGUF file: no encoders
        return load_gguf(Path(model).expanduser(), quant, group_size, symmetric, exact, output_bits, kv_cache,
                         decoder_activations)
    model_dir = resolve_model_dir(bundled_model() if model is None else model, revision)
    config = load_config(model_dir)
    tensors = split_fused_experts(read_checkpoint(model_dir), config, model_dir)
    lora_tensors = {}
    if config.phi4mm is not None:  # Phi-4-multimodal: the adapters apart, the hub's names
        tensors, lora_tensors = split_checkpoint(tensors, config.phi4mm, model_dir)
    foreign = hub_quantization(read_json(Path(model_dir) / "config.json"), str(Path(model_dir) / "config.json"))
    stored = stored_quantization(model_dir) if foreign is None else None
    check_quant_request(model_dir, stored, quant, group_size, symmetric, output_bits)
    check_encoder_activations(encoder_activations, config, stored or quant, model_dir)
    # Everything that can be wrong with the input is found before the slow part.
    tokenizer = load_tokenizer(model_dir)
    generation_config = load_generation_config(model_dir, config)
    if foreign is not None:
        from .formats.hub_quantized import weight_plan

        plan = weight_plan(tensors, config, foreign, model_dir)
        used = quant_config(quant, group_size, symmetric, output_bits)
        weights = unpack_weights(plan, config, used, exact, model_dir)
        check_small_tensors_finite(weights, config, model_dir)
    elif stored is not None:
        weights = read_packed_weights(tensors, config, stored, model_dir)
        check_small_tensors_finite(weights, config, model_dir)
        used = stored
    else:
        check_tensors(tensors, config, model_dir)
        small = {name: tensors[name].float32() for name, shape in expected_shapes(config).items() if not packable(name, shape)}
        check_small_tensors_finite(small, config, model_dir)
        used = quant_config(quant, group_size, symmetric, output_bits)
        if used is None:
            # Only the tensors the forward reads (a tied checkpoint may carry a spare lm_head copy).
            weights = {name: widened(name, tensors[name]) for name in expected_shapes(config)}
        else:
            weights = pack_weights(tensors, config, used, model_dir)
    if encoder_activations is not None:
        weights = with_encoder_activations(weights, encoder_activations)
    if decoder_activations is not None:
        weights = with_decoder_activations(weights, decoder_activations)
    adapters = load_adapters(model_dir, config, lora_tensors, weights) if config.phi4mm is not None else None
    if adapters and used is not None:  # packed weights: the adapters in bf16 too
        adapters = {name: packed_adapter(adapter) for name, adapter in adapters.items()}
    return Model(config, weights, tokenizer=tokenizer, generation_config=generation_config, path=Path(model_dir),
                 kv_cache=kv_cache or default_kv_cache(weights), packing=used, adapters=adapters)


def default_kv_cache(weights: dict) -> str:
    """float32 when every weight is a float32 array (the path verified against
    transformers); float16 when any is packed: ours, or a GGUF/AWQ/GPTQ/MLX file's
    codes multiplied as they are, which already trade exactness for bytes."""
    return "float32" if all(kernel_weights.is_float32(w) for w in weights.values()) else "float16"


def bundled_model() -> Path:
    """The 5.3M-parameter Shakespeare model installed with the package (see its README)."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise MinislmError(
            "no --model given and this install has no bundled model; pass --model with a folder or a Hugging Face repo id"
        )
    return BUNDLED_MODEL


def check_quant_request(model_dir: Path, stored, quant, group_size, symmetric, output_bits=None) -> None:
    """--quant/--group-size/--asymmetric (and output_bits) against what the checkpoint already is."""
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
        if output_bits is not None and output_bits != stored.output_bits:
            raise MinislmError(f"output_bits={output_bits}: {model_dir} is already {stored.describe()}")
    elif quant != "int4" and output_bits is not None:
        raise MinislmError(f"output_bits={output_bits}: applies to int4 weights only; add quant='int4'")
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


def quant_config(quant: str | None, group_size: int | None, symmetric: bool | None,
                 output_bits: int | None = None) -> QuantConfig | None:
    return QuantConfig(quant, group_size or 32, symmetric is not False, output_bits or 8) if quant else None


def unpack_weights(plan: dict, config, quant: QuantConfig | None, exact: bool, where) -> dict:
    """The weights of a GGUF or AWQ/GPTQ/MLX file, one tensor at a time: each matrix's
    codes in a packed kernel weight (the default, where the group-wise kernels exist),
    or unpacked to float32 (`exact`, or no such kernels), or unpacked and re-packed by
    `pack_weights` when `quant` asks for bf16/int4. PhiMoE's router stays float32."""
    if quant is not None:
        return pack_weights(UnpackedTensors(plan), config, quant, where)
    native = not exact and kernel_weights.available()
    weights = {}
    for name, make in plan.items():
        stored = make()
        if native and isinstance(stored, (GroupedCodes, SuperBlockCodes, RowStack)) and not name.endswith("block_sparse_moe.gate.weight"):
            weights[name] = kernel_weights.to_kernel_weight(stored, name)
        else:
            weights[name] = to_float32(stored)
    return weights


class UnpackedTensors(Mapping):
    """A plan seen as the {name: StoredTensor} that `pack_weights` reads: each tensor is
    unpacked to float32 when it is looked up, so at most one is in memory at a time."""

    def __init__(self, plan: dict):
        self.plan = plan

    def __getitem__(self, name: str) -> StoredTensor:
        return StoredTensor("F32", to_float32(self.plan[name]()))

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def load_gguf(path: Path, quant: str | None, group_size: int | None, symmetric: bool | None, exact: bool,
              output_bits: int | None = None, kv_cache: str | None = None, decoder_activations: str | None = None) -> Model:
    """A GGUF file: config from its metadata, weights unpacked under the hub's names."""
    from .formats.gguf import generation_stop_ids, load_gguf_tokenizer, open_gguf, weight_plan

    gg = open_gguf(path)
    tokenizer = load_gguf_tokenizer(gg)
    used = quant_config(quant, group_size, symmetric, output_bits)
    plan = {name: planned.make for name, planned in weight_plan(gg).items()}
    weights = unpack_weights(plan, gg.config, used, exact, path)
    check_small_tensors_finite(weights, gg.config, path)
    if decoder_activations is not None:
        weights = with_decoder_activations(weights, decoder_activations)
    return Model(
        gg.config,
        weights,
        tokenizer=tokenizer,
        generation_config=GenerationConfig(eos_token_ids=generation_stop_ids(gg)),
        path=path,
        kv_cache=kv_cache or default_kv_cache(weights),
        packing=used,
    )
