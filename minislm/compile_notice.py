"""Say so when Numba starts compiling minislm's kernels, instead of sitting silent.

The kernels compile on first use and are cached on disk (`cache=True`), so the first
run of a path waits for Numba (a few seconds for float32, ~20 s for int4 on a busy
2-core machine) and later runs do not. Guessing beforehand from cache files gets it
wrong both ways, so we ask Numba itself: it announces every real compilation as a
"numba:compile" event (`numba.core.event`, the start of the event comes before the
slow part) and sends none when a kernel comes from its on-disk cache. One listener
per process prints the notice when the first of minislm's kernels starts compiling,
and never again.
"""

import sys
import threading

from numba.core import event

NOTICE = "minislm: compiling kernels, first run only (seconds to a minute)"
PACKAGE = "minislm."  # the kernels/ folder is installed as minislm.kernels


def is_ours(dispatcher) -> bool:
    """True for a kernel of this package; a user's own Numba code stays unannounced."""
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", None) or ""
    return module.startswith(PACKAGE)


class CompileNotice(event.Listener):
    """Writes NOTICE to `stream` (stderr by default) when one of our kernels starts
    compiling: once in the listener's life, whichever thread compiles."""

    def __init__(self, stream=None):
        self.stream, self.said = stream, False

    def on_start(self, e):
        if not self.said and is_ours(e.data.get("dispatcher")):
            self.said = True  # Numba compiles under its global lock: no race here
            print(NOTICE, file=self.stream or sys.stderr, flush=True)

    def on_end(self, e):
        pass


_first_call = threading.Lock()  # taken for good by the first call: one listener per process


def announce_compilation() -> None:
    """From now on, say NOTICE (once in this process) when a minislm kernel compiles.
    Every load() calls this; only the first call registers the listener."""
    if _first_call.acquire(blocking=False):
        event.register("numba:compile", CompileNotice())
