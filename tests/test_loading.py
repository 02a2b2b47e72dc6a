"""Loading costs memory it should not: mapped pages released, a quantized folder at its own size.

Issue 13, goal 4. Timings live in the bench (`python -m minislm bench`: the
quantize-at-load rows, the `minislm quantize` job and the prequantized folder's
row); here, the memory behaviour that makes them possible, measured from
/proc/self/status (Linux; skipped elsewhere):

- a converted tensor's file pages leave the process's RSS (`streaming.release`),
  so quantizing never holds the whole checkpoint resident next to its result;
- a `minislm quantize` folder is memory-mapped and used in place: loading it and
  generating a first token grows RSS by about its weight bytes, nothing more.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import minislm
from minislm.bench.random_checkpoint import PHI3_TINY, write_random_checkpoint
from minislm.quantize import save_quantized
from minislm.streaming import release
from conftest import FIXTURES

STATUS = Path("/proc/self/status")
pytestmark = pytest.mark.skipif(not STATUS.is_file(), reason="needs Linux's /proc/self/status")

# Weights dominate this model's RSS growth: 35 MB of int4 against a few MB of
# activations, KV cache and Python objects. The bound leaves ~3.5 MB for those;
# the figure for Phi-3-mini is 1.04x.
RSS_PER_WEIGHT_BYTE = 1.10
MIDSIZE = dict(PHI3_TINY, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
               num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)


def rss_file_bytes() -> int:
    """Resident pages of mapped files in this process (RssFile, Linux >= 4.5)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_release_drops_a_mapped_arrays_pages_from_rss(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(np.arange(16 << 20, dtype=np.float32).tobytes())  # 64 MiB
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    before = rss_file_bytes()
    assert mapped.sum(dtype=np.float64) > 0  # every page read
    touched = rss_file_bytes()
    release(mapped)
    after = rss_file_bytes()
    assert touched - before >= 60 << 20
    assert after - before <= 1 << 20
    assert mapped[12345] == 12345  # still readable: the pages come back from the page cache


def test_release_leaves_ordinary_arrays_alone():
    a = np.ones(1 << 20, np.float32)
    release(a)
    assert a.sum() == 1 << 20


def test_prequantized_folder_costs_its_weight_bytes_of_rss(tmp_path):
    write_random_checkpoint(tmp_path / "f16", MIDSIZE)
    quantized = minislm.load(tmp_path / "f16", quant="int4")
    save_quantized(tmp_path / "f16", tmp_path / "int4", quantized.weights, quantized.packing)
    small = minislm.load(FIXTURES / "gqa", quant="int4")
    save_quantized(FIXTURES / "gqa", tmp_path / "small", small.weights, small.packing)
    # A fresh process: warm the kernels on another int4 folder (compiling is not the
    # model's memory), then load the folder and produce one token.
    script = textwrap.dedent(f"""
        import json, numpy as np, minislm
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        list(minislm.load({str(tmp_path / "small")!r}).generate(np.arange(8), 2))
        before = rss()
        model = minislm.load({str(tmp_path / "int4")!r})
        first = next(model.generate(np.arange(3, 11), 1))
        after = rss()
        weights = sum(w.nbytes for w in model.weights.values())
        print(json.dumps({{"grew": after - before, "weights": weights}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["weights"] > 30e6
    assert 0.5 * figures["weights"] <= figures["grew"] <= RSS_PER_WEIGHT_BYTE * figures["weights"], figures
