"""The first-run compile notice (minislm/compile_notice.py): said at most once per
process, and only when Numba really compiles one of minislm's kernels.

Each test makes compilation certain, or certainly absent: a fresh dispatcher has
nothing compiled and no disk cache; an empty NUMBA_CACHE_DIR has nothing cached;
a second process over the same folder finds every kernel the first one compiled.
"""

import io
import os
import subprocess
import sys

import numba
import numpy as np
from numba.core import event

from minislm.compile_notice import NOTICE, CompileNotice
from minislm.kernels.attention import store_float_kernel


def compile_fresh(py_func, *args):
    """Compile `py_func` for real: a new dispatcher without `cache=True` loads nothing."""
    numba.njit(py_func)(*args)


def test_a_kernel_that_really_compiles_is_announced_once():
    said = io.StringIO()
    src, dst = np.ones((1, 2, 3), np.float32), np.zeros((1, 4, 3), np.float32)
    with event.install_listener("numba:compile", CompileNotice(said)):
        compile_fresh(store_float_kernel.py_func, src, dst, 0)
        compile_fresh(store_float_kernel.py_func, src, dst, 1)  # compiles again: no second notice
    assert said.getvalue() == NOTICE + "\n"
    assert (dst[0, 1:3] == 1).all()  # it did run


def test_code_outside_minislm_compiling_is_not_announced():
    def double(x):
        return 2 * x

    said = io.StringIO()
    with event.install_listener("numba:compile", CompileNotice(said)):
        compile_fresh(double, 3)
    assert said.getvalue() == ""


# Two loads and a forward each, as a script that loads several models would do.
TWO_LOADS = "import minislm\nfor _ in range(2):\n    model = minislm.load()\n    model.logits(model.tokenizer.encode('ROMEO:'))\n"


def run_two_loads(cache_dir) -> str:
    result = subprocess.run([sys.executable, "-c", TWO_LOADS], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir)))
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_once_per_process_when_the_cache_is_cold_and_never_when_it_is_warm(tmp_path):
    """An empty Numba cache: the float32 path's kernels (attention, cache stores)
    compile during the first forward, and two loads say so once. The same cache in
    a new process: everything loads from disk, nothing compiles, nothing is said."""
    cold = run_two_loads(tmp_path / "numba")
    assert cold.splitlines().count(NOTICE) == 1, cold
    assert any((tmp_path / "numba").rglob("*.nbc"))  # Numba did compile (and cache) something
    warm = run_two_loads(tmp_path / "numba")
    assert NOTICE not in warm, warm
