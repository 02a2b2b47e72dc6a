"""Packed weights: bf16 and int4, made at load time or saved as a checkpoint.

Decoding reads every weight once per token, so bytes per weight set the speed:
fp32 4, bf16 2, int4 with a float16 scale per 32 weights 0.5625. Which matrices
are packed: every 2-D weight the model multiplies by (projections, experts, the
embedding and the lm_head). Norm gains, biases and PhiMoE's router stay float32:
they are tiny, and the router's choice is a step function that small errors can
flip. The output layer (lm_head, or the embedding when the model ties them) is
kept at 8 bits by default: it alone decides every logit, and at 4 bits it
moved the shipped model's predictions three times as much as all other
matrices together (docs/kernels.md); on Phi-3-mini it costs 2.3 % more bytes.

`python -m minislm quantize` saves int4 arrays with their layout recorded in
config.json (`quantization_config`), so a later `load` memory-maps them and
starts at once, bit for bit the weights an in-memory quantization would make.
(bf16 needs no such file: a bf16 hub checkpoint already is one, and
`load(..., quant="bf16")` maps its words as they are.)
The layouts themselves are drawn in docs/formats.md.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import read_json
from .errors import MinislmError
from .streaming import Scratch, release, to_bf16_bits, widen
from .multimodal.config import EXTEND, encoder_matrix, pointwise_kernel
from .vision.config import IMAGE_EMBED
from .weights import SAFETENSORS_TAGS, StoredTensor, expected_shapes, write_safetensors

# The image encoder's matrices (Phi-3-vision): CLIP's projections and MLP, the projector.
IMAGE_MATRICES = ("_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "img_projection.0.weight", "img_projection.2.weight")

FORMATS = ("bf16", "int4")
GROUP_SIZES = (32, 64, 128)
OUTPUT_BITS = (4, 8)
METHOD = "minislm"
LAYOUT = "tiles-16x8"          # version 2: int8-activation tiles, float16 scales (docs/formats.md)
OLD_LAYOUT = "tiles-16x4"      # version 1 (minislm before 2026-12): read and converted at load
# Files copied next to a quantized checkpoint, so it is a complete model folder.
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "preprocessor_config.json",  # images (num_crops, dynamic_hd)
)


@dataclass(frozen=True)
class QuantConfig:
    format: str  # "bf16" or "int4"
    group_size: int = 32  # int4: weights per scale, along the input dimension
    symmetric: bool = True  # int4: scale only (c - 8), or scale and zero point
    output_bits: int = 8  # int4: the output layer (lm_head or tied embedding) at 8 or 4 bits
    layout: str = LAYOUT  # int4: OLD_LAYOUT only when reading a version-1 folder

    def __post_init__(self):
        if self.format not in FORMATS:
            raise MinislmError(f"--quant {self.format}: choose one of {', '.join(FORMATS)}")
        if self.format == "int4" and self.group_size not in GROUP_SIZES:
            raise MinislmError(f"--group-size {self.group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
        if self.format == "int4" and self.output_bits not in OUTPUT_BITS:
            raise MinislmError(f"output_bits={self.output_bits}: choose 8 or 4")

    def describe(self) -> str:
        if self.format == "bf16":
            return "bf16"
        return (f"int4 ({'symmetric' if self.symmetric else 'asymmetric'}, group {self.group_size}, "
                f"output layer {self.output_bits}-bit)")

    def to_json(self) -> dict:
        """What config.json records about a saved (int4) checkpoint."""
        return {
            "quant_method": METHOD,
            "format": self.format,
            "bits": 4,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "output_bits": self.output_bits,
            "layout": self.layout,  # docs/formats.md
            "version": 2,
        }

    @classmethod
    def from_json(cls, raw, source: str) -> "QuantConfig":
        if not isinstance(raw, dict) or raw.get("quant_method") != METHOD or raw.get("format") != "int4":
            raise MinislmError(f"{source}: this quantization_config is not supported (only minislm's own int4): {raw!r:.120}")
        layout = raw.get("layout", OLD_LAYOUT)
        if layout not in (LAYOUT, OLD_LAYOUT):
            raise MinislmError(f"{source}: int4 layout {layout!r} is unknown to this minislm "
                               f"(it reads {LAYOUT} and {OLD_LAYOUT}); upgrade minislm or re-run `minislm quantize`")
        # version-1 folders kept every matrix at 4 bits
        output_bits = int(raw.get("output_bits", 8 if layout == LAYOUT else 4))
        return cls("int4", int(raw.get("group_size", 32)), bool(raw.get("symmetric", True)), output_bits, layout)


def output_layer(config) -> str:
    """The matrix that makes the logits: lm_head, or the embedding when tied."""
    return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def packable(name: str, shape: tuple) -> bool:
    """2-D weights are packed; the PhiMoE router stays exact (see the module docstring).
    Phi-3-vision's image encoder: its linear layers only (position embeddings add);
    Phi-4-multimodal's encoders: their linear layers only (tables are looked up)."""
    if name.startswith(IMAGE_EMBED):
        return name.endswith(IMAGE_MATRICES)
    if name.startswith(EXTEND):
        return encoder_matrix(name, shape)
    return len(shape) == 2 and not name.endswith("block_sparse_moe.gate.weight")


