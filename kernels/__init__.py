"""Fast paths for minislm (Numba), each beside a plain-NumPy reference.

    Fp32Weight(w)           fp32 (out, in): Numba GEMV, BLAS GEMM
    Bf16Weight(w)           bf16 kept as uint16 words, widened in the kernels
    Int4Weight(w, group_size=32, symmetric=True)
                            group-wise round-to-nearest int4 in 16-row tiles
    set_threads(n), threading_layer()

Every weight class has .matmul(x) -> (T, out), .rows(ids) -> (len, in),
.shape, .nbytes, .tensors(prefix) and the classmethod .from_tensors(...).
`reference.py` is the plain-NumPy specification of every kernel; the
layouts are drawn in docs/formats.md, the measurements in docs/kernels.md.
Importing compiles nothing: kernels compile on first call and are cached
on disk (numba cache=True).
"""

import numpy as np

from .threads import get_threads, set_threads, threading_layer  # noqa: F401  (sets the layer)
from .bf16 import Bf16Weight
from .fp32 import Fp32Weight
from .int4 import Int4Weight

__all__ = ["Fp32Weight", "Bf16Weight", "Int4Weight",
           "set_threads", "get_threads", "threading_layer"]

