"""Read safetensors checkpoints: memory-mapped, checked, never unpickled.

A safetensors file is 8 bytes of little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}}`), then the raw tensor
bytes. We read that header ourselves and memory-map the data with NumPy instead
of going through the `safetensors` package's loader, for two reasons a learner
should know about:

* NumPy has no bfloat16, and safetensors' NumPy backend refuses BF16 tensors. We
  keep them as raw uint16 words, which is exactly what bf16 is: the top half of a
  float32 (`bf16_to_float32`). No torch needed.
* Every way a file can be broken (too short, a header longer than the file, a
  tensor past the end) becomes a one-line error naming the file.

Pickle checkpoints (`*.bin`, `*.pt`) can run arbitrary code when loaded; we refuse
them and never open them.
"""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, read_json
from .errors import MinislmError
from .multimodal.config import phi4mm_shapes
from .uncached import UncachedFile
# bfloat16 is defined once, beside the kernels that widen it (kernels/reference.py):
# widening is a 16-bit shift (exact), rounding is to nearest, ties to even.
from .kernels.reference import bf16_to_f32 as bf16_to_float32
from .kernels.reference import f32_to_bf16 as float32_to_bf16  # noqa: F401  (the writers import it from here)
from .vision.config import vision_shapes

# safetensors dtype tag -> how we hold it in NumPy. BF16 stays as raw 16-bit words.
NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "BOOL": np.bool_,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
# Larger than any tensor dimension a file could hold (NumPy's own limit is 2**63).
MAX_DIMENSION = 2**48
# Buffers some exporters write next to the weights; they hold nothing we need.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as it lies in the file: its safetensors dtype tag and a memory-mapped array."""

    dtype: str
    array: np.ndarray

    def float32(self) -> np.ndarray:
        """The values as float32. F32 stays memory-mapped (no copy); F16/BF16 widen exactly."""
        if self.dtype == "F32":
            return self.array
        if self.dtype == "BF16":
            return bf16_to_float32(self.array)
        if self.dtype in ("F16", "F64"):
            return self.array.astype(np.float32)
        raise MinislmError(f"tensor of dtype {self.dtype} is not a floating-point weight")


