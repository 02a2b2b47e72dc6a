"""Make docs/explain.png: the explorer page of the tour's `explain` command, as headless Chromium draws it.

    python tools/explain_screenshot.py [--out docs/explain.png]

Runs the `python -m minislm explain ...` command of docs/tour.md (its prompt and
flags; the page goes to a temporary folder), opens the page in Chromium (Debian's
`chromium` package) with a layer and head chosen in the URL, takes a screenshot of
the top of the page, and reduces it to a 64-colour palette PNG so it stays small.
The PNG's text field `minislm-command` keeps the command, so that tools/check_tour.py
(and tests/test_tour.py) can tell when the tour's command and the picture part ways.
"""

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from check_tour import PICTURE_KEY, TOUR, tour_explain_command

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "explain.png"))
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--query", default="layer=2&head=3", help="what the page shows first")
    parser.add_argument("--size", default="1300,1420", help="window width,height in pixels")
    args = parser.parse_args()
    command = tour_explain_command(TOUR.read_text(encoding="utf-8"))
    argv = shlex.split(command)[3:]  # after `python -m minislm`
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "explain.html"
        argv[argv.index("--out") + 1] = str(page)
        subprocess.run([sys.executable, "-m", "minislm", *argv], check=True)
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [args.chromium, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={args.size}",
             f"--screenshot={shot}", f"{page.as_uri()}?{args.query}"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )
        image = Image.open(shot).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        text = PngInfo()
        text.add_text(PICTURE_KEY, command)
        image.save(args.out, optimize=True, pnginfo=text)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB): {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
