"""bf16 weights kept as raw 16-bit words and widened inside the kernels.

Layout: the hub layout, w (out, in) row-major, each element the uint16 bits
of a bfloat16 (sign, 8 exponent bits, 7 mantissa bits: the top half of an
fp32). A bf16 checkpoint maps straight into this array, at half the memory
of fp32 and half the bytes read per token.

Widening is `bits << 16` reinterpreted as fp32 (`scalars.bf16_to_f32`), so the
GEMV loop (`fp32.gemv`, the float32 loop with each weight widened) is: load
16-bit words, zero-extend, shift, multiply-add. LLVM vectorises it (vpmovzxwd,
vpslld, vfmadd), a few instructions per 8 weights.
Where the CPU has AVX-512, decode and prefill widen the words in registers,
32 at a time, and multiply with float32 FMAs in one order for any number of
tokens (`bf16dot.py`); prefill of 16 tokens or more runs on AMX-BF16 tiles
where the CPU has them (`amx.py`: the activations split into two bf16 numbers,
hi and lo, so they keep 16 significant bits). Elsewhere the GEMV below widens
each weight and prefill widens a tile of rows into an fp32 buffer and lets
BLAS multiply.

`Bf16Weight(w, activations="bf16")` (or `w.with_activations("bf16")`, the
same words) multiplies activations rounded to bf16 instead, as transformers
does in bf16: `vdpbf16ps` where the CPU has AVX512-BF16 (`bf16pairs.py`, 32
products per instruction, about twice the FMAs' rate), the AMX tiles from 16
tokens where it has AMX, and elsewhere the paths above on the rounded
activations (exact products of the same bf16 numbers, float32 sums in their
own order). The image and speech encoders use it when asked
(`minislm.load(..., encoder_activations="bf16")`).
"""

import copy

import numpy as np
from numba import njit, prange

from . import amx, bf16dot, bf16pairs, cpu
from .checks import as_activations, as_row_ids, check_finite
from .convert import count_nonfinite_bf16
from .fp32 import OneArrayWeight, gemv, matmul_by_tiles
from . import reference as ref
from .reference import f32_to_bf16  # NumPy is fast enough for a once-per-load conversion
from .scalars import bf16_to_f32


# From this many tokens on, prefill goes to AMX where the CPU has it (fewer
# would be padded to 32 and waste the tiles).
AMX_MIN_TOKENS = 16


@njit(parallel=True, cache=True)
def widen_bf16_rows(w, ids, out):
    """out (len(ids), in) float32 = rows `ids` of w (out, in) uint16."""
    for r in prange(ids.size):
        row = ids[r]
        for k in range(w.shape[1]):
            out[r, k] = bf16_to_f32(w[row, k])


@njit(cache=True)
def widen_bf16_block(w, start, out):
    """out (n, in) float32 = rows start..start+n of w (out, in) uint16, on one thread.

    Serial on purpose: it feeds `matmul_by_tiles`, where BLAS multiplies each
    tile on every core. A parallel widen would hand the cores back and forth
    between Numba's OpenMP threads and OpenBLAS's after every tile, and each
    pool's threads spin-wait a while after their work: on 2 cores that made the
    bf16 prefill 2.8x slower than widening on the calling thread while BLAS's
    own threads finish."""
    for r in range(out.shape[0]):
        for k in range(w.shape[1]):
            out[r, k] = bf16_to_f32(w[start + r, k])


ACTIVATIONS = ("float32", "bf16")