def module_name(name: str) -> str:
    """`model.layers.0.mlp.down_proj.weight` -> `model.layers.0.mlp.down_proj`: the prefix
    int4 weights put before `.qweight`, `.scales` and `.zeros`."""
    return name.removesuffix(".weight")


def stays_bf16(name: str, quant: QuantConfig) -> bool:
    """bf16 weights, and the encoders' matrices (pictures, sound) under every format."""
    return quant.format == "bf16" or name.startswith((IMAGE_EMBED, EXTEND))


ENCODER_ACTIVATIONS = ("float32", "bf16")


def check_encoder_activations(activations: str | None, config, packing, where) -> None:
    """Refuse --encoder-activations bf16, before the weights load, where it would change
    nothing: a model without encoders (`config` None: a GGUF file), or encoders kept in
    float32 (`packing` None: no --quant and not a quantized folder)."""
    if activations not in (None, *ENCODER_ACTIVATIONS):
        raise MinislmError(f"--encoder-activations {activations}: choose one of {', '.join(ENCODER_ACTIVATIONS)}")
    if activations != "bf16":
        return
    if config is None or (config.vision is None and config.phi4mm is None):
        raise MinislmError(f"--encoder-activations bf16: {where} has no image or speech encoder")
    if packing is None:
        raise MinislmError(f"--encoder-activations bf16: the encoders of {where} load as float32; "
                           "add --quant bf16 or --quant int4 (both keep the encoders in bf16)")


def check_decoder_activations(activations: str | None, quant: str | None) -> None:
    """Refuse --decoder-activations bf16, before the weights load, unless the decoder's
    matrices will be bf16 (--quant bf16): int4 kernels round activations to int8 their
    own way, and float32 matrices have no bf16 products to make."""
    if activations not in (None, *ENCODER_ACTIVATIONS):
        raise MinislmError(f"--decoder-activations {activations}: choose one of {', '.join(ENCODER_ACTIVATIONS)}")
    if activations == "bf16" and quant != "bf16":
        raise MinislmError("--decoder-activations bf16: the decoder's matrices must be bf16; add --quant bf16")


def with_decoder_activations(weights: dict, activations: str) -> dict:
    """`weights` with every bf16 matrix of the decoder (attention, MLP, experts, the
    output layer) multiplying `activations`: "bf16" rounds each product's input to bf16,
    as transformers computes the whole model in bf16 (`Bf16Weight.matmul_rounded`:
    `vdpbf16ps` where the CPU has AVX512-BF16, one product per pair of inputs where the
    default splits each activation into two bf16 numbers and makes two); "float32" (the
    default) keeps the activations' precision, the path the fixtures verify to 1e-4.
    The encoders keep theirs (`with_encoder_activations`). The words are shared."""
    from .kernels import Bf16Weight

    def rounded(name, w):
        if name.startswith((IMAGE_EMBED, EXTEND)) or not isinstance(w, Bf16Weight):
            return w
        return w.with_activations(activations)

    return {name: rounded(name, w) for name, w in weights.items()}


