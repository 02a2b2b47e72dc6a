"""The Conformer's strided convolutions: 3x3, stride 2, padding 1, one filter per channel.

    conv3x3_stride2(x, taps, bias, relu, out)
        out[i, j, c] = bias[c] + sum over dy, dx in 0..2 of
                       taps[3 dy + dx, c] * x[2i + dy - 1, 2j + dx - 1, c or 0]
        (x is 0 outside its edges), then max(., 0) if relu

Maps are channels-last, (rows, columns, channels): the inner loop runs over the
1024 channels of one position, contiguous in memory, so every load and
multiply-add is a full vector and the stride 2 over rows and columns is only an
index. `x` has either the channels of `out` (a depthwise convolution, each
channel filtered on its own) or a single channel that every output channel
filters with its own taps (the first convolution of the subsampling, over the
one-channel spectrogram: a "full" convolution from 1 channel is exactly that).

Why a kernel. NumPy writes a strided convolution as nine shifted views of a
zero-padded copy, or as an im2col matrix product with K = 9; for the first map
of a 10 s recording (1024 channels x 500 x 40 frames, 82 MB) each of those is
several passes through memory and a fresh 82 MB array each (padding, products,
bias, ReLU). Here each output is made once, with its bias and ReLU. The rows of
`out` are shared among the threads. The plain-NumPy twin, `reference.conv3x3_stride2`,
is the definition; tests/test_conv_kernel.py holds them equal.
"""

import numpy as np
from numba import njit, prange

from .rowwise import FASTMATH


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def conv3x3_stride2(x, taps, bias, relu, out):
    """out (Ho, Wo, C) from x (H, W, C or 1), taps (9, C) in (dy, dx) order, bias (C,):
    the module docstring's sum, Ho = ceil(H / 2), Wo = ceil(W / 2)."""
    H, W, Cin = x.shape
    Ho, Wo, C = out.shape
    if Ho != (H + 1) // 2 or Wo != (W + 1) // 2 or taps.shape != (9, C) or bias.shape[0] != C or Cin not in (1, C):
        raise ValueError("conv3x3_stride2: x (H, W, C or 1), taps (9, C), bias (C,), out (ceil(H/2), ceil(W/2), C)")
    for i in prange(Ho):
        for j in range(Wo):
            acc = out[i, j]  # (C,): a 4 KB row of sums, in L1 for all nine taps
            for c in range(C):
                acc[c] = bias[c]
            for dy in range(3):
                y = 2 * i + dy - 1
                if y < 0 or y >= H:
                    continue
                for dx in range(3):
                    col = 2 * j + dx - 1
                    if col < 0 or col >= W:
                        continue
                    tap = taps[3 * dy + dx]
                    if Cin == 1:
                        v = x[y, col, 0]
                        for c in range(C):
                            acc[c] += v * tap[c]
                    else:
                        src = x[y, col]
                        for c in range(C):
                            acc[c] += src[c] * tap[c]
            if relu:
                for c in range(C):
                    acc[c] = np.float32(0.0) if acc[c] < 0 else acc[c]  # NaN stays NaN
