"""Which instructions this CPU offers the kernels, decided once, at run time.

The integer kernels have three implementations of the same arithmetic (their
integer sums are exact, so all three give bit-identical results):

    "portable"  generic LLVM IR: zero/sign-extend, multiply, add neighbours.
                Any CPU LLVM targets (x86 without VNNI, ARM, ...).
    "vnni"      `vpdpbusd` (AVX-512 VNNI or AVX-VNNI): 4 byte products summed
                into each 32-bit lane by one instruction. Intel since Cascade
                Lake / Alder Lake, AMD since Zen 4.
    "avx512"    bf16 weights only: 512-bit float32 FMAs on weights widened in
                registers (`bf16dot.py`; any AVX-512 CPU). Exact products like
                the portable path, float32 sums in another order.
    "avx512bf16"  bf16 weights times activations rounded to bf16 (the encoders'
                opt-in, `Bf16Weight(..., activations="bf16")`): `vdpbf16ps`
                (`bf16pairs.py`; AVX512-BF16: AMD Zen 4+, Intel Cooper Lake,
                Sapphire Rapids+), 32 bf16 products per instruction.
    "amx"       Intel AMX tiles (`tdpbusd`, `tdpbf16ps`): a 16x16 block of dot
                products per instruction. Sapphire Rapids and later Xeons only;
                prefill only (decode reads each weight once, AMX cannot help).

The features come from LLVM (`llvmlite.binding.get_host_cpu_features`), which
is what Numba compiles for, so a path is chosen only if the compiler will
accept its instructions. AMX also needs the operating system's consent: Linux
(5.16+) keeps the 8 KB of tile registers out of each thread's saved state
until the process asks for them with `arch_prctl(ARCH_REQ_XCOMP_PERM)`;
`amx_permission()` asks once. Without it the first tile instruction would
kill the process.

`MINISLM_KERNELS=portable|vnni|amx` caps the choice (for measurements); it
never enables an instruction the CPU lacks. Every answer here is decided once
per process (the environment is read at the first matmul, not in every one).
"""

import ctypes
import os
import platform
from functools import lru_cache

import llvmlite.binding as llvm

PATHS = ("portable", "vnni", "amx")
ENV = "MINISLM_KERNELS"

# Linux x86-64 arch_prctl codes and the AMX tile-data state component (asm/prctl.h).
SYS_ARCH_PRCTL = 158
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


@lru_cache(maxsize=None)
def cpu_features() -> frozenset:
    """LLVM's names of the host CPU's features that are present ('avx512vnni', ...)."""
    flags = llvm.get_host_cpu_features().flatten().split(",")
    return frozenset(f[1:] for f in flags if f.startswith("+"))


def has_vnni() -> bool:
    f = cpu_features()
    return ("avx512vnni" in f and "avx512vl" in f) or "avxvnni" in f


def has_avx512() -> bool:
    return "avx512f" in cpu_features()


def has_avx512_bf16() -> bool:
    return {"avx512f", "avx512bf16"} <= cpu_features()


@lru_cache(maxsize=None)
def amx_permission() -> bool:
    """Ask Linux for the AMX tile state (once per process); True if granted."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
            return False
        granted = ctypes.c_uint64(0)
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(granted)) != 0:
            return False
        return bool(granted.value >> XFEATURE_XTILEDATA & 1)
    except (OSError, AttributeError):
        return False


def has_amx_int8() -> bool:
    return {"amx-tile", "amx-int8"} <= cpu_features() and amx_permission()


def has_amx_bf16() -> bool:
    return {"amx-tile", "amx-bf16"} <= cpu_features() and amx_permission()


@lru_cache(maxsize=None)
def allowed(path: str) -> bool:
    """Whether `MINISLM_KERNELS` permits `path` (it caps the choice, in PATHS order)."""
    cap = os.environ.get(ENV, "amx")
    if cap not in PATHS:
        raise ValueError(f"{ENV}={cap!r}: choose one of {', '.join(PATHS)}")
    return PATHS.index(path) <= PATHS.index(cap)


@lru_cache(maxsize=None)
def int8_dot_path() -> str:
    """'vnni' or 'portable': how the int4/int8 GEMV and GEMM multiply bytes."""
    return "vnni" if has_vnni() and allowed("vnni") else "portable"


@lru_cache(maxsize=None)
def int8_gemm_path() -> str:
    """'amx', 'vnni' or 'portable': the prefill path for int4/int8 weights."""
    if has_amx_int8() and allowed("amx"):
        return "amx"
    return int8_dot_path()


@lru_cache(maxsize=None)
def bf16_dot_path() -> str:
    """'avx512' (bf16dot.py) or 'portable' (float32 GEMV, BLAS on widened tiles):
    bf16 decode, and prefill without AMX. `MINISLM_KERNELS=portable` turns it
    off (it counts as the level of 'vnni')."""
    return "avx512" if has_avx512() and allowed("vnni") else "portable"


@lru_cache(maxsize=None)
def bf16_gemm_path() -> str:
    """'amx', 'avx512' or 'portable' (widen tiles to fp32, BLAS multiplies):
    bf16 prefill."""
    return "amx" if has_amx_bf16() and allowed("amx") else bf16_dot_path()


@lru_cache(maxsize=None)
def bf16_rounded_path() -> str:
    """'avx512bf16' (bf16pairs.py) where the CPU has it, else what bf16 decode
    uses ('avx512' or 'portable', on the activations rounded first): bf16 weights
    times bf16 activations below AMX's 16 tokens, and above them without AMX.
    Counts as the level of 'vnni' for `MINISLM_KERNELS`."""
    return "avx512bf16" if has_avx512_bf16() and allowed("vnni") else bf16_dot_path()


def kernel_paths() -> dict:
    """What runs here, for reports: {'cpu': ..., 'int8 decode': 'vnni', ...}."""
    return {
        "cpu": llvm.get_host_cpu_name(),
        "int4/int8 decode": int8_dot_path(),
        "int4/int8 prefill": int8_gemm_path(),
        "bf16 decode": bf16_dot_path(),
        "bf16 prefill": bf16_gemm_path(),
        "bf16 x bf16 prefill": "amx" if bf16_gemm_path() == "amx" else bf16_rounded_path(),
    }