def with_encoder_activations(weights: dict, activations: str) -> dict:
    """`weights` with every bf16 matrix of the image and speech encoders and their
    projectors multiplying `activations`: "bf16" rounds them to bf16 before each
    product, as transformers computes these encoders in bf16 (`Bf16Weight.matmul_rounded`:
    `vdpbf16ps` where the CPU has it, about twice the products per second); "float32"
    (the default) multiplies them as they are, the path the fixtures verify. The
    words are shared, not copied.

    With "bf16" the Conformer's 1x1 convolutions, matrix products over the channels
    whose kernels (out, in, 1[, 1]) stay float32 arrays when the encoders are packed,
    become bf16 (out, in) matrices too, as transformers multiplies them in bf16: their
    values are a bf16 checkpoint's, so the rounding is exact there."""
    from .kernels import Bf16Weight

    def rounded(name, w):
        if not name.startswith((IMAGE_EMBED, EXTEND)):
            return w
        if isinstance(w, Bf16Weight):
            return w.with_activations(activations)
        if activations == "bf16" and pointwise_kernel(name, np.shape(w)):
            return Bf16Weight(np.asarray(w, np.float32).reshape(len(w), -1), name=name, activations=activations)
        return w

    return {name: rounded(name, w) for name, w in weights.items()}


def pack(name: str, tensor: StoredTensor, quant: QuantConfig, scratch: Scratch, is_output: bool = False):
    """One packed weight from a stored tensor. bf16 words are used as they are (still
    mapped); f16 is rounded to bf16 in one pass; the default int4 (symmetric) reads
    the stored words as they are; int8 and asymmetric int4 quantize float32 values
    widened into the reusable `scratch` buffer. The image encoder stays bf16 under
    int4: CLIP's features feed every image token; the output layer is int8 unless
    `quant.output_bits` is 4."""
    from .kernels import Bf16Weight, Int4Weight, Int8Weight

    try:
        if stays_bf16(name, quant):
            if tensor.dtype == "BF16":
                return Bf16Weight(tensor.array, name=name)
            if tensor.dtype == "F16":
                return Bf16Weight(to_bf16_bits(name, tensor), name=name)
            return Bf16Weight(tensor.float32(), name=name)
        if quant.symmetric and not (is_output and quant.output_bits == 8) and tensor.dtype in ("F32", "F16", "BF16"):
            # the default int4 reads the checkpoint's words as they are (kernels/quantizer.py)
            return Int4Weight(tensor.array, group_size=quant.group_size, name=name)
        values = widen(name, tensor, scratch.take(tensor.array.shape))
        if is_output and quant.output_bits == 8:
            return Int8Weight(values, group_size=quant.group_size, name=name)
        return Int4Weight(values, group_size=quant.group_size, symmetric=quant.symmetric, name=name)
    except ValueError as e:  # NaN/inf in the checkpoint
        raise MinislmError(str(e)) from None


def pack_weights(tensors: dict[str, StoredTensor], config, quant: QuantConfig, where: Path) -> dict:
    """The forward's weight dict with packed matrices, made now, tensor by tensor (with a
    progress bar). A converted tensor's file pages are released as soon as it is done,
    so the peak RSS is the result plus one tensor, not the whole checkpoint."""
    from tqdm import tqdm

    shapes = expected_shapes(config)
    scratch = Scratch()
    weights = {}
    for name in tqdm(shapes, desc=f"quantizing to {quant.describe()}", unit="tensor", disable=None, leave=False):
        tensor = tensors[name]
        if packable(name, shapes[name]):
            weights[name] = pack(name, tensor, quant, scratch, is_output=name == output_layer(config))
            keeps_mapping = stays_bf16(name, quant) and tensor.dtype == "BF16"
        else:
            weights[name] = np.ascontiguousarray(tensor.float32())
            keeps_mapping = tensor.dtype == "F32"
        if not keeps_mapping:
            release(tensor.array)
    return weights


