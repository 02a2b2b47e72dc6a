"""minislm/uncached.py: a file written around the page cache holds exactly the bytes
written, whatever their lengths, and so does the buffered fallback."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minislm import uncached
from minislm.uncached import UncachedFile

pieces = st.lists(st.binary(min_size=0, max_size=3 * 4096 + 5), max_size=8)


def write_pieces(path, parts) -> bytes:
    with UncachedFile(path) as f:
        for part in parts:
            f.write(part)
    return path.read_bytes()


@settings(max_examples=40, deadline=None)
@given(parts=pieces)
def test_the_file_holds_exactly_the_bytes_written(tmp_path_factory, parts):
    """Lengths that are not whole blocks, pieces that straddle the buffer's end (two
    blocks here), an empty file: the file is their concatenation, nothing more."""
    old = uncached.CHUNK
    uncached.CHUNK = 2 * uncached.ALIGN
    try:
        path = tmp_path_factory.mktemp("uncached") / "out.bin"
        assert write_pieces(path, parts) == b"".join(parts)
    finally:
        uncached.CHUNK = old


def test_numpy_arrays_and_memoryviews_are_written_as_their_bytes(tmp_path):
    a = np.arange(5000, dtype=np.float32)
    b = np.arange(7, dtype=np.uint16)
    got = write_pieces(tmp_path / "a.bin", [memoryview(a).cast("B"), memoryview(b).cast("B"), b"tail"])
    assert got == a.tobytes() + b.tobytes() + b"tail"


def test_without_o_direct_it_is_an_ordinary_file(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    f = UncachedFile(tmp_path / "b.bin")
    assert f.fd is None and f.file is not None
    f.write(b"abc" * 3000)
    f.close()
    assert (tmp_path / "b.bin").read_bytes() == b"abc" * 3000


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's; elsewhere the buffered file is the only path")
def test_a_file_system_that_refuses_o_direct_gets_the_buffered_file(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    assert write_pieces(tmp_path / "c.bin", [b"x" * 5000, b"y"]) == b"x" * 5000 + b"y"


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's; elsewhere the buffered file is the only path")
def test_a_write_refused_after_open_turns_the_flag_off_and_goes_on(tmp_path, monkeypatch):
    real_write = os.write
    refused = []

    def refusing(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(22, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    data = bytes(range(256)) * 100
    assert write_pieces(tmp_path / "d.bin", [data]) == data
    assert refused  # the first write met the flag, and the file is still whole
