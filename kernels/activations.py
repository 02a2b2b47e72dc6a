"""int8 activations for the packed kernels: quantized once per call, per group.

`reference.quantize_activations` is the definition: per group of 32 inputs
(or of the weight group when 32 does not divide it) x_scale = max|x| / 127,
xq = round(x / x_scale) in [-127, 127], x_sum = x_scale * sum(xq). The
kernels of `packed.py` (VNNI, portable) and `amx.py` share these functions, so
every path multiplies the same integers.
"""

import numpy as np
from numba import njit

from . import reference as ref
from .scalars import bits_to_f32, f32_to_bits

@njit(cache=True)
def act_group_size(group_size):
    return ref.ACT_GROUP if group_size % ref.ACT_GROUP == 0 else group_size


@njit(cache=True)
def quantize_activations(x, act_group, xq, x_scale, x_sum):
    """x (in_p,) float32 -> int8 xq, per-group x_scale and x_sum; the same
    arithmetic as `reference.quantize_activations`.

    Written so that LLVM vectorises both loops: max|x| is the largest of the
    bit patterns with the sign cleared (an integer max; NaN and inf are larger
    than every finite number, which is how they are found), and the rounding
    loop has no branch."""
    levels = np.float32(ref.ACT_LEVELS)
    half = np.float32(0.5)
    for a in range(x_scale.size):
        top = np.uint32(0)
        for k in range(a * act_group, (a + 1) * act_group):
            top = max(top, f32_to_bits(x[k]) & np.uint32(0x7FFFFFFF))
        if top >= np.uint32(0x7F800000) or top == 0:   # NaN/inf, or all zero
            for k in range(a * act_group, (a + 1) * act_group):
                xq[k] = 0
            x_scale[a] = np.float32(np.nan) if top >= np.uint32(0x7F800000) else np.float32(0.0)
            x_sum[a] = x_scale[a] * np.float32(0.0)
            continue
        scale = bits_to_f32(top) / levels
        total = 0
        for k in range(a * act_group, (a + 1) * act_group):
            q = np.int32(min(max(np.floor(x[k] / scale + half), -levels), levels))
            xq[k] = q
            total += q
        x_scale[a] = scale
        x_sum[a] = scale * np.float32(total)


@njit(cache=True)
def prepare_token(x, n_groups, xq, x_scale, x_gsum):
    """Quantize one token and sum x_hat per weight group (`reference.group_sums`)."""
    act_group = act_group_size(x.size // n_groups)
    acts_per_group = x_scale.size // n_groups
    x_sum = np.empty(x_scale.size, np.float32)
    quantize_activations(x, act_group, xq, x_scale, x_sum)
    for g in range(n_groups):
        total = x_sum[g * acts_per_group]
        for i in range(1, acts_per_group):
            total += x_sum[g * acts_per_group + i]
        x_gsum[g] = total


@njit(cache=True)
def activation_buffers(n_tok, n_in, n_groups):
    act_group = act_group_size(n_in // n_groups)
    xq = np.empty((n_tok, n_in), np.int8)
    x_scale = np.empty((n_tok, n_in // act_group), np.float32)
    x_gsum = np.empty((n_tok, n_groups), np.float32)
    return xq, x_scale, x_gsum


@njit(cache=True)
def check_shapes(codes, scales, x, out, inputs_per_tile):
    """The IR does no bounds checks: refuse arrays that do not fit."""
    n_blocks, n_tiles, _ = codes.shape
    n_in = inputs_per_tile * n_tiles
    if (x.ndim != 2 or x.shape[1] != n_in or out.shape[0] != x.shape[0]
            or out.shape[1] != 16 * n_blocks or scales.shape[0] != n_blocks
            or scales.shape[1] == 0 or n_in % scales.shape[1]
            or (n_in // scales.shape[1]) % inputs_per_tile):
        raise ValueError("packed kernel: x must be (T, in_p), out (T, out_p), scales (blocks, groups, 16)")