class Bf16Weight(OneArrayWeight):
    """A bf16 (out, in) weight held as uint16 words.

    `Bf16Weight(w)`: uint16 `w` is taken as bf16 bits without a copy (a
    memory-mapped checkpoint stays mapped); float32/float16 `w` is rounded
    to nearest-even bf16. NaN, inf and values beyond bf16's range are
    rejected. `activations`: "float32" multiplies the activations as they are
    (exact products); "bf16" rounds them to bf16 first (nearest-even, as torch
    does), the arithmetic of transformers in bf16 and twice the products per
    instruction (`matmul_rounded`)."""

    def __init__(self, w, name="weight", activations="float32"):
        if activations not in ACTIVATIONS:
            raise ValueError(f"{name}: activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        self.activations = activations
        w = np.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D (out, in) array, got shape {w.shape}")
        if w.dtype == np.uint16:
            bad = count_nonfinite_bf16(np.ascontiguousarray(w))  # one parallel pass, no temporaries
            if bad:
                raise ValueError(f"{name}: {bad} of {w.size} bf16 values are NaN or inf; "
                                 f"the checkpoint is damaged")
            self.bits = np.ascontiguousarray(w)
        elif w.dtype in (np.float32, np.float16):
            check_finite(w, name)
            bits = f32_to_bf16(w)
            bad = int(np.count_nonzero((bits & 0x7F80) == 0x7F80))
            if bad:
                raise ValueError(f"{name}: {bad} values exceed bfloat16's range (3.39e38)")
            self.bits = bits
        else:
            raise ValueError(f"{name}: cannot make bf16 weights from dtype {w.dtype}; "
                             f"pass float32/float16 values or uint16 bf16 bits")

    @property
    def data(self):
        return self.bits

    def with_activations(self, activations):
        """The same words (not copied, not checked again), multiplied with
        `activations` "float32" or "bf16"."""
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
        other = copy.copy(self)
        other.activations = activations
        return other

    def __repr__(self):
        rounded = ", bf16 activations" if self.activations == "bf16" else ""
        return f"Bf16Weight(shape={self.shape}, {self.nbytes / 1e6:.1f} MB{rounded})"

    def matmul(self, x, path=None):
        """x (T, in) -> (T, out). `path` overrides the CPU's choice (`cpu.py`), for
        tests and measurements: 'avx512' (`bf16dot.py`, any T: the same bits for
        a token alone or among many), 'amx' (T >= 16) or 'portable' (float32 GEMV
        for one token, rows widened into tiles that BLAS multiplies for more);
        with bf16 activations also 'avx512bf16' (`matmul_rounded`)."""
        x = as_activations(x, self.shape[1])  # (T, in)
        if self.activations == "bf16":
            return self.matmul_rounded(x, path)
        return self.matmul_exact(x, path)

    def matmul_rounded(self, x, path=None):
        """bf16(x) (T, in) -> (T, out) float32: the activations rounded to bf16
        (`reference.bf16_activations`), then bf16 x bf16 products summed in float32.
        'avx512bf16' (`bf16pairs.py`, where the CPU has AVX512-BF16) computes
        `reference.matmul_bf16_pairs` bit for bit; every other path multiplies
        the rounded activations as float32 numbers: the same exact products,
        float32 sums in its own order, no flushing of numbers below 2**-126."""
        x = as_activations(x, self.shape[1])  # (T, in)
        if path is None:
            amx_here = x.shape[0] >= AMX_MIN_TOKENS and cpu.bf16_gemm_path() == "amx"
            path = "amx" if amx_here else cpu.bf16_rounded_path()
        if path == "avx512bf16":
            if not cpu.has_avx512_bf16():
                raise ValueError("path='avx512bf16': this CPU has no AVX512-BF16")
            return bf16pairs.matmul(self.bits, x)
        words = np.empty(x.shape, np.uint16)
        bf16pairs.bf16_activations(x, words)
        return self.matmul_exact(ref.bf16_to_f32(words), path)

    def matmul_exact(self, x, path=None):
        """x (T, in) float32, C-contiguous -> (T, out): exact products, float32 sums."""
        if path == "avx512bf16":
            raise ValueError("path='avx512bf16' multiplies bf16 activations: use matmul_rounded")
        if path is None:
            path = cpu.bf16_gemm_path() if x.shape[0] >= AMX_MIN_TOKENS else cpu.bf16_dot_path()
        if path == "avx512":
            if not cpu.has_avx512():
                raise ValueError("path='avx512': this CPU has no AVX-512")
            return bf16dot.matmul(self.bits, x)
        if x.shape[0] == 1:
            out = np.empty((1, self.shape[0]), np.float32)
            gemv(self.bits, x, out)
            return out
        return self.gemm(x, path)

    def gemm(self, x, path):
        """Prefill on path 'amx' (AMX-BF16 tiles, `amx.py`) or 'portable' (rows
        widened to float32 in tiles that BLAS multiplies)."""
        n, k = self.shape
        if path == "amx" and not cpu.has_amx_bf16():   # also asks Linux for the tile state
            raise ValueError("path='amx': this CPU or operating system offers no AMX-BF16")
        rows = n // 32 * 32
        if path != "amx" or k % 32 or rows == 0 or x.shape[0] < AMX_MIN_TOKENS:
            return matmul_by_tiles(x, n, self.widen_rows)
        n_tok = x.shape[0]
        xp = np.pad(x, ((0, -n_tok % 32), (0, 0))) if n_tok % 32 else x
        out = np.empty((xp.shape[0], n), np.float32)
        amx.gemm_bf16_amx(amx.bf16_config(), self.bits, xp, rows, out)
        if rows < n:   # the last n % 32 rows, with the same split activations
            hi, lo = ref.split_bf16(xp)
            split = ref.bf16_to_f32(hi) + ref.bf16_to_f32(lo)   # exact in float32
            out[:, rows:] = matmul_by_tiles(split, n - rows, lambda s, e, buf: self.widen_rows(rows + s, rows + e, buf))
        return out[:n_tok] if n_tok % 32 else out

    def widen_rows(self, start, stop, buf):
        widen_bf16_block(self.bits, start, buf)

    def rows(self, ids):
        ids = as_row_ids(ids, self.shape[0])
        out = np.empty((ids.size, self.shape[1]), np.float32)
        widen_bf16_rows(self.bits, ids, out)
        return out
