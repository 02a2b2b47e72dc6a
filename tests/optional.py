"""What the suite may use beyond the `test` extra, and the one way a test asks for it.

The README's test command installs only `.[test]`. A test that needs anything else
(the reference stack, a second engine, a browser) asks through `require_module`, or
`skip_or_fail` with the variable CI sets: where the package or program is missing,
the test is skipped with a reason that starts with SKIP_PREFIX and says how to
install it. CI first
runs the suite exactly so (phase 1), then installs everything below and runs again
the tests that skipped for that reason, with the `MINISLM_REQUIRE_*` variables set:
there a missing package fails the run instead (phase 2, see .ci/run).
tests/test_optional_imports.py reads every test module and refuses an import of
these packages that no such guard precedes.
"""

import importlib
import os

import pytest

SKIP_PREFIX = "optional"

# import name -> (the variable that makes it required, how to install it)
OPTIONAL_PACKAGES = {
    "torch": ("MINISLM_REQUIRE_REFERENCE", "pip install torch==2.13.0, or the `reference` extra"),
    "transformers": ("MINISLM_REQUIRE_REFERENCE", "pip install transformers, or the `reference` extra"),
    # transformers' Phi-4-multimodal image processor runs on torchvision, which needs torch 2.14.1 here
    # (PyPI's torchvision does not import beside the 2.13.0 wheel CI uses): its own variable
    "torchvision": ("MINISLM_REQUIRE_TORCHVISION", "pip install torch==2.14.1 torchvision==0.29.1"),
    "peft": ("MINISLM_REQUIRE_REFERENCE", "pip install peft, or the `reference` extra"),
    "llama_cpp": ("MINISLM_REQUIRE_LLAMA_CPP", "pip install llama-cpp-python (a native build)"),
    "mlx": ("MINISLM_REQUIRE_FORMAT_REFERENCES", "pip install 'mlx[cpu]'"),
    "awq": ("MINISLM_REQUIRE_FORMAT_REFERENCES", "pip install --no-deps autoawq==0.2.9"),
}
BROWSER_VARIABLE = "MINISLM_REQUIRE_BROWSER"


def required(variable: str) -> bool:
    return os.environ.get(variable) == "1"


def skip_or_fail(reason: str, variable: str):
    """Skip, or fail where CI has said (variable=1) that this must run."""
    if required(variable):
        pytest.fail(f"{variable}=1 but {reason}", pytrace=False)
    pytest.skip(f"{SKIP_PREFIX}: {reason}", allow_module_level=True)


def require_module(name: str):
    """Import `name` (e.g. "torch", "mlx.core"), or skip the test saying what is missing."""
    top = name.split(".")[0]
    variable, how = OPTIONAL_PACKAGES[top]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        skip_or_fail(f"{name} is not installed ({how}): {e}", variable)

