"""A headless Chromium driven through chromedriver's W3C WebDriver HTTP API, with the
standard library only (urllib + json): enough to load a page, click, and read the DOM.

Debian's packages provide both programs (`apt-get install chromium chromium-driver`).
The flags are those that work as root on a machine without network: no sandbox, no
GPU, and no background connections (which a closed network refuses, slowly).
"""

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from optional import BROWSER_VARIABLE, skip_or_fail

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1300,1700",
]


def find_programs() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) paths, or None for whichever is missing."""
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    return chromium, shutil.which("chromedriver")


class Browser:
    """One chromedriver process and one browser session; use as a context manager."""

    def __init__(self, chromium: str, chromedriver: str):
        self.profile = tempfile.mkdtemp(prefix="minislm-chromium-")
        self.port = free_port()
        self.driver = subprocess.Popen(
            [chromedriver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.wait_until_up()
        options = {"binary": chromium, "args": CHROMIUM_FLAGS + [f"--user-data-dir={self.profile}"]}
        capabilities = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self.call("POST", "/session", capabilities)["sessionId"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.call("DELETE", f"/session/{self.session}")
        finally:
            self.driver.terminate()
            self.driver.wait(timeout=30)
            shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"webdriver {method} {path}: {e.read().decode(errors='replace')[:500]}") from None

    def wait_until_up(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.call("GET", "/status").get("ready"):
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError("chromedriver did not start")

    # ---- what a test does

    def open(self, url: str) -> None:
        self.call("POST", f"/session/{self.session}/url", {"url": url})

    def run(self, script: str, *args):
        """Run JavaScript in the page (a function body: `return ...`)."""
        return self.call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        found = self.call("POST", f"/session/{self.session}/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def click(self, css: str) -> None:
        """A real click through the browser's input pipeline (on an <option>, it selects it)."""
        self.call("POST", f"/session/{self.session}/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str, clear: bool = False) -> None:
        """Keys typed into an element, as a user types them (WebDriver's Element Send Keys;
        "\ue014" is the right arrow, which moves a focused slider one step)."""
        element = self.find(css)
        if clear:
            self.call("POST", f"/session/{self.session}/element/{element}/clear", {})
        self.call("POST", f"/session/{self.session}/element/{element}/value", {"text": text})

    def screenshot(self, path, css: str | None = None) -> None:
        """The visible part of the page, or one element of it, as a PNG file."""
        import base64

        where = f"/element/{self.find(css)}" if css else ""
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("GET", f"/session/{self.session}{where}/screenshot")))

    def attribute(self, css: str, name: str) -> str | None:
        return self.call("GET", f"/session/{self.session}/element/{self.find(css)}/attribute/{name}")

    def wait_for(self, script: str, seconds: float = 20):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.run(script)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied: {script}")


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for a test module, or a skip that says what to install (a
    failure where CI sets MINISLM_REQUIRE_BROWSER=1). Import it into a test module."""
    chromium, chromedriver = find_programs()
    if chromium is None or chromedriver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", chromedriver)) if p is None)
        skip_or_fail(f"{missing} not found (apt-get install chromium chromium-driver)", BROWSER_VARIABLE)
    with Browser(chromium, chromedriver) as b:
        yield b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
