"""Loading-time conversions of 16-bit checkpoints, parallel and in one pass.

A Phi-3-mini f16 checkpoint holds 3.8 G weights. NumPy widens them to float32
at ~1.5 ns a value on one core (`astype`), into freshly allocated arrays whose
pages the OS must first zero, and rounding to bf16 takes it four more passes:
tens of seconds before the first token. These kernels do each conversion in
one parallel pass into a buffer the caller provides (and may reuse):

    widen_f16(bits, out)     IEEE half bits -> float32, exact
    widen_bf16(bits, out)    bf16 bits -> float32, exact (a shift)
    f16_to_bf16(bits, out)   IEEE half bits -> bf16 bits, round to nearest even
    count_nonfinite_bf16(bits)   the check every bf16 weight gets at load

They take and give flat arrays (reshape views in and out) and count the
values that are NaN or inf, which no conversion should carry into a model.
Numba takes no float16 arrays: halves travel as their uint16 bit patterns and
`scalars.half_to_f32` widens them (one `vcvtph2ps` per vector on x86 with F16C).
The plain-NumPy twins are `reference.widen_f16`, `reference.bf16_to_f32` and
`reference.f16_to_bf16`.
"""

import numpy as np
from numba import njit, prange

from .scalars import bf16_to_f32, half_to_f32, round_to_bf16


@njit(parallel=True, cache=True)
def widen_f16(bits, out):
    """out[i] = the half bits[i] as float32; returns how many are NaN or inf."""
    bad = 0
    for i in prange(bits.size):
        out[i] = half_to_f32(bits[i])
        bad += (bits[i] & 0x7C00) == 0x7C00
    return bad


@njit(parallel=True, cache=True)
def widen_bf16(bits, out):
    """out[i] = the bf16 bits[i] as float32; returns how many are NaN or inf."""
    bad = 0
    for i in prange(bits.size):
        out[i] = bf16_to_f32(bits[i])
        bad += (bits[i] & 0x7F80) == 0x7F80
    return bad


@njit(parallel=True, cache=True)
def f16_to_bf16(bits, out):
    """out[i] = bf16 bits of the half bits[i], rounded to nearest even like
    `reference.f32_to_bf16`; returns how many are NaN or inf."""
    bad = 0
    for i in prange(bits.size):
        out[i] = np.uint16(round_to_bf16(half_to_f32(bits[i])))
        bad += (bits[i] & 0x7C00) == 0x7C00
    return bad


@njit(parallel=True, cache=True)
def count_nonfinite_bf16(bits):
    """How many of the bf16 words `bits` (any shape) are NaN or inf (exponent all ones)."""
    flat = bits.reshape(-1)
    bad = 0
    for i in prange(flat.size):
        bad += (flat[i] & 0x7F80) == 0x7F80
    return bad
