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
bias, ReLU). Here each output is made once, with its bias and ReLU, and
`conv_relu_then_depthwise` runs the first two convolutions without writing the
first map at all. Each call makes the rows [lo, hi) of `out`, with the GIL
released, so the caller can share the rows among Python threads
(`threads.on_python_threads`, not Numba's spinning OpenMP threads: a BLAS product
follows). The plain-NumPy twin, `reference.conv3x3_stride2`,
is the definition; tests/test_conv_kernel.py holds them equal.
"""

import numpy as np
from numba import njit

from .rowwise import FASTMATH


@njit(inline="always")
def conv_row(top, middle, bottom, taps, bias, relu, out_row):
    """One output row, out_row (Wo, C), from the three input rows (W, C or 1) its
    windows read (a row of zeros where the window reaches past the top or bottom).

    Outputs whose window lies inside the row sum their nine taps in registers, one
    vector of channels at a time, in (dy, dx) order after the bias; the first and
    last output skip the taps that fall past the row's ends."""
    W, Cin = middle.shape
    Wo, C = out_row.shape
    t0, t1, t2, t3, t4, t5, t6, t7, t8 = taps[0], taps[1], taps[2], taps[3], taps[4], taps[5], taps[6], taps[7], taps[8]
    for j in range(Wo):
        acc = out_row[j]
        if j >= 1 and 2 * j + 1 < W:
            a, b, c = top[2 * j - 1 : 2 * j + 2], middle[2 * j - 1 : 2 * j + 2], bottom[2 * j - 1 : 2 * j + 2]
            if Cin == 1:  # nine numbers, each scaling one tap's row of channels
                v0, v1, v2, v3, v4, v5, v6, v7, v8 = a[0, 0], a[1, 0], a[2, 0], b[0, 0], b[1, 0], b[2, 0], c[0, 0], c[1, 0], c[2, 0]
                for k in range(C):
                    acc[k] = (bias[k] + v0 * t0[k] + v1 * t1[k] + v2 * t2[k] + v3 * t3[k] + v4 * t4[k]
                              + v5 * t5[k] + v6 * t6[k] + v7 * t7[k] + v8 * t8[k])
            else:
                for k in range(C):
                    acc[k] = (bias[k] + a[0, k] * t0[k] + a[1, k] * t1[k] + a[2, k] * t2[k] + b[0, k] * t3[k]
                              + b[1, k] * t4[k] + b[2, k] * t5[k] + c[0, k] * t6[k] + c[1, k] * t7[k] + c[2, k] * t8[k])
        else:
            for k in range(C):
                acc[k] = bias[k]
            for dy in range(3):
                src = top if dy == 0 else (middle if dy == 1 else bottom)
                for dx in range(3):
                    col = 2 * j + dx - 1
                    if 0 <= col < W:
                        tap = taps[3 * dy + dx]
                        for k in range(C):
                            acc[k] += src[col, 0 if Cin == 1 else k] * tap[k]
        if relu:
            for k in range(C):
                acc[k] = np.float32(0.0) if acc[k] < 0 else acc[k]  # NaN stays NaN


@njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def conv3x3_stride2(x, taps, bias, relu, out, lo, hi):
    """Rows [lo, hi) of out (Ho, Wo, C) from x (H, W, C or 1), taps (9, C) in (dy, dx)
    order, bias (C,): the module docstring's sum, Ho = ceil(H / 2), Wo = ceil(W / 2)."""
    H, W, Cin = x.shape
    Ho, Wo, C = out.shape
    if (Ho != (H + 1) // 2 or Wo != (W + 1) // 2 or taps.shape != (9, C) or bias.shape[0] != C or Cin not in (1, C)
            or not 0 <= lo <= hi <= Ho):
        raise ValueError("conv3x3_stride2: x (H, W, C or 1), taps (9, C), bias (C,), out (ceil(H/2), ceil(W/2), C)")
    zeros = np.zeros((W, Cin), np.float32)  # the padding above the first row and below the last
    for i in range(lo, hi):
        top = x[2 * i - 1] if i >= 1 else zeros
        bottom = x[2 * i + 1] if 2 * i + 1 < H else zeros
        conv_row(top, x[2 * i], bottom, taps, bias, relu, out[i])


@njit(nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def conv_relu_then_depthwise(x, taps0, bias0, taps1, bias1, out, lo, hi):
    """Rows [lo, hi) of out = conv3x3_stride2(relu(conv3x3_stride2(x, taps0, bias0)),
    taps1, bias1) for a one-channel x (H, W, 1): the subsampling's first two
    convolutions without their (H/2, W/2, C) map in memory (82 MB for 10 s of speech).

    The three rows of the first map that an output row reads are kept in a ring;
    consecutive output rows share one of them, so each is made once (once more where
    another call's rows begin)."""
    H, W, _ = x.shape
    H1, W1 = (H + 1) // 2, (W + 1) // 2  # the first map
    Ho, Wo, C = out.shape
    if (Ho != (H1 + 1) // 2 or Wo != (W1 + 1) // 2 or taps0.shape != (9, C) or taps1.shape != (9, C)
            or not 0 <= lo <= hi <= Ho):
        raise ValueError("conv_relu_then_depthwise: x (H, W, 1), taps (9, C), out (ceil(H/4), ceil(W/4), C)")
    zeros_in, zeros_map = np.zeros((W, 1), np.float32), np.zeros((W1, C), np.float32)
    ring = np.empty((3, W1, C), np.float32)  # first-map row y lives in ring[y % 3]
    made = -1  # the highest first-map row made so far
    for i in range(lo, hi):
        for y in range(max(2 * i - 1, made + 1), min(2 * i + 2, H1)):
            conv_row(x[2 * y - 1] if y >= 1 else zeros_in, x[2 * y], x[2 * y + 1] if 2 * y + 1 < H else zeros_in,
                     taps0, bias0, True, ring[y % 3])
            made = y
        top = ring[(2 * i - 1) % 3] if i >= 1 else zeros_map
        bottom = ring[(2 * i + 1) % 3] if 2 * i + 1 < H1 else zeros_map
        conv_row(top, ring[(2 * i) % 3], bottom, taps1, bias1, False, out[i])
