"""Looking up the parts of a packed matrix in a safetensors checkpoint, with clear errors."""

from ..errors import MinislmError
from ..weights import StoredTensor


def need_part(tensors: dict[str, StoredTensor], prefix: str, part: str, shape: tuple, where) -> StoredTensor:
    """`{prefix}.{part}`, checked to exist and to have `shape`."""
    name = f"{prefix}.{part}"
    if name not in tensors:
        raise MinislmError(f"{where}: missing tensor '{name}'")
    if tuple(tensors[name].array.shape) != tuple(shape):
        raise MinislmError(f"{where}: tensor '{name}' has shape {list(tensors[name].array.shape)}, expected {list(shape)}")
    return tensors[name]