def read_safetensors(path: Path) -> dict[str, StoredTensor]:
    """Parse one .safetensors file and memory-map its tensors (nothing is read yet)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MinislmError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise MinislmError(
                    f"{path}: safetensors header length {header_len} is larger than the file ({size} bytes)"
                )
            header_bytes = f.read(header_len)
    except OSError as e:
        raise MinislmError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MinislmError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MinislmError(f"{path}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    data_size = size - data_start
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) if data_size else None
    except OSError as e:
        raise MinislmError(f"{path}: cannot read ({e.strerror})") from None
    tensors, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name], span = view_tensor(path, name, info, data, data_size)
        spans.append((span, name))
    check_byte_ranges(path, spans, data_size)
    return tensors


def check_byte_ranges(path: Path, spans: list[tuple[tuple[int, int], str]], data_size: int) -> None:
    """Each tensor owns its own bytes, and together they cover the data exactly, as the
    safetensors format requires (and its own reader enforces).

    Two names over the same bytes would be two views of one buffer: writing one (an
    in-place edit, a fine-tune) would silently change the other. Bytes that belong to
    no tensor are how one file poses as two formats at once (a polyglot).
    """
    previous_end, previous = 0, None
    for (begin, end), name in sorted(spans):
        if begin == end:
            continue  # an empty tensor owns no bytes
        if begin < previous_end:
            raise MinislmError(
                f"{path}: tensors '{previous}' and '{name}' overlap (bytes {begin}..{min(end, previous_end)} of the "
                "data are in both); a safetensors file gives each tensor its own bytes"
            )
        if begin > previous_end:
            raise MinislmError(f"{path}: bytes {previous_end}..{begin} of the data belong to no tensor (a hole)")
        previous_end, previous = end, name
    if previous_end != data_size:
        raise MinislmError(f"{path}: {data_size - previous_end} bytes after the last tensor belong to no tensor")


def is_count(value) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as 3.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def view_tensor(path: Path, name: str, info, data, data_size: int) -> tuple[StoredTensor, tuple[int, int]]:
    """Check one header entry against the file; a zero-copy view of its bytes, and the
    (begin, end) byte span it occupies in the data."""
    entry_ok = (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(is_count(d) for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(is_count(o) for o in info["data_offsets"])
    )
    if not entry_ok:
        raise MinislmError(f"{path}: corrupt safetensors header entry for '{name}' (needs dtype, a shape of "
                           "integers >= 0 and two data_offsets)")
    dtype_tag, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if any(d > MAX_DIMENSION for d in shape):
        raise MinislmError(f"{path}: tensor '{name}' has shape {list(shape)}, beyond any real tensor")
    if dtype_tag not in NUMPY_DTYPES:
        raise MinislmError(f"{path}: tensor '{name}' has unsupported dtype {dtype_tag!r:.40}")
    dtype = np.dtype(NUMPY_DTYPES[dtype_tag])
    # Python integers: a shape like [2**32, 2**32] must not wrap around in int64.
    expected_bytes = math.prod(shape) * dtype.itemsize
    if end > data_size:
        raise MinislmError(
            f"{path}: truncated: tensor '{name}' ends at byte {end} of the data but the file holds {data_size}"
        )
    if end - begin != expected_bytes:
        raise MinislmError(f"{path}: tensor '{name}' has {end - begin} bytes, its shape {list(shape)} needs {expected_bytes}")
    if expected_bytes == 0:
        return StoredTensor(dtype_tag, np.zeros(shape, dtype=dtype)), (begin, end)
    return StoredTensor(dtype_tag, data[begin:end].view(dtype).reshape(shape)), (begin, end)


SAFETENSORS_TAGS = {np.dtype(v): k for k, v in NUMPY_DTYPES.items() if k != "BF16"}


def write_safetensors(path: Path, entries: dict, arrays, metadata: dict | None = None) -> None:
    """Stream tensors into a .safetensors file, so no more than one is in memory at once.

    `entries` maps each name to (dtype tag, shape), in file order; `arrays` yields
    the arrays in that same order (BF16 as raw uint16 words). The file is written
    under a temporary name and renamed when complete: a reader never sees half of it.
    """
    path = Path(path)
    header, offset = {}, 0
    for name, (tag, shape) in entries.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY_DTYPES[tag]).itemsize
        header[name] = {"dtype": tag, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep tensor data 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with UncachedFile(partial) as f:  # the page cache is full of the checkpoint just read (minislm/uncached.py)
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for (name, (tag, shape)), array in zip(entries.items(), arrays, strict=True):
            array = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[tag])
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: array of shape {array.shape}, header says {tuple(shape)}")
            f.write(memoryview(array.reshape(-1)).cast("B"))
    partial.rename(path)


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write in-memory arrays (float32, uint8, uint16 ... never bf16: use write_safetensors)."""
    entries = {name: (SAFETENSORS_TAGS[a.dtype], a.shape) for name, a in tensors.items()}
    write_safetensors(path, entries, tensors.values(), metadata)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder: one file, or the shards an index names."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MinislmError(f"{index_path}: no 'weight_map' in the index")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            shard_path = model_dir / shard_name(index_path, shard)
            if not shard_path.is_file():
                raise MinislmError(f"{index_path}: names shard {shard}, which is not in {model_dir}")
            files.append(shard_path)
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise MinislmError(
            f"{model_dir}: only pickle checkpoints ({', '.join(pickles)}); minislm never loads pickle files, "
            "which can run code. Use a safetensors checkpoint"
        )
    raise MinislmError(f"{model_dir}: no model.safetensors (or shards with {INDEX_FILE}) in this folder")


