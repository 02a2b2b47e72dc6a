"""docs/tour.md shows what its commands print, and docs/explain.png shows the tour's
`explain` command (tools/check_tour.py does the comparing; these tests run it).

The comparison allows what no command can make the same on every machine and run:
one unit in the last printed digit (float32 sums differ with the BLAS's blocking),
timed speeds and peak memory, and Numba's first-run notice. Everything else must
match, stdout and stderr alike.
"""

import importlib.util

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("check_tour", ROOT / "tools" / "check_tour.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

TOUR = check.TOUR.read_text(encoding="utf-8")
BLOCKS = check.blocks(TOUR)


def test_one_unit_in_the_last_digit_is_noise_and_nothing_more():
    assert check.same_line("up   0  -4.9620    5.7037", "up   0  -4.9621    5.7037")
    assert check.same_line("mean  -8.93e-05", "mean  -8.94e-05")
    assert check.same_line("max    9.9999", "max   10.0000")  # the column widens
    assert not check.same_line("up   0  -4.9620", "up   0  -4.9622")
    assert not check.same_line("mean  -8.93e-05", "mean  -8.95e-05")
    assert not check.same_line("min  -4.9620", "min  -4.962")  # another format is a change
    assert not check.same_line("0.0756  '▁be' (id 391)", "0.0756  '▁the' (id 391)")
    assert not check.same_line("layer 0   22.7", "layer 0  22.7")  # spacing alone
    assert not check.same_output("a\nb", "a")


def test_speeds_and_memory_are_measurements_but_the_words_around_them_are_not():
    line = "[prompt 6 tokens, 256.6 tok/s | generated 1 token, decode rate n/a | stop: length | peak memory 0.17 GiB]"
    assert check.same_line(line, line.replace("256.6", "12.0").replace("0.17", "0.31"))
    assert not check.same_line(line, line.replace("1 token,", "1 tokens,"))
    assert not check.same_line(line, line.replace("prompt 6", "prompt 7"))


def test_a_here_document_belongs_to_its_command():
    [block] = check.blocks("```\n$ python - <<'EOF'\nprint(1)\nEOF\n1\n```\n")
    assert block.command == "python - <<'EOF'\nprint(1)\nEOF" and block.expected == "1"
    assert check.run(block.command) == "1"


def test_stderr_is_compared_too():
    assert check.run("echo out; echo err >&2") == "out\nerr"


def test_the_picture_shows_the_tours_explain_command():
    assert check.picture_command() == check.tour_explain_command(TOUR), "run tools/explain_screenshot.py"


@pytest.fixture
def no_stray_page():
    page = ROOT / "explain.html"  # the tour's explain step writes it in the repository root
    existed = page.exists()
    yield
    if not existed:
        page.unlink(missing_ok=True)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{i}: {b.command.splitlines()[0][:60]}" for i, b in enumerate(BLOCKS)])
def test_the_tour_shows_what_its_command_prints(block, no_stray_page):
    got = check.run(block.command)
    assert check.same_output(block.expected, got), f"run tools/check_tour.py; now:\n{got}"
