"""Converting a memory-mapped checkpoint one tensor at a time, without holding it.

`read_checkpoint` maps the safetensors files; nothing is read until a tensor is
used. Converting (widening f16/bf16 to float32, rounding to bf16, quantizing to
int4) then reads each tensor once, and two costs used to hide there:

* every mapped page read stays in the process's resident set (RSS) until the
  mapping goes away. Quantizing Phi-3-mini read all 7.6 GB of its f16 file and
  kept it resident next to the 2 GB result: a 9.9 GB peak. `release` tells the
  OS we are done with a tensor's pages (madvise MADV_DONTNEED): they leave our
  RSS but stay in the page cache, so nothing is read from disk twice.
* widening with NumPy allocates a new float32 array per tensor, whose pages the
  OS must fault in and zero, on one core. `Scratch` is one float32 buffer,
  grown to the largest matrix and reused; minislm.kernels.convert fills it in
  one parallel pass.
"""

import ctypes
import mmap

import numpy as np

from .errors import MinislmError
from .weights import StoredTensor

_LIBC = None


class Scratch:
    """A reusable float32 buffer: `scratch.take(shape)` is a view of its start."""

    def __init__(self):
        self.buffer = np.empty(0, np.float32)

    def take(self, shape) -> np.ndarray:
        n = int(np.prod(shape))
        if n > self.buffer.size:
            self.buffer = np.empty(n, np.float32)
        return self.buffer[:n].reshape(shape)


def widen(name: str, tensor: StoredTensor, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor as float32, written into `out` (a new array if None). F32 tensors are
    returned as they are (mapped, no copy) when no `out` is given."""
    from .kernels.convert import widen_bf16, widen_f16

    kernels = {"F16": widen_f16, "BF16": widen_bf16}
    if tensor.dtype not in kernels:
        values = tensor.float32()
        if out is None:
            return values
        out[...] = values
        return out
    out = np.empty(tensor.array.shape, np.float32) if out is None else out
    bad = kernels[tensor.dtype](np.ascontiguousarray(tensor.array).view(np.uint16).reshape(-1), out.reshape(-1))
    if bad:
        raise MinislmError(f"{name}: {bad} of {out.size} values are NaN or inf; the checkpoint is damaged "
                           "or was saved after a diverged step")
    return out


def to_bf16_bits(name: str, tensor: StoredTensor) -> np.ndarray:
    """bf16 bits of an F16 tensor (rounded to nearest even), in one parallel pass."""
    from .kernels.convert import f16_to_bf16

    out = np.empty(tensor.array.shape, np.uint16)
    bad = f16_to_bf16(np.ascontiguousarray(tensor.array).view(np.uint16).reshape(-1), out.reshape(-1))
    if bad:
        raise MinislmError(f"{name}: {bad} of {out.size} values are NaN or inf; the checkpoint is damaged")
    return out


def release(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set.

    MADV_DONTNEED on a read-only file mapping discards our page-table entries
    only: the file's pages stay in the page cache, and touching the array again
    maps them back. Does nothing for ordinary arrays or where madvise is missing.
    """
    global _LIBC
    if not hasattr(mmap, "MADV_DONTNEED") or array.nbytes == 0 or not _is_mapped(array):
        return
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = array.__array_interface__["data"][0]
    first = -(-start // page) * page  # whole pages inside the array only
    last = (start + array.nbytes) // page * page
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _is_mapped(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            return True
        base = base.base
    return isinstance(base, mmap.mmap)
