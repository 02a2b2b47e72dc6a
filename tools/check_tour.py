"""Run every command pasted in docs/tour.md again and compare with the pasted output.

    python tools/check_tour.py

Each block line starting with `$ ` is a shell command (`python` is this
interpreter); the lines up to the next `$ ` are what it printed (stdout; for
`explain`, which only reports on stderr, stderr). Exits 1 on any difference and
shows it. Numbers printed to 4 decimals can differ in the last digit on another
CPU or BLAS; on the machine that wrote the tour they match exactly. Not a test
for that reason: run it after changing anything the tour shows.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands(text: str):
    """(command, expected output) for every `$ ` line inside a ``` block."""
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        lines = block.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
        for n, i in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(lines)
            yield lines[i][2:], "\n".join(lines[i + 1 : end]).rstrip()


def main() -> int:
    failed = 0
    page = ROOT / "explain.html"  # the tour's explain step writes it
    page_existed = page.exists()
    for command, expected in commands((ROOT / "docs" / "tour.md").read_text(encoding="utf-8")):
        shell = command.replace("python -m minislm", f"{sys.executable} -m minislm")
        run = subprocess.run(shell, shell=True, cwd=ROOT, capture_output=True, text=True, executable="/bin/bash")
        got = (run.stderr if " explain " in command else run.stdout).rstrip()
        same = got == expected
        failed += not same
        print(("same " if same else "DIFFERENT ") + command)
        if not same:
            print(f"--- in docs/tour.md\n{expected}\n--- now\n{got}\n")
    if not page_existed:
        page.unlink(missing_ok=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
