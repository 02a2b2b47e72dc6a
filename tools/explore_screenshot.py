"""Make docs/explore-*.png: the live explorer of docs/tour.md section 7, driven as a learner drives it.

    python tools/explore_screenshot.py [--out-dir docs]

Starts `python -m minislm explore` (three times: with the shipped model's float32 KV
cache, with --quant int4, then with --kv-cache int8), opens it in headless Chromium
through tests/browser.py's WebDriver client, and does what the tour describes: types
the tour's prompt, presses "next token" five times, moves the temperature and top-p
sliders, opens attention's arithmetic for one query and head; then, on the int4
explorer, a prompt that repeats itself and eight speculative steps with prompt
lookup; then, on the int8 explorer, twenty tokens. Each picture is one section of the
page, reduced to a 64-colour palette PNG; its text field `minislm-scenario` says what
was done, so a reader can do it again.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import Browser, find_programs  # noqa: E402  (the suite's standard-library WebDriver client)

PROMPT = "To be, or not to"
COPYING = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
           "ROMEO:\nBut soft, what light")
SCENARIO_KEY = "minislm-scenario"


class Explorer:
    """A `python -m minislm explore` process and its address."""

    def __init__(self, *flags: str):
        self.process = subprocess.Popen([sys.executable, "-m", "minislm", "explore", *flags], stderr=subprocess.PIPE,
                                        text=True)
        for line in self.process.stderr:
            match = re.search(r"at (http://\S+/)", line)
            if match:
                self.url = match.group(1)
                return
        raise SystemExit("the explorer did not start")

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def act(browser, action) -> None:
    """Do something on the page and wait until every request it caused has been answered."""
    before = browser.run("return +(document.body.dataset.requests || 0)")
    action()
    browser.wait_for(f"return +document.body.dataset.requests > {before} && document.body.dataset.busy === 'false'", 120)


def save(browser, css: str, path: Path, scenario: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        browser.run(f"document.querySelector('{css}').scrollIntoView()")
        browser.screenshot(shot, css)
        image = Image.open(shot).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        text = PngInfo()
        text.add_text(SCENARIO_KEY, scenario)
        image.save(path, optimize=True, pnginfo=text)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {scenario}")


def start(browser, url: str, prompt: str = PROMPT) -> None:
    browser.open(url)
    browser.wait_for("return document.body.dataset.ready === '1'", 120)
    act(browser, lambda: (browser.type("#prompt", prompt, clear=True), browser.click("#run")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "docs"))
    args = parser.parse_args()
    out = Path(args.out_dir)
    chromium, chromedriver = find_programs()
    if chromium is None or chromedriver is None:
        raise SystemExit("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    with Browser(chromium, chromedriver) as browser:
        explorer = Explorer()
        try:
            start(browser, explorer.url)
            for _ in range(5):
                act(browser, lambda: browser.click("#next"))
            act(browser, lambda: browser.type("#temperature", "\ue014" * 16))  # 0 -> 0.8
            act(browser, lambda: browser.type("#top-p", "\ue012" * 2))  # 1 -> 0.9
            done = f"python -m minislm explore; prompt {PROMPT!r}; next token x5; temperature 0.8, top-p 0.9"
            save(browser, "#sampling-section", out / "explore-sampling.png", done)
            browser.click("#tokens .tok[data-pos='5']")
            act(browser, lambda: browser.click("#layer option[value='2']"))
            browser.click("#head option[value='3']")
            act(browser, lambda: browser.click("#open-arithmetic"))
            save(browser, "#arithmetic", out / "explore-arithmetic.png", done + "; position 5, layer 2, head 3, arithmetic")
        finally:
            explorer.close()
        explorer = Explorer("--quant", "int4")  # int4: the shipped model copies a little more there
        try:
            start(browser, explorer.url, COPYING)
            act(browser, lambda: browser.type("#repetition-penalty", "\ue012" * 4))  # 1.2 -> 1
            browser.click("#speculate")
            for _ in range(8):
                act(browser, lambda: browser.click("#spec-step"))
            save(browser, "#speculative", out / "explore-speculative.png",
                 f"python -m minislm explore --quant int4; prompt {COPYING!r}; repetition penalty 1; "
                 "speculative decoding (prompt lookup), speculative step x8")
        finally:
            explorer.close()
        explorer = Explorer("--kv-cache", "int8")
        try:
            start(browser, explorer.url)
            browser.type("#step-count", "20", clear=True)
            act(browser, lambda: browser.click("#next-n"))
            save(browser, "#kv-section", out / "explore-cache.png",
                 f"python -m minislm explore --kv-cache int8; prompt {PROMPT!r}; next 20 tokens")
        finally:
            explorer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
