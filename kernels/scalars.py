"""One number at a time: the bit-level conversions every kernel shares.

Numba has no float16 or bfloat16 type and no scalar bit-cast, so these few
intrinsics (a handful of LLVM instructions each) are written here once and
inlined into the loops that call them, which LLVM then vectorises:

    bf16_to_f32(u16)       a bf16 word -> float32: `bits << 16`, exact
    round_to_bf16(f32)     float32 -> the nearest bf16 word, ties to even
    half_to_f32(u16)       IEEE half bits -> float32, exact (`vcvtph2ps` with F16C)
    f32_to_half_bits(f32)  float32 -> the nearest IEEE half, as its bits
    f32_to_bits(f32), bits_to_f32(u32)   bit-casts, not conversions

and two `widen`s, each typed per stored dtype, for loops written once over
several storage formats. A uint16 array means IEEE halves everywhere in the
kernels (the KV cache, packed scales) except in bf16 weights, hence two names:

    widen(x)          float32 / int8 as they are, uint16 as an IEEE half
    widen_weight(x)   float32 as it is, uint16 as a bf16 word

Their plain-NumPy twins are `reference.bf16_to_f32`, `reference.f32_to_bf16` and
`reference.widen_f16`.

Numba inlines these into the kernels of `fp32.py`, `bf16.py`, `packed.py`,
`activations.py`, `amx.py`, `convert.py` and `attention.py`, and keys its
on-disk cache on the content of *those* files: after editing this one, delete
the cache (`find kernels -name '*.nb[ic]' -delete`) or the old code keeps running.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

I16, I32, F32, F64 = ir.IntType(16), ir.IntType(32), ir.FloatType(), ir.DoubleType()


@intrinsic
def bf16_to_f32(typingctx, bits):
    """float32 whose top 16 bits are `bits` (uint16) and low 16 bits are zero."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], I32), ir.Constant(I32, 16))
        return builder.bitcast(wide, F32)

    return sig, codegen


@intrinsic
def f32_to_bits(typingctx, value):
    """The uint32 bit pattern of a float32 (a bit-cast, not a conversion)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], I32)

    return sig, codegen


@intrinsic
def bits_to_f32(typingctx, bits):
    """The float32 whose bit pattern is `bits` (uint32; a wider integer is truncated
    to its low 32 bits): the inverse of `f32_to_bits`."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], F32)

    return sig, codegen


@intrinsic
def bits_to_f64(typingctx, bits):
    """The float64 whose bit pattern is `bits` (int64), e.g. a power of two built from
    its exponent field, `(e + 1023) << 52`, where `math.ldexp` would call libm."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], F64)

    return sig, codegen


@intrinsic
def half_to_f32(typingctx, bits):
    """float32 value of an IEEE half given as its uint16 bits (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), F32)

    return sig, codegen


@intrinsic
def f32_to_half_bits(typingctx, x):
    """uint16 bits of the IEEE half nearest to float32 `x` (ties to even, as NumPy)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), I16)

    return sig, codegen


@njit(inline="always")
def round_to_bf16(x):
    """The bf16 word nearest to float32 `x`, ties to even, as a uint32 below 2**16:
    add 0x7FFF plus the lowest kept bit, then drop the low 16 bits
    (`reference.f32_to_bf16`, one number). Finite `x` only, as there."""
    bits = f32_to_bits(x)
    return (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


def widen(x):
    """A stored value as float32: float32 and int8 as they are, uint16 as the bits of
    an IEEE half (typed per dtype by the overload below)."""


@overload(widen, inline="always")
def _widen(x):
    if x == types.uint16:  # float16 bits
        return lambda x: half_to_f32(x)
    if x == types.int8 or x == types.float32:
        return lambda x: np.float32(x)
    return None


def widen_weight(x):
    """A stored weight as float32: float32 as it is, uint16 as a bf16 word (typed per
    dtype by the overload below)."""


@overload(widen_weight, inline="always")
def _widen_weight(x):
    if x == types.uint16:  # bf16 bits
        return lambda x: bf16_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None
