"""Fast paths for minislm (Numba), each with a plain-NumPy twin in reference.py.

    Fp32Weight(w)           fp32 (out, in): Numba GEMV, BLAS GEMM
    DecodeRows(w)           an fp32 array, Fp32Weight or Bf16Weight whose matmul takes
                            the GEMV kernel for any number of rows (batched decoding:
                            each row's bits as if it were alone)
    Bf16Weight(w)           bf16 kept as uint16 words, widened in the kernels
    Bf16Weight(w, activations="bf16")
                            the same, times activations rounded to bf16 (vdpbf16ps)
    Int4Weight(w, group_size=32, symmetric=True)
                            4-bit codes, a scale per group (llama.cpp Q4_0's rule)
    Int8Weight(w, group_size=32)
                            8-bit codes, a scale per group (Q8_0's rule)
    KQuantWeight.from_superblocks(codes, d, sub_scales, dmin, sub_mins, bits)
                            llama.cpp's Q4_K / Q5_K / Q6_K at the file's size: two
                            levels of scales, 4-6-bit codes (kquant.py)
    set_threads(n), threading_layer(), kernel_paths()

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
AWQ/GPTQ codes q, s, G, zero=z (per group); MLX codes q, scales, 64, zero=0,
offsets=biases. (K-quants fit too — Q4_K codes q, d*sc, 32, zero=0,
offsets=-(dmin*m) — at 6 bits a weight; `KQuantWeight` keeps them at the file's
4.5-6.6.)

Where things are. The rule for twins: every kernel's plain-NumPy twin is in
`reference.py`, one section per kernel file, under the kernel's own name where
that names an operation (`packed.search_scales` / `reference.search_scales`,
`attention.attend_cached` / `reference.attend_cached`); no kernel file holds a
twin. `reference.py` imports only NumPy and is where bfloat16 is defined
(`bf16_to_f32`, `f32_to_bf16`; minislm/weights.py imports them from it), so the
kernels import nothing from the rest of minislm. `scalars.py` holds the one-number
conversions every kernel inlines (bf16 and half widening, bit-casts), `simd.py`
the hand-written LLVM IR of the packed dot products, `cpu.py` picks the
instructions (VNNI, AMX, portable) at run time. The layouts are drawn in
docs/formats.md, the measurements in docs/kernels.md.
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
    from .cpu import kernel_paths
    from .fp32 import DecodeRows, Fp32Weight
    from .kquant import KQuantWeight
    from .packed import Int4Weight, Int8Weight

__all__ = ["Fp32Weight", "DecodeRows", "Bf16Weight", "Int4Weight", "Int8Weight", "KQuantWeight",
           "set_threads", "get_threads", "threading_layer", "kernel_paths"]
