"""Step two for a quantized file: GroupedCodes -> a packed weight the kernels multiply.

minislm.kernels' group-wise weights take integer codes as they are
(`Int4Weight.from_codes` for codes below 16, `Int8Weight.from_codes` for 5-, 6- and
8-bit codes), with a scale per group and either an integer zero code or a float
offset per group, and compute element [r, k] as

    scales[r, g] * (codes[r, k] - zero[r, g]) + offsets[r, g]        (g = k // G)

which is exactly GroupedCodes' `scales * codes + offsets` (grouped.py): with
zero = 0 and our offsets it is the same float32 expression, and with an integer
zero point z (where offsets = -scales * z) every product is exact either way. So
the packed weight holds the file's weights bit for bit (tests compare their
`dequantize()` with ours); what the kernels round is the activations (to int8 per
group), which is why the packed path is compared with the float path under the
kernels' own tolerance, not bit for bit.

K-quants arrive as SuperBlockCodes and become `KQuantWeight`s (kernels/kquant.py),
which keep the file's two levels of scales and its code widths: the same weights,
bit for bit, at the file's size (a GroupedCodes of a Q4_K tensor would cost 6 bits
a weight in Int4Weight tiles, a Q6_K one 10 in Int8Weight tiles, against the file's
4.5 and 6.5625). Their activations are int8 per 256 inputs instead of per 32.

Two shapes of GroupedCodes need a wrapper, since one packed matrix cannot express
them: GPTQ's act-order (the columns are stored sorted by group: the activations are
gathered in that order before the multiplication) and stacked parts of different
types (a Q4_K_M file's [q | k | v] from a Q4_K and a Q6_K tensor: each part
multiplies on its own and the outputs are concatenated).

This needs the group-wise kernels (`Int4Weight.from_codes`); `available()` says
whether this install has them, and `minislm.load` falls back to float32 without.
"""

import numpy as np

from .grouped import GroupedCodes, RowStack, SuperBlockCodes, to_float32


def available() -> bool:
    from .. import kernels

    return (hasattr(getattr(kernels, "Int4Weight", None), "from_codes") and hasattr(kernels, "Int8Weight")
            and hasattr(kernels, "KQuantWeight"))


def to_kernel_weight(stored, name: str = "weight"):
    """A float32 array stays float32; GroupedCodes, SuperBlockCodes and RowStack become
    packed weights."""
    if isinstance(stored, RowStack):
        return StackedRows([to_kernel_weight(part, name) for part in stored.parts])
    if isinstance(stored, SuperBlockCodes):
        from ..kernels import KQuantWeight

        q = stored
        return KQuantWeight.from_superblocks(q.codes, q.d, q.sub_scales, q.dmin, q.sub_mins, q.bits, name=name)
    if not isinstance(stored, GroupedCodes):
        return to_float32(stored)
    from ..kernels import Int4Weight, Int8Weight

    q = stored
    kind = Int4Weight if q.bits <= 4 else Int8Weight
    if q.codes.dtype == np.int8:  # Q8_0's signed codes: shift to unsigned, zero code 128
        codes, zero, offsets = (q.codes.astype(np.int16) + 128).astype(np.uint8), 128, None
    elif q.zero is not None:
        codes, zero, offsets = q.codes, q.zero, None
    else:
        codes, zero, offsets = q.codes, 0, q.offsets
    weight = kind.from_codes(codes, q.scales, q.group_size, zero=zero, offsets=offsets, name=name)
    return weight if q.input_order is None else GatheredInputs(weight, q.input_order)


def is_float32(weight) -> bool:
    """A float32 array, or a stack of them (a float GGUF's separate q/k/v): the weights
    the float path multiplies exactly, as opposed to a file's codes."""
    if isinstance(weight, StackedRows):
        return all(is_float32(part) for part in weight.parts)
    return isinstance(weight, np.ndarray)


class GatheredInputs:
    """GPTQ act-order: the packed columns are the inputs in `order`; gather x the same way."""

    def __init__(self, weight, order: np.ndarray):
        self.weight, self.order = weight, np.asarray(order)
        self.shape = weight.shape

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.order.nbytes)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return self.weight.matmul(np.ascontiguousarray(x[:, self.order]))  # (T, in) -> (T, out)

    def dequantize(self) -> np.ndarray:
        w = np.empty(self.shape, dtype=np.float32)
        w[:, self.order] = self.weight.dequantize()
        return w


class StackedRows:
    """Parts stacked along the outputs ([q | k | v]); each multiplies on its own."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.parts))

    def matmul(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([p.matmul(x) if not isinstance(p, np.ndarray) else x @ p.T for p in self.parts], axis=-1)

    def dequantize(self) -> np.ndarray:
        return np.concatenate([p if isinstance(p, np.ndarray) else p.dequantize() for p in self.parts])
