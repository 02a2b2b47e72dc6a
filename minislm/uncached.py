"""Writing a big file around the page cache (Linux's O_DIRECT).

`minislm quantize` has just read a whole checkpoint (7.6 GB for Phi-3-mini in
float16), so the page cache is full when it writes its 2.2 GB. A buffered write
must take every page it fills from that cache first, and on the 2-core machines
we measure on that reclaim is what costs: `dd` wrote 2.2 GB at 0.42 GB/s
buffered and at 2.1 GB/s with O_DIRECT, and the write took 4.0 s of a 12.6 s
quantize. O_DIRECT moves the bytes from our memory to the disk without a cached
copy, provided each write starts at an aligned address, at an aligned file
offset, and covers whole blocks. So the bytes go through one aligned buffer,
written whenever it is full; the last block is padded, and the file cut back to
its length. Where O_DIRECT is missing (macOS, Windows) or refused (tmpfs), it
is an ordinary buffered file.
"""

import errno
import os

import numpy as np

if hasattr(os, "O_DIRECT"):  # Linux, which has fcntl too
    import fcntl

ALIGN = 4096          # the alignment O_DIRECT asks of addresses, offsets and lengths (a page covers every disk's)
CHUNK = 8 << 20       # bytes per write: large enough that the disk, not the calls, sets the pace


class UncachedFile:
    """A write-only binary file (`write`, `close`, a context manager) that bypasses the page cache where it can."""

    def __init__(self, path):
        self.length = 0
        self.filled = 0
        self.fd = None
        if hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            except OSError:  # a file system without O_DIRECT (tmpfs answers EINVAL)
                self.fd = None
        if self.fd is None:
            self.file = open(path, "wb")
            return
        self.file = None
        raw = np.empty(CHUNK + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        self.buffer = raw[start:start + CHUNK]  # (CHUNK,) bytes at an aligned address

    def write(self, data) -> None:
        if self.file is not None:
            self.file.write(data)
            return
        data = np.frombuffer(data, np.uint8)
        self.length += len(data)
        while len(data):
            n = min(len(data), CHUNK - self.filled)
            self.buffer[self.filled:self.filled + n] = data[:n]
            self.filled += n
            data = data[n:]
            if self.filled == CHUNK:
                self._flush(CHUNK)

    def _flush(self, nbytes: int) -> None:
        written = 0
        while written < nbytes:  # a write may stop short (a signal); the rest follows, still aligned
            try:
                written += os.write(self.fd, self.buffer[written:nbytes])
            except OSError as e:  # a file system that took the flag at open and refuses it now
                if e.errno != errno.EINVAL or not fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.filled = 0

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            return
        if self.fd is None:
            return
        try:
            if self.filled:
                whole = -(-self.filled // ALIGN) * ALIGN  # whole blocks: zeros after the end ...
                self.buffer[self.filled:whole] = 0
                self._flush(whole)
            os.ftruncate(self.fd, self.length)  # ... which this cuts off
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
