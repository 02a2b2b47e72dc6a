"""Say so when Numba is about to compile the kernels, instead of sitting silent.

The bf16 and int4 kernels compile on first use and are cached on disk
(`cache=True`), so the first run of a path pays ~10 s that later runs do not.
Numba has no public "is this compiled already?" question; each kernel's cache
knows the file it would load (an index next to the compiled code), so we
look for those files: missing, or older than the kernel's source file, means
Numba will compile. Nothing is compiled or loaded to find out.
"""

import importlib
import os
import sys

NOTICE = "minislm: compiling kernels, first run only (about 10 s)"


def kernels_need_compiling(weight_format: str) -> bool:
    """True if some kernel of `weight_format` ("bf16" or "int4") has no fresh on-disk cache.
    False when the answer is unknown (another Numba version, caching off)."""
    try:
        from numba.core.dispatcher import Dispatcher

        module = importlib.import_module(f"minislm.kernels.{weight_format}")
        for kernel in vars(module).values():
            if isinstance(kernel, Dispatcher) and kernel.__module__ == module.__name__:
                index = kernel._cache._cache_file._index_path  # Numba's own bookkeeping; may move
                source = kernel.py_func.__code__.co_filename
                if not os.path.exists(index) or os.path.getmtime(index) < os.path.getmtime(source):
                    return True
    except (ImportError, AttributeError, OSError):
        return False
    return False


def announce_compilation(weight_format: str | None) -> None:
    """Print the notice on stderr when this run's kernels will compile."""
    if weight_format in ("bf16", "int4") and kernels_need_compiling(weight_format):
        print(NOTICE, file=sys.stderr, flush=True)
