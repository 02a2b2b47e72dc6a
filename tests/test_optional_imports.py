"""The README's test command needs only the `test` extra: a static check of every test module.

A test module may import the standard library, minislm, the suite's own helper
modules, the runtime's dependencies and the `test` extra. The packages of
tests/optional.py (torch, transformers, llama_cpp, mlx, awq) only after a guard that
skips without them: at module level after a module-level guard, inside a function
after a guard earlier in that function (or one at module level). An import that is
none of these is a package nobody declared. Reading the source costs milliseconds,
so this catches the next unguarded import before a bare machine does.
"""

import ast
import sys
from pathlib import Path

import pytest

from optional import OPTIONAL_PACKAGES

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# pyproject.toml's dependencies and `test` extra, by import name (checked against it below)
DECLARED = {
    "numpy": "numpy", "numba": "numba", "safetensors": "safetensors", "tokenizers": "tokenizers",
    "huggingface_hub": "huggingface_hub", "jinja2": "jinja2", "tqdm": "tqdm", "threadpoolctl": "threadpoolctl",
    "gguf": "gguf", "pytest": "pytest", "hypothesis": "hypothesis", "matplotlib": "matplotlib", "PIL": "pillow",
    "openai": "openai", "soundfile": "soundfile", "soxr": "soxr", "llguidance": "llguidance",
    "jsonschema": "jsonschema",
}
GUARDS = {"require_module", "import_reference", "importorskip", "skip_or_fail"}
LOCAL = {p.stem for p in TESTS.glob("*.py")} | {"minislm"}


def calls_a_guard(node: ast.AST) -> bool:
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            f = call.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in GUARDS:
                return True
    return False


def imported_packages(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name.split(".")[0] for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def problems(source: str, filename: str) -> list[str]:
    """Every import in `source` that the rules above do not allow, as 'file:line: why'."""
    tree = ast.parse(source, filename)
    found = []

    def check(statements, guarded: bool):
        for statement in statements:
            for package in imported_packages(statement):
                where = f"{filename}:{statement.lineno}"
                if package in OPTIONAL_PACKAGES and not guarded:
                    found.append(f"{where}: imports {package} with no guard before it (tests/optional.py)")
                elif package not in OPTIONAL_PACKAGES and not (
                    package in sys.stdlib_module_names or package in DECLARED or package in LOCAL
                ):
                    found.append(f"{where}: imports {package}, which neither the `test` extra nor "
                                 "tests/optional.py declares")
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                check(list(statement.body), guarded)
            elif not isinstance(statement, (ast.Import, ast.ImportFrom)):
                nested = [n for n in ast.iter_child_nodes(statement) if isinstance(n, ast.stmt)]
                check(nested, guarded)
            guarded = guarded or (
                not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and calls_a_guard(statement)
            )

    check(tree.body, False)
    return found


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_no_unguarded_optional_import(path):
    assert problems(path.read_text(encoding="utf-8"), path.name) == []


def test_the_check_catches_what_it_should():
    """The rules themselves, on small modules: each bad case is found, each good one passes."""
    assert problems("import torch\n", "m.py")
    assert problems("def test_a():\n    import transformers\n", "m.py")
    assert problems("def test_a():\n    import llama_cpp\n    require_module('llama_cpp')\n", "m.py")
    assert problems("def helper():\n    require_module('torch')\n\nimport torch\n", "m.py")  # a def guards nothing
    assert problems("import scipy\n", "m.py")  # declared nowhere
    assert not problems("import_reference()\nfrom transformers.models import phimoe\n", "m.py")
    assert not problems("def test_a():\n    torch, _ = import_reference()\n    from torch import nn\n", "m.py")
    assert not problems("import json\nimport numpy\nimport minislm\nfrom conftest import FIXTURES\n", "m.py")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library from Python 3.11")
def test_declared_packages_are_pyprojects():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [r.split(">")[0].split("=")[0].split("[")[0].strip().lower()
             for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    assert sorted(set(names)) == sorted(set(d.lower() for d in DECLARED.values()))
