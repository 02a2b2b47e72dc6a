"""The minislm.kernels surface the model relies on: import cost, threads, and every
weight class going through the model's `linear()`."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minislm.kernels as K
from minislm.model import linear
from minislm.kernels.threads import LAYER_PREFERENCE


def test_import_compiles_nothing():
    code = ("import minislm.kernels as K\n"
            "from minislm.kernels import bf16, bf16dot, fp32, kquant, packed, threads\n"
            "kernels = [fp32.gemv, fp32.gemm_f32, bf16.widen_bf16_rows, bf16.widen_bf16_block,\n"
            "           bf16dot.gemv_bf16_dot, bf16dot.gemm_bf16_dot, bf16dot.pair_activations,\n"
            "           packed.group_scales, packed.quantize_codes, packed.quantize_activations,\n"
            "           packed.dequantize_rows, threads._touch,\n"
            "           *packed.GEMV.values(), *packed.GEMM.values(),\n"
            "           kquant.prepare_kquant_token, kquant.kquant_buffers, kquant.dequantize_kquant_rows,\n"
            "           *kquant.GEMV.values(), *kquant.GEMM.values()]\n"
            "assert not any(k.signatures for k in kernels), [k for k in kernels if k.signatures]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_repository_root_does_not_shadow_the_pypi_kernels_package(tmp_path):
    """From the clone's root, `python -m ...` puts the kernels/ folder first on sys.path;
    `import kernels` must still give the PyPI package (transformers 5 imports it), or no
    package at all where it is not installed, never this folder."""
    root = Path(K.__file__).resolve().parent.parent
    if not (root / "kernels" / "__init__.py").is_file():
        pytest.skip("minislm.kernels is installed, not run from a clone: there is no root to shadow anything")
    code = "import kernels; print(kernels.__file__)"
    alone = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    if alone.returncode == 0:  # the PyPI package is installed (transformers >= 5.25 depends on it)
        assert Path(alone.stdout.strip()).resolve().parent != root / "kernels"
    else:
        assert "ModuleNotFoundError: No module named 'kernels'" in alone.stderr, alone.stderr
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'the PyPI package'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = "from kernels import CUDAProperties; import kernels; print(CUDAProperties, kernels.__file__)"
    found = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == f"the PyPI package {tmp_path / 'kernels' / '__init__.py'}"


def test_threading_layer_is_reported_and_preferred_in_order():
    assert K.threading_layer() in LAYER_PREFERENCE


def test_kernel_paths_name_the_cpu_and_what_runs_on_it():
    paths = K.kernel_paths()
    assert paths["cpu"] and paths["int4/int8 decode"] in ("vnni", "portable")
    assert paths["int4/int8 prefill"] in ("amx", "vnni", "portable")
    assert paths["bf16 decode"] in ("avx512", "portable")
    assert paths["bf16 prefill"] in ("amx", "avx512", "portable")
    assert paths["bf16 x bf16 prefill"] in ("amx", "avx512bf16", "avx512", "portable")


def test_set_threads_changes_the_count_and_rejects_nonsense():
    before = K.get_threads()
    try:
        K.set_threads(1)
        assert K.get_threads() == 1
    finally:
        K.set_threads(before)
    with pytest.raises(ValueError, match="--threads 0"):
        K.set_threads(0)


@pytest.mark.parametrize("make", [np.asarray, K.Fp32Weight, K.Bf16Weight,
                                  lambda w: K.Int4Weight(w, group_size=32), K.Int8Weight])
def test_linear_takes_plain_arrays_and_every_weight_class(make):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = linear(x, make(w))
    assert y.shape == (3, 48) and y.dtype == np.float32
    # int4 is the loosest: ~5 % relative error per weight, averaged over 64 inputs
    np.testing.assert_allclose(y, x @ w.T, atol=0.25 * np.abs(x @ w.T).max())


def test_linear_takes_k_quant_weights():
    """A Q4_K-shaped weight (rows of 256 inputs) through the model's `linear()`."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (48, 256), dtype=np.uint8)
    d = np.full((48, 1), 2.0 ** -8, np.float32)
    sc, m = rng.integers(0, 64, (48, 8), dtype=np.uint8), rng.integers(0, 64, (48, 8), dtype=np.uint8)
    w = K.KQuantWeight.from_superblocks(codes, d, sc, d, m, bits=4)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = linear(x, w)
    assert y.shape == (3, 48) and y.dtype == np.float32
    # int8 activations per 256 inputs: within max|x| / 254 per input of the exact product
    bound = np.abs(w.dequantize()).sum(1) * np.abs(x).max(1, keepdims=True) / 254 * 1.01
    assert (np.abs(y - x @ w.dequantize().T) <= bound).all()


KERNELS = Path(K.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The modules a file imports, relative imports written with their dots."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_kernels_import_nothing_from_the_rest_of_minislm():
    """The kernels sit at the bottom of the package: the loader imports them (bf16 is
    defined in reference.py), never the other way round."""
    for path in sorted(KERNELS.glob("*.py")):
        upward = {m for m in imports_of(path) if m.startswith(("minislm", ".."))}
        assert not upward, f"{path.name} imports {sorted(upward)}"


def test_every_twin_lives_in_reference_py_which_needs_only_numpy():
    """The rule of kernels/__init__.py: no kernel file keeps a twin of its own (they
    were named *_reference), and reference.py imports NumPy alone."""
    assert imports_of(KERNELS / "reference.py") == {"numpy"}
    for path in sorted(KERNELS.glob("*.py")):
        defined = {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(node, ast.FunctionDef)}
        assert not {name for name in defined if name.endswith("_reference")}, path.name
