"""Batched decoding's rule, on the model: a decode step of several sequences gives each
one exactly the logits it gets alone, bit for bit.

`Model.decode_step` runs the next token of B sequences through one forward
(`model.forward_batch`), each with its own KV cache at its own position. The reference
is the same sequence decoded by itself, one `Model.forward` per token, as
`minislm generate` runs it. The sequences have prompts of different lengths and join
and leave at different steps, so the batch around each one keeps changing. Bit
equality is the claim, since the server's greedy (and seeded) output must not depend on
who else is being served: float32 and bf16 weights are where a plain matmul would break
it (BLAS's GEMM for several rows sums in another order than its GEMV for one).
"""

import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from minislm.load import BUNDLED_MODEL

MODELS = {
    "shipped float32": (BUNDLED_MODEL, None),
    "shipped bf16": (BUNDLED_MODEL, "bf16"),
    "shipped int4": (BUNDLED_MODEL, "int4"),
    "gqa int4": (FIXTURES / "gqa", "int4"),
    "moe float32": (FIXTURES / "moe", None),  # experts see different numbers of rows
    "moe int4": (FIXTURES / "moe", "int4"),
    "phi3small float32": (FIXTURES / "phi3small", None),  # block-sparse attention per sequence
    "sliding float32": (FIXTURES / "sliding", None),  # a window of 8 positions
    "longrope float32": (FIXTURES / "longrope", None),  # crosses its switch at 64 positions
    "phi4_mini bf16": (FIXTURES / "phi4_mini", "bf16"),  # tied embedding as the lm_head
}

# (prompt length, step at which it joins, tokens it decodes): different lengths, joining
# and leaving at different steps, so each sequence shares steps with changing company.
SEQUENCES = [(5, 0, 12), (17, 0, 6), (1, 2, 9), (40, 3, 14), (9, 7, 5), (57, 1, 10)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    path, quant = MODELS[request.param]
    return minislm.load(path, quant=quant)


def prompt(model, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, length)


def decode_alone(model, ids, steps: int) -> list[np.ndarray]:
    """The logits before each greedy token, one sequence by itself: prefill, then one
    `Model.forward` of one token per step, as minislm/generate.py runs it."""
    cache = model.new_cache(len(ids) + steps)
    logits = [model.lm_head(model.forward(ids, cache)[-1:])[0]]
    for _ in range(steps - 1):
        token = int(np.argmax(logits[-1]))
        logits.append(model.lm_head(model.forward(np.array([token]), cache))[0])
    return logits


def decode_together(model, sequences) -> dict[int, list[np.ndarray]]:
    """The same sequences, each prefilled alone when it joins, then decoded in shared
    `decode_step`s with whoever else is active."""
    active, logits = {}, {}  # sequence index -> cache
    step = 0
    while len(logits) < len(sequences) or active:
        for n, (ids, joins, steps) in enumerate(sequences):
            if joins == step:
                cache = model.new_cache(len(ids) + steps)
                logits[n] = [model.lm_head(model.forward(ids, cache)[-1:])[0]]
                active[n] = cache
        done = [n for n in active if len(logits[n]) == sequences[n][2]]
        for n in done:
            del active[n]
        if active:
            order = sorted(active)
            tokens = np.array([int(np.argmax(logits[n][-1])) for n in order])
            rows = model.decode_step(tokens, [active[n] for n in order])  # (B, V)
            for n, row in zip(order, rows):
                logits[n].append(row)
        step += 1
    return logits


def test_each_sequence_in_a_batch_gets_the_logits_it_gets_alone(model):
    sequences = [(prompt(model, length, seed), joins, steps) for seed, (length, joins, steps) in enumerate(SEQUENCES)]
    together = decode_together(model, sequences)
    for n, (ids, _, steps) in enumerate(sequences):
        alone = decode_alone(model, ids, steps)
        assert len(together[n]) == steps
        for step, (a, b) in enumerate(zip(alone, together[n])):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"sequence {n}, step {step}"


def test_a_sequence_crossing_the_longrope_switch_in_a_batch_runs_its_sequence_again():
    """longrope switches to its long factors past 64 positions: the sequence holding 64
    crosses in this step (it is re-run alone, as `forward` requires), the one holding 10
    does not."""
    model = minislm.load(FIXTURES / "longrope")
    caches, ids = [model.new_cache(80), model.new_cache(80)], [prompt(model, 64, 1), prompt(model, 10, 2)]
    for cache, p in zip(caches, ids):
        model.forward(p, cache)
    rows = model.decode_step(np.array([3, 4]), caches)
    assert caches[0].rope_long and not caches[1].rope_long
    assert [c.length for c in caches] == [65, 11]
    for b, (p, token) in enumerate(zip(ids, (3, 4))):
        alone = model.new_cache(80)
        model.forward(p, alone)
        assert np.array_equal(model.lm_head(model.forward(np.array([token]), alone))[0], rows[b])


def test_decode_step_refuses_a_token_count_that_does_not_match_the_caches():
    model = minislm.load(BUNDLED_MODEL)
    with pytest.raises(ValueError, match="one new token per sequence"):
        model.decode_step(np.array([1, 2]), [model.new_cache(4)])