def shard_name(index_path: Path, shard) -> str:
    """A shard file named by the index: a plain relative path inside the model folder.

    An absolute path, or one with "..", would make a downloaded index read any file
    on the machine as weights. (Checked on the name, not the resolved path: the
    Hugging Face cache links each file to a blob outside the snapshot folder.)
    """
    if not isinstance(shard, str) or not shard:
        raise MinislmError(f"{index_path}: weight_map values must be file names, got {shard!r:.80}")
    parts = shard.replace("\\", "/").split("/")
    if shard.startswith(("/", "\\")) or Path(shard).is_absolute() or ":" in parts[0] or ".." in parts:
        raise MinislmError(f"{index_path}: shard {shard!r:.120} is outside the model folder; shards must be "
                           "file names relative to it")
    return shard


def read_checkpoint(model_dir: Path) -> dict[str, StoredTensor]:
    """All tensors of a model folder, memory-mapped, keyed by their hub names."""
    tensors = {}
    for path in checkpoint_files(model_dir):
        for name, tensor in read_safetensors(path).items():
            if name in tensors:
                raise MinislmError(f"{path}: tensor '{name}' appears in more than one shard")
            tensors[name] = tensor
    return tensors


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold, with its shape (hub names, (out, in) layout)."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    q_size, kv_size = config.q_size, config.kv_size
    if config.model_type == "phi3small":
        return phi3small_shapes(config)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        if config.model_type == "phimoe":
            shapes.update(phimoe_layer_shapes(config, layer))
            continue
        shapes[layer + "input_layernorm.weight"] = (D,)
        shapes[layer + "self_attn.qkv_proj.weight"] = (q_size + 2 * kv_size, D)
        shapes[layer + "self_attn.o_proj.weight"] = (D, q_size)
        shapes[layer + "post_attention_layernorm.weight"] = (D,)
        shapes[layer + "mlp.gate_up_proj.weight"] = (2 * F, D)
        shapes[layer + "mlp.down_proj.weight"] = (D, F)
    if config.model_type == "phimoe":
        shapes["model.norm.bias"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    if config.lm_head_bias:
        shapes["lm_head.bias"] = (V,)
    if config.vision is not None:  # phi3_v: the CLIP tower, separators and projector
        shapes.update(vision_shapes(config.vision, D))
    if config.phi4mm is not None:  # Phi-4-multimodal: SigLIP, Conformer, separators, projectors
        shapes.update(phi4mm_shapes(config.phi4mm, D))
    return shapes


def phi3small_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Phi-3-small (the hub's remote code): LayerNorms with biases, a biased fused
    `query_key_value` whose rows are grouped per kv head ([q x G | k | v] for each of the
    KV groups, not [all q | all k | all v]), a biased `dense` output projection, a
    biased `up_proj` of 2F rows (GEGELU's two halves, interleaved), `final_layernorm`,
    and no lm_head: the output layer is the embedding (tied)."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv_rows = config.q_size + 2 * config.kv_size
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        for name, shape in (
            ("input_layernorm", (D,)), ("post_attention_layernorm", (D,)),
            ("self_attn.query_key_value", (qkv_rows, D)), ("self_attn.dense", (D, config.q_size)),
            ("mlp.up_proj", (2 * F, D)), ("mlp.down_proj", (D, F)),
        ):
            shapes[layer + name + ".weight"] = shape
            shapes[layer + name + ".bias"] = shape[:1]
    shapes["model.final_layernorm.weight"] = (D,)
    shapes["model.final_layernorm.bias"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def phimoe_layer_shapes(config: ModelConfig, layer: str) -> dict[str, tuple[int, ...]]:
    """One PhiMoE layer: LayerNorms with biases, separate q/k/v/o (biased when
    attention_bias), the router `gate` (E, D) and E experts of three matrices each."""
    D, F, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    q_size, kv_size = config.q_size, config.kv_size
    shapes = {}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        shapes[f"{layer}{norm}.weight"] = (D,)
        shapes[f"{layer}{norm}.bias"] = (D,)
    for name, out_size, in_size in (("q", q_size, D), ("k", kv_size, D), ("v", kv_size, D), ("o", D, q_size)):
        shapes[f"{layer}self_attn.{name}_proj.weight"] = (out_size, in_size)
        if config.attention_bias:
            shapes[f"{layer}self_attn.{name}_proj.bias"] = (out_size,)
    shapes[f"{layer}block_sparse_moe.gate.weight"] = (E, D)
    for e in range(E):
        expert = f"{layer}block_sparse_moe.experts.{e}."
        shapes[expert + "w1.weight"] = (F, D)  # gate
        shapes[expert + "w3.weight"] = (F, D)  # up
        shapes[expert + "w2.weight"] = (D, F)  # down
    return shapes


def split_fused_experts(tensors: dict[str, StoredTensor], config: ModelConfig, where: Path) -> dict[str, StoredTensor]:
    """Give a PhiMoE checkpoint in transformers 5's own layout the hub's names.

    transformers 5 holds each layer's experts as two 3-D tensors, and writes them that way
    with `save_pretrained(save_original_format=False)` (by default it writes the hub
    layout back). Per layer:

        mlp.router.weight          (E, D)       -> block_sparse_moe.gate.weight
        mlp.experts.gate_up_proj   (E, 2F, D)   rows [w1 | w3] -> experts.{e}.w1 / w3.weight
        mlp.experts.down_proj      (E, D, F)    -> experts.{e}.w2.weight

    The per-expert tensors are views into the 3-D ones, not copies. Any other checkpoint
    is returned unchanged.
    """
    if config.model_type != "phimoe":
        return tensors
    D, F, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    tensors = dict(tensors)
    for i in range(config.num_hidden_layers):
        fused, hub = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        if fused + "router.weight" in tensors:
            tensors[hub + "gate.weight"] = tensors.pop(fused + "router.weight")
        if fused + "experts.gate_up_proj" not in tensors and fused + "experts.down_proj" not in tensors:
            continue
        gate_up = fused_tensor(tensors, fused + "experts.gate_up_proj", (E, 2 * F, D), "experts, 2 x ffn, hidden", where)
        down = fused_tensor(tensors, fused + "experts.down_proj", (E, D, F), "experts, hidden, ffn", where)
        for e in range(E):
            expert = f"{hub}experts.{e}."
            tensors[expert + "w1.weight"] = StoredTensor(gate_up.dtype, gate_up.array[e, :F])
            tensors[expert + "w3.weight"] = StoredTensor(gate_up.dtype, gate_up.array[e, F:])
            tensors[expert + "w2.weight"] = StoredTensor(down.dtype, down.array[e])
    return tensors


def fused_tensor(tensors: dict[str, StoredTensor], name: str, shape: tuple[int, ...], axes: str, where: Path) -> StoredTensor:
    """Remove a fused expert tensor from `tensors` and return it, checked against the config."""
    if name not in tensors:
        raise MinislmError(f"{where}: missing tensor '{name}'")
    tensor = tensors.pop(name)
    if tensor.array.shape != shape:
        raise MinislmError(
            f"{where}: tensor '{name}' has shape {list(tensor.array.shape)}, config.json implies {list(shape)} ({axes})"
        )
    return tensor


def check_tensors(tensors: dict[str, StoredTensor], config: ModelConfig, where: Path) -> None:
    """Every expected tensor present with its shape; nothing unknown."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise MinislmError(f"{where}: missing tensor '{name}'")
        if tensors[name].array.shape != shape:
            hint = " (num_local_experts, hidden_size)" if name.endswith("block_sparse_moe.gate.weight") else ""
            raise MinislmError(
                f"{where}: tensor '{name}' has shape {list(tensors[name].array.shape)}, config.json implies {list(shape)}{hint}"
            )
    for name in tensors:
        # A tied checkpoint may still carry lm_head.weight; transformers ignores it, so do we.
        tied_copy = name == "lm_head.weight" and config.tie_word_embeddings
        if name not in expected and not tied_copy and not name.endswith(IGNORED_SUFFIXES):
            hint = f"; config.json has num_local_experts = {config.num_local_experts}" if ".experts." in name else ""
            raise MinislmError(f"{where}: unknown tensor '{name}' (not part of a {config.model_type} model{hint})")
