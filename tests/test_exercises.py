"""The hand edits of docs/exercises.md work when a reader makes them, and the
generation exercises measure what the doc says they measured.

Each ```diff block there is applied, as written, to a copy of the package
(tools/exercises.py: `hand_edits`, `edited_copy`); a child process imports the edited
copy and runs one forward pass through the edited code (`probe`). Its logits must equal
those of the tool's broken twin run on the unedited package, since the figures in the
doc come from the twin, and must differ from the unbroken logits, or the edit did nothing.

The generation exercises (top-p against the temperature, an int8 KV cache under the
lens, a sliding window) change no code and take seconds: each runs here, and what it
prints must be the doc's "Measured" block, but for one unit in a last printed digit
(tools/check_tour.py's rule: float32 sums round differently on other machines).
"""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


exercises = tool("exercises")
DOC = (ROOT / "docs" / "exercises.md").read_text(encoding="utf-8")
EDITS = exercises.hand_edits(DOC)
GENERATION_EXERCISES = ["top-p-survivors", "int8-cache-lens", "sliding-window"]
CODE_EXERCISES = {"rope-pairs", "no-causal-mask", "stale-cache", "top2-softmax", "knock-out-a-layer"}
# The edit and the twin do the same float32 operations in the same order, so the logits
# agree to rounding noise (the BLAS may split a matmul differently in another process);
# every edit moves some logit by more than 1 (the doc's figures: 2.77 to 14.11).
ATOL_SAME_COMPUTATION = 1e-4
MIN_BREAKAGE = 1.0

CHILD = """
import importlib.util, sys
import numpy as np
spec = importlib.util.spec_from_file_location("exercises_tool", sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
import minislm
assert minislm.__file__.startswith(sys.argv[4]), minislm.__file__  # the edited copy, not the checkout
np.save(sys.argv[3], tool.probe(sys.argv[2], tool.probe_model(sys.argv[2])))
"""


def test_every_exercise_that_edits_code_shows_its_edit():
    assert {edit.exercise for edit in EDITS} == CODE_EXERCISES


@pytest.mark.parametrize("edit", EDITS, ids=[edit.exercise for edit in EDITS])
def test_the_hand_edit_runs_and_computes_what_the_tool_measured(edit, tmp_path):
    package = exercises.edited_copy(edit, tmp_path / "copy")
    out = tmp_path / "logits.npy"
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT / "tools" / "exercises.py"), edit.exercise, str(out), str(package)],
        cwd=tmp_path / "copy", capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "copy")),
    )
    assert run.returncode == 0, f"{edit.exercise}: the edited package fails:\n{run.stderr[-3000:]}"
    edited = np.load(out)

    model = exercises.probe_model(edit.exercise)
    unbroken = exercises.probe(edit.exercise, model)
    with exercises.broken_twin(edit.exercise, model):
        twin = exercises.probe(edit.exercise, model)
    assert edited.shape == twin.shape
    np.testing.assert_allclose(edited, twin, rtol=0, atol=ATOL_SAME_COMPUTATION)
    assert np.abs(edited - unbroken).max() > MIN_BREAKAGE


def measured(markdown: str, exercise: str) -> str:
    """The first ``` block after **Measured** in the section that runs `exercise`."""
    section = next(part for part in re.split(r"\n## ", markdown) if f"python tools/exercises.py {exercise}`" in part)
    return re.search(r"\*\*Measured\*\*.*?```\n(.*?)```", section, re.S).group(1).rstrip("\n")


@pytest.mark.parametrize("name", GENERATION_EXERCISES)
def test_a_generation_exercise_prints_what_the_doc_shows(name, capsys):
    check = tool("check_tour")
    dict(exercises.EXERCISES)[name]()
    printed = capsys.readouterr().out.rstrip("\n")
    shown = measured(DOC, name)
    assert check.same_output(shown, printed), f"docs/exercises.md shows:\n{shown}\nthe tool prints:\n{printed}"
