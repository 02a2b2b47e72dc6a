"""Make docs/explain.png: the explorer page of the shipped model, as headless Chromium draws it.

    python tools/explain_screenshot.py [--out docs/explain.png]

Writes the page with `python -m minislm explain`, opens it in Chromium (Debian's
`chromium` package) with a layer and head chosen in the URL, takes a screenshot of
the top of the page, and reduces it to a 64-colour palette PNG so it stays small.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO: But soft, what light through yonder window breaks?"
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
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "explain.html"
        subprocess.run([sys.executable, "-m", "minislm", "explain", PROMPT, "--out", str(page)], check=True)
        shot = Path(tmp) / "shot.png"
        subprocess.run(
            [args.chromium, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={args.size}",
             f"--screenshot={shot}", f"{page.as_uri()}?{args.query}"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )
        image = Image.open(shot).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
