"""Run every command pasted in docs/tour.md again and compare with the pasted output.

    python tools/check_tour.py            # exits 1 on any difference and shows it
    python tools/check_tour.py --write    # paste what they print now where it differs

Each line starting with `$ ` inside a ``` block is a shell command (`python` is this
interpreter), run from the repository root; a command ending in `<<'EOF'` takes the
lines up to `EOF` as its input. The lines after it, up to the next `$ `, are what a
terminal shows: its stdout, then its stderr (every command here writes stderr last,
if at all). Compared line by line, with three allowances, each for something the
command cannot make the same on every run:

- Last-digit noise. A float32 sum depends on how the BLAS splits it (the CPU, the
  thread count), so a value printed to 4 decimals that lies near a rounding boundary
  prints one unit apart on another machine (`up`'s min: -4.96205 printed -4.9620 on
  the machine that wrote the tour and -4.9621 on another). A number may differ from
  the pasted one by at most one unit of its last printed digit, in the same format;
  any larger change, and any change of text, is a difference.
- Measurements. Speeds (`N tok/s`) and peak memory (`peak memory N GiB`) are timed or
  read from the OS: any number is accepted there, the text around it is not.
- Numba's first-run notice (minislm.compile_notice.NOTICE) appears only when the
  kernel cache is cold; it is dropped from stderr.

Also checks that docs/explain.png was made by the tour's `explain` command: the
picture carries the command in its PNG text (tools/explain_screenshot.py writes it).
tests/test_tour.py runs all of this.
"""

import argparse
import difflib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from minislm.compile_notice import NOTICE

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour.md"
PICTURE = ROOT / "docs" / "explain.png"
PICTURE_KEY = "minislm-command"  # the PNG text field holding the command the picture shows

NUMBER = re.compile(r"-?\d+\.\d+(?:e[+-]\d+)?|-?\d+e[+-]\d+")  # printed with decimals or an exponent
MEASURED = re.compile(r"[\d.]+ tok/s|peak memory [\d.]+ GiB")


@dataclass
class Block:
    command: str  # with its here-document, if any
    expected: str
    start: int  # where `expected` starts and ends in the page
    end: int


def blocks(text: str) -> list[Block]:
    """Every `$ ` command inside a plain ``` block, with the output pasted after it."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    found, i, inside = [], 0, False
    while i < len(lines):
        line = lines[i].rstrip("\n")
        if line.startswith("```"):
            inside = not inside and line == "```"  # a ```sh or ```python block shows no output
            i += 1
            continue
        if not (inside and line.startswith("$ ")):
            i += 1
            continue
        command = [line[2:]]
        heredoc = re.search(r"<<'?(\w+)'?$", line)
        i += 1
        while heredoc and i < len(lines):
            command.append(lines[i].rstrip("\n"))
            i += 1
            if command[-1] == heredoc.group(1):
                break
        start = i
        while i < len(lines) and not lines[i].startswith(("$ ", "```")):
            i += 1
        expected = "".join(lines[start:i]).rstrip()
        found.append(Block("\n".join(command), expected, offsets[start], offsets[start] + len(expected)))
    return found


def run(command: str) -> str:
    """What a terminal shows for `command`: stdout, then stderr without the compile notice."""
    first, _, heredoc = command.partition("\n")
    shell = re.sub(r"\bpython\b", sys.executable, first) + ("\n" + heredoc if heredoc else "")
    done = subprocess.run(shell, shell=True, cwd=ROOT, capture_output=True, text=True, executable="/bin/bash")
    stderr = "".join(line for line in done.stderr.splitlines(keepends=True) if line.rstrip("\n") != NOTICE)
    return (done.stdout + stderr).rstrip()


def last_digit(number: str) -> float:
    """One unit of the last printed digit: 0.0001 for "-4.9620", 1e-07 for "-8.93e-05"."""
    mantissa, _, exponent = number.partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def same_format(a: str, b: str) -> bool:
    return len(a.partition(".")[2].partition("e")[0]) == len(b.partition(".")[2].partition("e")[0]) and ("e" in a) == ("e" in b)


def same_line(expected: str, got: str) -> bool:
    """Equal but for last-digit noise and measurements (see the module's docstring)."""
    expected, got = MEASURED.sub("<measured>", expected), MEASURED.sub("<measured>", got)
    if expected == got:
        return True
    words = lambda line: [" ".join(piece.split()) for piece in NUMBER.split(line)]  # noqa: E731 (a column may widen)
    pairs = list(zip(NUMBER.findall(expected), NUMBER.findall(got)))
    if words(expected) != words(got) or all(a == b for a, b in pairs):  # other text, or spacing alone
        return False
    return all(a == b or (same_format(a, b) and abs(float(a) - float(b)) <= 1.001 * last_digit(a)) for a, b in pairs)


def same_output(expected: str, got: str) -> bool:
    a, b = expected.splitlines(), got.splitlines()
    return len(a) == len(b) and all(same_line(x, y) for x, y in zip(a, b))


def picture_command() -> str | None:
    """The command docs/explain.png shows, from its PNG text; None without one."""
    from PIL import Image

    with Image.open(PICTURE) as image:
        return image.text.get(PICTURE_KEY)


def tour_explain_command(text: str) -> str:
    return next(b.command for b in blocks(text) if b.command.startswith("python -m minislm explain "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="paste what runs now where it differs (beyond the allowances)")
    args = parser.parse_args()
    text = TOUR.read_text(encoding="utf-8")
    failed, page = 0, ROOT / "explain.html"  # the tour's explain step writes it
    page_existed = page.exists()
    results = [(block, run(block.command)) for block in blocks(text)]
    for block, got in results:
        same = same_output(block.expected, got)
        failed += not same
        print(("same " if same else "DIFFERENT ") + block.command.splitlines()[0])
        if not same:
            diff = difflib.unified_diff(block.expected.splitlines(), got.splitlines(), "docs/tour.md", "now", lineterm="")
            print("\n".join(diff) + "\n")
    shown = picture_command()
    explain = tour_explain_command(text)
    if shown != explain:
        failed += 1
        print(f"DIFFERENT docs/explain.png shows {shown!r}, the tour runs {explain!r}: "
              "run tools/explain_screenshot.py")
    if not page_existed:
        page.unlink(missing_ok=True)
    different = [(block, got) for block, got in results if not same_output(block.expected, got)]
    if args.write and different:
        for block, got in reversed(different):  # from the end, so that earlier offsets stay valid
            text = text[: block.start] + got + text[block.end :]
        TOUR.write_text(text, encoding="utf-8")
        print("wrote docs/tour.md: read the diff")
    return 1 if failed and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
