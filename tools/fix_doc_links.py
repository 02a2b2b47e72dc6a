"""Move the line links of docs/tour.md and docs/exercises.md to where their definitions are now.

The docs link to exact lines ([`model.forward`](../minislm/model.py#L339)) so a reader
lands on the `def`; tests/test_docs_links.py fails when code moves. This rewrites each
link to the line of the `def`/`class` it names (for a dotted name such as
`tokenizer.Tokenizer.encode`, the method inside that class). Run it after a change that
moves code, then read the diff.

    python tools/fix_doc_links.py
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[`([\w.]+)`\]\(\.\./([\w/.]+\.py)#L(\d+)\)")
DOCS = ["docs/tour.md", "docs/exercises.md"]


def definition_line(path: Path, dotted: str) -> int | None:
    """1-based line of the last part of `dotted`, inside the class named before it if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    parts = dotted.split(".")
    name, owner = parts[-1], parts[-2] if len(parts) >= 2 and parts[-2][:1].isupper() else None
    start = 0
    if owner:
        for i, line in enumerate(lines):
            if re.match(rf"class {re.escape(owner)}\b", line):
                start = i
                break
    for i in range(start, len(lines)):
        if re.match(rf"\s*(def|class) {re.escape(name)}\b", lines[i]):
            return i + 1
    return None


def main() -> int:
    missing = []
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text(encoding="utf-8")

        def move(match):
            name, source, line = match.groups()
            found = definition_line(ROOT / source, name)
            if found is None:
                missing.append(f"{doc}: {name} not found in {source}")
                return match.group(0)
            return f"[`{name}`](../{source}#L{found})"

        path.write_text(LINK.sub(move, text), encoding="utf-8")
    for m in missing:
        print(m, file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