def read_packed_weights(tensors: dict[str, StoredTensor], config, quant: QuantConfig, where: Path) -> dict:
    """The forward's weight dict from an int4 checkpoint: memory-mapped, not re-quantized
    (a version-1 folder's tiles are converted, exactly, into today's layout). The
    encoders' matrices are bf16 there, as `save_quantized` wrote them."""
    from .kernels import Bf16Weight, Int4Weight, Int8Weight
    from .kernels.packed import from_old_int4_tensors

    arrays = {name: t.array for name, t in tensors.items()}
    weights, used = {}, set()
    for name, shape in expected_shapes(config).items():
        if not packable(name, shape):
            if name not in tensors:
                raise MinislmError(f"{where}: missing tensor '{name}'")
            weights[name] = np.ascontiguousarray(tensors[name].float32())
            used.add(name)
            continue
        if stays_bf16(name, quant):
            if name not in tensors or tensors[name].dtype != "BF16":
                raise MinislmError(f"{where}: missing bf16 tensor '{name}' (encoders stay bf16 in an int4 folder)")
            weights[name] = Bf16Weight(tensors[name].array, name=name)
            used.add(name)
            continue
        prefix = module_name(name)
        parts = {k: v for k, v in arrays.items() if k.startswith(prefix + ".") and k.count(".") == prefix.count(".") + 1}
        if not parts:
            raise MinislmError(f"{where}: missing tensor '{name}' (packed as {prefix}.*)")
        eight_bit = name == output_layer(config) and quant.output_bits == 8
        try:
            if quant.layout == OLD_LAYOUT:
                weights[name] = from_old_int4_tensors(parts, prefix, shape)
            else:
                weights[name] = (Int8Weight if eight_bit else Int4Weight).from_tensors(parts, prefix, shape)
        except (KeyError, ValueError) as e:
            raise MinislmError(f"{where}: {str(e).strip(chr(39))}") from None
        if weights[name].shape != shape:
            raise MinislmError(f"{where}: tensor '{name}' has shape {list(weights[name].shape)}, config.json implies {list(shape)}")
        used.update(parts)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise MinislmError(f"{where}: unknown tensor '{unknown[0]}' in a {quant.describe()} checkpoint")
    return weights


def stored_arrays(weights: dict) -> dict[str, np.ndarray]:
    """What goes into the file: each packed weight's own arrays, float32 for the rest."""
    out = {}
    for name, w in weights.items():
        if isinstance(w, np.ndarray):
            out[name] = w
        else:
            out.update(w.tensors(module_name(name)))
    return out


def save_quantized(source_dir: Path, out_dir: Path, weights: dict, quant: QuantConfig, adapters: dict | None = None) -> None:
    """Write a complete int4 model folder, or nothing: everything goes to a hidden
    staging folder first, which becomes `out_dir` by one rename at the end.

    Phi-4-multimodal: the encoders' matrices are written as bf16; its `adapters` go
    where the source layout keeps them (the hub's: inside model.safetensors as
    `...lora_A.vision.weight`, bf16; transformers': the vision-lora/ and speech-lora/
    folders, copied)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MinislmError(f"--out {out_dir}: already exists; choose a new folder")
    if not out_dir.parent.is_dir():
        raise MinislmError(f"--out {out_dir}: the folder {out_dir.parent} does not exist")
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
    except OSError as e:
        raise MinislmError(f"--out {out_dir}: cannot write in {out_dir.parent} ({e.strerror})") from None
    try:
        arrays = stored_arrays(weights)
        bf16 = {module_name(n) + ".weight" for n, w in weights.items() if type(w).__name__ == "Bf16Weight"}
        if adapters and not (Path(source_dir) / "vision-lora").is_dir():
            lora = hub_adapter_arrays(adapters)
            arrays.update(lora)
            bf16.update(lora)
        entries = {name: ("BF16" if name in bf16 else SAFETENSORS_TAGS[a.dtype], a.shape) for name, a in arrays.items()}
        write_safetensors(staging / "model.safetensors", entries, arrays.values(), {"format": "pt", "quantized_by": METHOD})
        raw = read_json(Path(source_dir) / "config.json")
        raw["quantization_config"] = quant.to_json()
        (staging / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        for name in COMPANION_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, staging / name)
        for folder in ("vision-lora", "speech-lora"):  # a converted Phi-4-multimodal's adapters
            if adapters and (Path(source_dir) / folder).is_dir():
                shutil.copytree(Path(source_dir) / folder, staging / folder)
        staging.rename(out_dir)
    except OSError as e:  # disk full, a folder made read-only meanwhile ...
        shutil.rmtree(staging, ignore_errors=True)
        raise MinislmError(f"--out {out_dir}: cannot write ({e.strerror}); nothing was written") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def hub_adapter_arrays(adapters: dict) -> dict[str, np.ndarray]:
    """The adapters under the hub's names, `<module>.lora_A.<adapter>.weight`, as bf16 bits
    (the hub's own precision for them; a packed model holds them in bf16)."""
    from .lora import as_float32
    from .weights import float32_to_bf16

    out = {}
    for adapter in adapters.values():
        for name, pair in adapter.pairs.items():
            module = module_name(name)
            out[f"{module}.lora_A.{adapter.name}.weight"] = float32_to_bf16(as_float32(pair.A))
            out[f"{module}.lora_B.{adapter.name}.weight"] = float32_to_bf16(as_float32(pair.B))
    return out
