"""A GGUF file's metadata and tensor table, read in seconds however large its vocabulary.

llama.cpp's own Python package (gguf-py) reads GGUF with `GGUFReader`, which builds a
NumPy view for every part of every metadata value. A GPT-2-style vocabulary holds
hundreds of thousands of strings (Phi-4-mini: 200,064 tokens and ~446,000 merges), and
that takes gguf-py over a minute per open; a user loading a Phi-4-mini GGUF would wait
for it every time. The layout itself is short:

    magic "GGUF", version (uint32, 2 or 3), tensor count, metadata count (uint64 each)
    metadata: key (string), value type (uint32), value        x metadata count
    tensor infos: name (string), n_dims (uint32), dims (uint64 x n_dims),
                  type (uint32), offset (uint64)               x tensor count
    padding to `general.alignment` (32 by default), then the tensors' bytes
    string = length (uint64) + UTF-8 bytes; array = item type (uint32), count (uint64), items

so `read_gguf` walks it with plain byte slicing and hands back what `GGUFReader` would
(`fields[key].contents()`, `tensors` with `name`, `tensor_type`, `shape`, `n_elements`,
`n_bytes` and a memory-mapped `data`), with gguf-py's own tables of value and tensor
types. tests/test_gguf_file.py checks it against `GGUFReader` on every kind of file
the suite writes. Only little-endian files (what llama.cpp writes) are read.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
SCALARS = {  # value type -> struct format
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
ARRAYS = {  # array item type -> NumPy dtype, so numeric arrays are read in one go
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
# Tensor types stored as plain numbers; every other type is blocks of bytes (read as uint8 rows).
PLAIN_TENSORS = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class Field:
    """One metadata value, as gguf-py's ReaderField hands it out: `contents()` gives a
    Python int, float, bool or str, or a list of them; `types` the GGUF value types
    (two for an array: ARRAY and its items')."""

    value: object
    types: tuple

    def contents(self):
        return self.value


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # GGUF order: the innermost dimension first
    n_elements: int
    n_bytes: int
    data: np.ndarray  # memory-mapped; quantized types as uint8 rows of blocks


@dataclass(frozen=True)
class GgufContents:
    fields: dict  # key -> Field, in file order
    tensors: list  # Tensor, in file order
    alignment: int


class Cursor:
    """Reads the file's metadata front to back. Running past the end raises ValueError."""

    def __init__(self, data: np.ndarray):
        self.data, self.offset = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > len(self.data):
            raise ValueError(f"the file ends at byte {len(self.data)}, inside a value at byte {self.offset}")
        chunk = self.data[self.offset : self.offset + n].tobytes()
        self.offset += n
        return chunk

    def scalar(self, kind) -> object:
        fmt = SCALARS[kind]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar(GGUFValueType.UINT64)).decode("utf-8")

    def value(self, kind: GGUFValueType):
        if kind == GGUFValueType.STRING:
            return self.string(), (kind,)
        if kind == GGUFValueType.ARRAY:
            item = GGUFValueType(self.scalar(GGUFValueType.UINT32))
            count = self.scalar(GGUFValueType.UINT64)
            if item in ARRAYS:
                dtype = np.dtype(ARRAYS[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist(), (kind, item)
            items = [self.value(item)[0] for _ in range(count)]  # strings (or nested arrays)
            return items, (kind, item)
        return self.scalar(kind), (kind,)


def read_gguf(path) -> GgufContents:
    """Metadata and tensor table of a GGUF file, its tensors memory-mapped, nothing copied.
    A file that is not a well-formed GGUF raises ValueError (or KeyError for an unknown
    type number), which the caller turns into one line naming the file."""
    data = np.memmap(Path(path), mode="r")
    cursor = Cursor(data)
    if cursor.take(4) != b"GGUF":
        raise ValueError("GGUF magic invalid")
    version = cursor.scalar(GGUFValueType.UINT32)
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} (a big-endian file, or one this reader cannot handle)")
    tensor_count = cursor.scalar(GGUFValueType.UINT64)
    field_count = cursor.scalar(GGUFValueType.UINT64)
    fields = {}
    for _ in range(field_count):
        key = cursor.string()
        value, types = cursor.value(GGUFValueType(cursor.scalar(GGUFValueType.UINT32)))
        fields[key] = Field(value, types)
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.scalar(GGUFValueType.UINT32)
        dims = np.frombuffer(cursor.take(8 * n_dims), "<u8")
        kind = GGMLQuantizationType(cursor.scalar(GGUFValueType.UINT32))
        infos.append((name, dims, kind, cursor.scalar(GGUFValueType.UINT64)))
    alignment = fields["general.alignment"].value if "general.alignment" in fields else DEFAULT_ALIGNMENT
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"invalid alignment {alignment!r}: must be a power of two")
    start = -(-cursor.offset // alignment) * alignment
    names = [name for name, *_ in infos]
    if len(set(names)) != len(names):
        raise ValueError("the file names a tensor twice")
    return GgufContents(fields, [tensor(data, start, *info) for info in infos], alignment)


def tensor(data: np.ndarray, start: int, name: str, dims: np.ndarray, kind, offset: int) -> Tensor:
    """One tensor's bytes as gguf-py shapes them: plain types as numbers in NumPy order
    (outermost first), block types as uint8 rows of `dims[0] / block * bytes` each."""
    n_elements = int(np.prod(dims, dtype=np.int64))
    block, type_size = GGML_QUANT_SIZES[kind]
    n_bytes = n_elements * type_size // block
    shape = tuple(int(d) for d in reversed(dims.tolist()))
    begin = start + offset
    if begin + n_bytes > len(data):
        raise ValueError(f"tensor '{name}' runs past the end of the file")
    if kind in PLAIN_TENSORS:
        array = data[begin : begin + n_bytes].view(PLAIN_TENSORS[kind]).reshape(shape)
    else:
        array = data[begin : begin + n_bytes].reshape(*shape[:-1], shape[-1] // block * type_size)
    return Tensor(name, kind, dims.copy(), n_elements, n_bytes, array)
