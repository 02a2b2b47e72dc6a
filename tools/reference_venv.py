"""The separate venv in which a fixture tool runs its reference (the hub's remote code
at the transformers version it was written for), made once and kept.

torch and torchvision go in first, on their own: pinned, so that pip takes the wheels
this machine holds, and before transformers, which would otherwise pull a torch of its
choosing. Used by tools/make_vision_fixtures.py, make_phi4mm_fixtures.py and
make_phi3_small_fixtures.py.
"""

import subprocess
import sys
from pathlib import Path


def ensure_reference_venv(venv: Path, packages: list[str]) -> Path:
    """The python of `venv`, created with `packages` if it does not exist yet."""
    python = venv / "bin" / "python"
    if not python.is_file():
        first = [p for p in packages if p.split("=")[0] in ("torch", "torchvision")]
        rest = [p for p in packages if p not in first]
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for group in (first, rest):
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", *group], check=True)
    return python
