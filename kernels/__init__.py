"""Fast paths for minislm (Numba), each beside a plain-NumPy reference.

    Fp32Weight(w)           fp32 (out, in): Numba GEMV, BLAS GEMM
    DecodeRows(w)           an fp32 array, Fp32Weight or Bf16Weight whose matmul takes
                            the GEMV kernel for any number of rows (batched decoding:
                            each row's bits as if it were alone)
    Bf16Weight(w)           bf16 kept as uint16 words, widened in the kernels
    Int4Weight(w, group_size=32, symmetric=True)
                            4-bit codes, a scale per group (llama.cpp Q4_0's rule)
    Int8Weight(w, group_size=32)
                            8-bit codes, a scale per group (Q8_0's rule)
    set_threads(n), threading_layer(), kernel_paths(), kernels_for(format)

Every weight class has .matmul(x) -> (T, out), .rows(ids) -> (len, in),
.shape, .nbytes, .tensors(prefix) and the classmethod .from_tensors(...).

Weights quantized elsewhere (GGUF, AWQ, GPTQ, MLX) enter exactly as they are:

    Int4Weight.from_codes(codes, scales, group_size, zero=None, offsets=None)
    Int8Weight.from_codes(codes, scales, group_size, zero=None, offsets=None)

  codes    uint8 (out, in): unsigned codes < 16 (Int4Weight) or < 256 (Int8Weight)
  scales   float (out, groups), groups = ceil(in / group_size); kept as
           float16 when every scale is exactly a float16, else float32
  zero     None (8 for int4, 128 for int8), an int for every group, or
           uint8 (out, groups): one zero code per group
  offsets  None or float32 (out, groups)

and element [r, k] is then, in float32 and in this order,
`scales[r, g] * (codes[r, k] - zero[r, g]) + offsets[r, g]` with g = k // group_size
(`reference.dequantize`). group_size: a multiple of 8 (int4) or 4 (int8), <= 1024.
Examples: Q4_0 codes q, d, 32, zero=8; Q8_0 codes q + 128, d, 32, zero=128;
Q4_K codes q, d*sc, 32, zero=0, offsets=-(dmin*m); AWQ/GPTQ codes q, s, G,
zero=z (per group); MLX codes q, scales, 64, zero=0, offsets=biases;
Q6_K (Int8Weight) codes q, d*sc, 16, zero=32.

`reference.py` is the plain-NumPy specification of every kernel; the
layouts are drawn in docs/formats.md, the measurements in docs/kernels.md.
`cpu.py` picks the instructions (VNNI, AMX, portable) at run time.
Importing compiles nothing: kernels compile on first call and are cached
on disk (numba cache=True).

Imported as `kernels` rather than `minislm.kernels` (from the repository's root,
where `python -m` puts this folder on sys.path), it hands the import over to the
PyPI package of that name: see `hand_over_to_the_pypi_kernels`.
"""


def hand_over_to_the_pypi_kernels() -> None:
    """This folder imported as a top-level `kernels`: pass the import to the package
    that really has that name, or fail as if this folder were not there.

    The folder sits in the repository's root, which `python -m ...` run from a clone
    puts first on sys.path, so `import kernels` finds it before site-packages. The
    name belongs to the PyPI package `kernels` (Hugging Face's hub kernels), which
    transformers 5 imports. Python returns whatever `sys.modules["kernels"]` holds
    once this file has run, so putting the real package there is a complete answer.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is minislm.kernels)",
                                  name="kernels")
    real = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = real
    try:
        spec.loader.exec_module(real)
    except BaseException:
        del sys.modules["kernels"]
        raise


if __name__ == "kernels":
    hand_over_to_the_pypi_kernels()
else:
    from .threads import get_threads, set_threads, threading_layer  # noqa: F401  (sets the layer)
    from .bf16 import Bf16Weight
    from . import cpu
    from .cpu import kernel_paths
    from .fp32 import DecodeRows, Fp32Weight
    from .packed import Int4Weight, Int8Weight

__all__ = ["Fp32Weight", "DecodeRows", "Bf16Weight", "Int4Weight", "Int8Weight",
           "set_threads", "get_threads", "threading_layer", "kernel_paths", "kernels_for"]


def kernels_for(weight_format):
    """The Numba kernels every run of a "bf16" or "int4" model calls on this CPU
    (decode, embedding rows, quantizing): the ones whose first compilation the
    user waits for. Prefill kernels compile on the first prompt long enough to
    use them (a few seconds more)."""
    from . import activations, bf16, packed

    if weight_format == "bf16":
        return [bf16.gemv_bf16, bf16.widen_bf16_rows]
    path = cpu.int8_dot_path()
    return [packed.GEMV[4, path], packed.GEMV[8, path], packed.dequantize_rows, packed.group_scales,
            packed.search_scales, packed.quantize_codes, activations.quantize_activations,
            activations.prepare_token]
