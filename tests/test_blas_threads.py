"""The thread configuration a forward pass runs under (minislm.runtime.blas_threads).

Numba's threads and BLAS's threads share the cores; both spin while they wait, so a
pass that wakes both stalls whenever one thread has lost its core. The fix relies on
this configuration: a short pass (a decode step, a chat's new turn, which is what the
server's follow-up requests run) keeps BLAS on the calling thread while Numba keeps
all of its threads; a long prefill gives BLAS its threads back. What it buys is
measured by tools/bench_serve.py (docs/serve.md), not here.
"""

import numba
import pytest
from threadpoolctl import threadpool_info

import minislm
from minislm.load import BUNDLED_MODEL
from minislm.runtime import BLAS_THREADS_FROM_TOKENS, generate_ids, make_sampler, sampling_settings
from minislm.model import NoRecorder


def blas_threads_now() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


class ThreadWatch(NoRecorder):
    """Notes, at the start of every forward pass, how many tokens it runs and the thread
    counts in force: BLAS's (threadpoolctl) and Numba's."""

    def __init__(self):
        self.passes = []

    def begin(self, positions):
        self.passes.append((len(positions), blas_threads_now(), numba.get_num_threads()))


@pytest.fixture(scope="module")
def model():
    return minislm.load(BUNDLED_MODEL)


def test_short_passes_run_blas_on_one_thread_and_long_ones_on_all(model):
    if not blas_threads_now():
        pytest.skip("no BLAS library that threadpoolctl can control (e.g. Apple's Accelerate)")
    outside, numba_threads = blas_threads_now(), numba.get_num_threads()
    watch = ThreadWatch()
    ids = model.tokenizer.encode("ROMEO: " * 40)  # more than BLAS_THREADS_FROM_TOKENS
    assert len(ids) >= BLAS_THREADS_FROM_TOKENS
    cache = model.new_cache(len(ids) + 40)
    model.forward(ids, cache, watch)  # a fresh prefill
    model.forward(model.tokenizer.encode(" And then, good sir?", add_bos=False), cache, watch)  # a follow-up turn
    sampler = make_sampler(model, sampling_settings(model), seed=0)
    list(generate_ids(model, [ids[0]], 5, sampler, cache=cache, history=ids, trace=watch))
    tokens = [n for n, _, _ in watch.passes]
    assert tokens[0] == len(ids) and 1 < tokens[1] < BLAS_THREADS_FROM_TOKENS and tokens[3:] == [1] * 4
    assert watch.passes[0][1] == outside  # the long prefill: BLAS's own thread count
    assert all(blas == [1] * len(outside) for _, blas, _ in watch.passes[1:])  # follow-up, decode
    assert all(n == numba_threads for _, _, n in watch.passes)  # Numba keeps all its threads
    assert blas_threads_now() == outside  # restored after each pass
