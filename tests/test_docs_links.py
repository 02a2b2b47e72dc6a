"""The guided tour and the exercises link to exact lines of code: keep those links true.

docs/tour.md and docs/exercises.md write links as [`module.function`](../path.py#L123):
line 123 of that file must define `function` (a `def` or a `class`), so that a
reader who clicks lands on it. When the code moves, this test names the link to fix.
"""

import re

import pytest

from conftest import ROOT

LINK = re.compile(r"\[`([\w.]+)`\]\(\.\./([\w/.]+\.py)#L(\d+)\)")
DOCS = ["docs/tour.md", "docs/exercises.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_line_links_point_at_the_definition_they_name(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    links = LINK.findall(text)
    assert links, f"{doc} has no line links"
    wrong = []
    for name, path, line in links:
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        target = lines[int(line) - 1] if int(line) <= len(lines) else ""
        defined = name.split(".")[-1]
        if not re.match(rf"\s*(def|class) {re.escape(defined)}\b", target):
            wrong.append(f"{name} -> {path}#L{line}: {target.strip()!r}")
    assert not wrong, f"{doc}: links that do not land on their definition:\n" + "\n".join(wrong)
