"""minislm/batch.py, the server's scheduler, driven one step at a time.

The rule it must keep: every request's tokens are exactly those it gets when the
scheduler serves it alone, whoever else is decoding, however its prompt is chunked
around their steps. "Alone" is a fresh scheduler holding only that request, and, for
prompts that fit one chunk, the library's own loop (`Model.generate`, which the CLI
runs) as well. Requests here have prompts of different lengths, some longer than a
prefill chunk, and join at different steps; greedy and seeded sampling both.
"""

import numpy as np
import pytest

import minislm
from conftest import FIXTURES
from minislm.batch import Admitted, Busy, Failed, Finished, Request, Scheduler, Token
from minislm.load import BUNDLED_MODEL
from minislm.runtime import sampling_settings

MODELS = {"shipped float32": (BUNDLED_MODEL, None), "shipped int4": (BUNDLED_MODEL, "int4"),
          "gqa int4": (FIXTURES / "gqa", "int4")}
CHUNK = 8  # a small prefill chunk, so that several prompts below take several steps to prefill
CAPACITY = 128

# (prompt length, step it arrives at, max new tokens, sampling): lengths below, at and
# above the chunk, arriving while others prefill or decode.
ARRIVALS = [(5, 0, 14, None), (30, 0, 9, None), (1, 2, 12, 11), (17, 3, 20, None), (8, 5, 6, 12), (45, 6, 10, 13),
            (3, 11, 8, None)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    path, quant = MODELS[request.param]
    return minislm.load(path, quant=quant)


def make_request(model, length, max_new_tokens, seed, n=1, salt=0):
    """Random prompt ids (no stop ids among them); `seed` None is greedy, else sampled."""
    ids = np.random.default_rng(1000 * length + salt).integers(3, 300, length).tolist()
    keywords = {} if seed is None else {"temperature": 0.9, "top_p": 0.95}
    return Request(ids, max_new_tokens, sampling_settings(model, **keywords), seed, n)


def events(request) -> list:
    out = []
    while not request.events.empty():
        out.append(request.events.get_nowait())
    return out


def tokens_of(request, choice=0) -> list[int]:
    return [e.token for e in request.seen if isinstance(e, Token) and e.choice == choice]


def run(scheduler, arrivals: dict[int, list[Request]], max_steps=500):
    """Submit each request at its step, step until all are done; every request's events
    collect in `request.seen`."""
    everyone = [r for rs in arrivals.values() for r in rs]
    for r in everyone:
        r.seen = []
    for step in range(max_steps):
        for r in arrivals.get(step, []):
            scheduler.submit(r)
        scheduler.step()
        for r in everyone:
            r.seen += events(r)
        finished = [r for r in everyone if sum(isinstance(e, (Finished, Failed)) for e in r.seen) == r.n]
        if len(finished) == len(everyone) and step >= max(arrivals):
            return
    raise AssertionError("the scheduler did not finish its requests")


def alone(model, length, max_new_tokens, seed, n=1, batch=4):
    request = make_request(model, length, max_new_tokens, seed, n)
    run(Scheduler(model, CAPACITY, max_batch=batch, prefill_chunk=CHUNK), {0: [request]})
    return request


def test_every_request_gets_exactly_its_tokens_alone(model):
    arrivals = {}
    for length, step, new, seed in ARRIVALS:
        arrivals.setdefault(step, []).append(make_request(model, length, new, seed))
    scheduler = Scheduler(model, CAPACITY, max_batch=3, prefill_chunk=CHUNK)  # 3 slots: some requests wait
    run(scheduler, arrivals)
    together = [r for rs in arrivals.values() for r in rs]
    for request, (length, _, new, seed) in zip(together, ARRIVALS):
        expected = alone(model, length, new, seed)
        assert tokens_of(request) == tokens_of(expected), f"prompt of {length} tokens"
        assert len(tokens_of(request)) == new  # no stop id among these random ids: the length ends them


def test_the_scheduler_alone_gives_what_model_generate_gives(model):
    """The CLI's and the library's loop (minislm/generate.py), for prompts of one chunk
    and, on the packed int4 path, of several (its kernels give a token the same bits
    whatever else shares the forward, so a chunked prefill equals one prefill)."""
    packed = model.weights_format.format == "int4"
    for length, _, new, seed in ARRIVALS:
        if length > CHUNK and not packed:
            continue  # float32: BLAS's GEMM may round a token's rows differently in other company
        request = alone(model, length, new, seed)
        keywords = {} if seed is None else {"temperature": 0.9, "top_p": 0.95, "seed": seed}
        assert tokens_of(request) == list(model.generate(request.ids, new, **keywords)), f"prompt of {length} tokens"


def test_n_samples_share_one_prefill_and_each_is_the_request_with_seed_plus_i(model):
    request = make_request(model, 20, 8, seed=5, n=3)
    scheduler = Scheduler(model, CAPACITY, max_batch=3, prefill_chunk=CHUNK)
    prefills = []
    forward = model.forward
    model.forward = lambda ids, cache, *a, **k: (prefills.append(len(ids)) if len(ids) > 1 else None, forward(ids, cache, *a, **k))[1]
    try:
        run(scheduler, {0: [request]})
    finally:
        del model.forward
    assert prefills == [8, 8, 4]  # the prompt's 20 tokens fed once, in chunks of 8
    samples = [tokens_of(request, i) for i in range(3)]
    for i, sample in enumerate(samples):
        single = make_request(model, 20, 8, seed=5 + i)
        run(Scheduler(model, CAPACITY, prefill_chunk=CHUNK), {0: [single]})
        assert sample == tokens_of(single)
    assert len({tuple(s) for s in samples}) > 1  # different seeds, different samples


def test_greedy_n_samples_are_all_the_greedy_text():
    model = minislm.load(BUNDLED_MODEL)
    request = alone(model, 6, 10, None, n=2)
    assert tokens_of(request, 0) == tokens_of(request, 1) == list(model.generate(request.ids, 10))


# ---------------------------------------------------------------- the queue and the slots


@pytest.fixture(scope="module")
def shipped():
    return minislm.load(BUNDLED_MODEL)


def admission_steps(scheduler, requests: dict, steps=80) -> dict:
    """Step the scheduler; the step at which each request got its slot(s)."""
    admitted = {}
    for step in range(steps):
        scheduler.step()
        assert len({c.slot.index for c in scheduler.requests}) <= scheduler.max_batch
        admitted.update({name: step for name, r in requests.items() if r.choices and name not in admitted})
    return admitted


def test_requests_past_max_batch_wait_and_start_in_arrival_order(shipped):
    scheduler = Scheduler(shipped, CAPACITY, max_batch=1, prefill_chunk=CHUNK)
    requests = {i: make_request(shipped, 4 + i, 3, None) for i in range(4)}
    for r in requests.values():
        scheduler.submit(r)
    admitted = admission_steps(scheduler, requests)
    assert sorted(admitted, key=admitted.get) == [0, 1, 2, 3]
    assert len(set(admitted.values())) == 4  # one at a time: each waited for the one before


def test_a_request_needing_more_slots_than_are_free_waits_and_nobody_overtakes_it(shipped):
    scheduler = Scheduler(shipped, CAPACITY, max_batch=2, prefill_chunk=CHUNK)
    first = make_request(shipped, 5, 6, None)
    pair, third = make_request(shipped, 5, 3, 1, n=2, salt=1), make_request(shipped, 5, 3, None, salt=2)
    scheduler.submit(first)
    scheduler.step()
    scheduler.submit(pair)  # needs both slots, one is `first`'s
    scheduler.submit(third)  # would fit in the free slot, but came later
    admitted = admission_steps(scheduler, {"pair": pair, "third": third})
    assert 0 < admitted["pair"] < admitted["third"]


def test_more_waiting_requests_than_allowed_are_refused(shipped):
    scheduler = Scheduler(shipped, CAPACITY, max_batch=1, max_waiting=2)
    scheduler.submit(make_request(shipped, 3, 2, None))
    scheduler.submit(make_request(shipped, 4, 2, None))
    with pytest.raises(Busy):
        scheduler.submit(make_request(shipped, 5, 2, None))
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(shipped, CAPACITY, max_batch=2).submit(make_request(shipped, 3, 2, None, n=3))


def test_a_long_prompt_prefills_one_chunk_per_step_while_others_decode(shipped):
    """The sequence already decoding gets one token every step, while a 40-token
    prompt is fed 8 tokens at a time: it waits one chunk per token, never the whole prompt."""
    scheduler = Scheduler(shipped, CAPACITY, max_batch=2, prefill_chunk=CHUNK)
    decoding, joining = make_request(shipped, 4, 30, None), make_request(shipped, 40, 5, None, salt=1)
    scheduler.submit(decoding)
    scheduler.step()  # prefilled, first token
    scheduler.submit(joining)
    counts = []
    for _ in range(6):
        scheduler.step()
        counts.append((len(tokens_of_events(decoding)), joining.fed))
    assert [c[0] for c in counts] == [2, 3, 4, 5, 6, 7]  # one token per step
    assert [c[1] for c in counts] == [8, 16, 24, 32, 40, 40]  # one chunk per step


def events_kept(request) -> list:
    request.seen = getattr(request, "seen", []) + events(request)
    return request.seen


def tokens_of_events(request) -> list[int]:
    return [e.token for e in events_kept(request) if isinstance(e, Token)]


def test_a_follow_up_reuses_the_slot_that_holds_its_conversation(shipped):
    scheduler = Scheduler(shipped, CAPACITY, max_batch=3, prefill_chunk=CHUNK)
    first = make_request(shipped, 12, 5, None)
    other = make_request(shipped, 9, 5, None, salt=7)
    run(scheduler, {0: [first, other]})
    follow_up = Request(first.ids + tokens_of(first) + [40, 41], 4, first.settings)
    run(scheduler, {0: [follow_up]})
    # the slot holds the 12 prompt tokens and 4 of the 5 generated (the last was never fed back)
    assert next(e for e in follow_up.seen if isinstance(e, Admitted)).reused == 12 + 4
    assert follow_up.choices[0].stats.prompt_tokens == 1 + 2  # only what is new went through the model


def test_a_cancelled_request_frees_its_slot_and_one_stopped_sample_leaves_its_siblings(shipped):
    scheduler = Scheduler(shipped, CAPACITY, max_batch=2, prefill_chunk=CHUNK)
    long = make_request(shipped, 5, 100, None)
    pair = make_request(shipped, 5, 12, 3, n=2, salt=1)
    scheduler.submit(long)
    scheduler.step()
    scheduler.submit(pair)  # needs both slots: waits for `long`
    scheduler.step()
    assert not pair.choices
    long.cancel()
    scheduler.step()
    assert len(pair.choices) == 2 and not scheduler.requests.get(long.choices[0])
    scheduler.step()
    pair.cancel(0)  # a stop string ended sample 0
    for _ in range(20):
        scheduler.step()
    seen = events_kept(pair)
    assert sum(isinstance(e, Finished) and e.choice == 1 for e in seen) == 1
    assert not any(isinstance(e, Finished) and e.choice == 0 for e in seen)
    assert len([e for e in seen if isinstance(e, Token) and e.choice == 1]) == 12
    assert not scheduler.decoding and not scheduler.requests


def test_a_failing_step_fails_its_requests_and_the_scheduler_goes_on(shipped):
    scheduler = Scheduler(shipped, CAPACITY, max_batch=2, prefill_chunk=CHUNK)
    doomed = make_request(shipped, 4, 10, None)
    scheduler.submit(doomed)
    scheduler.step()

    def broken(*args):
        raise RuntimeError("a bug")

    shipped.decode_step = broken
    try:
        scheduler.step()
    finally:
        del shipped.decode_step
    assert isinstance(events_kept(doomed)[-1], Failed) and not scheduler.decoding
    fine = alone(shipped, 4, 3, None)
    later = make_request(shipped, 4, 3, None)
    run(scheduler, {0: [later]})
    assert tokens_of(later) == tokens_of(fine)


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_schemas_logprobs_and_speculation_in_a_batch_give_what_model_generate_gives(shipped):
    """Per-token extras ride along in the batch: a JSON schema's mask (its own automaton
    per choice) and each token's log-probability are those Model.generate gives the
    same request; a request with a drafter (prompt lookup) decodes alone and still gets
    exactly its tokens, as does the request that arrives behind it."""
    from minislm.runtime import json_grammar, make_drafter

    def request(length, n_new, seed, **extra):
        base = make_request(shipped, length, n_new, seed)
        return Request(base.ids, n_new, base.settings, seed, **extra)

    with_schema = request(6, 24, 5, grammar=lambda: json_grammar(shipped, SCHEMA), top_logprobs=2)
    with_logprobs = request(7, 10, None, top_logprobs=3)
    speculating = request(20, 12, None, drafter=lambda sampler: make_drafter(shipped, sampler, CAPACITY, "lookup"))
    behind = request(4, 6, 9)
    run(Scheduler(shipped, CAPACITY, max_batch=4, prefill_chunk=CHUNK),
        {0: [with_schema, with_logprobs], 1: [speculating], 2: [behind]})

    schema_ids = list(shipped.generate(with_schema.ids, 24, temperature=0.9, top_p=0.95, seed=5, json_schema=SCHEMA,
                                       logprobs=2))
    assert tokens_of(with_schema) == [e.token for e in schema_ids]
    assert [(e.token, e.logprob) for e in with_schema.choices[0].logprobs.entries] == \
           [(e.token, e.logprob) for e in schema_ids]
    greedy = list(shipped.generate(with_logprobs.ids, 10, temperature=0, logprobs=3))
    assert [(e.token, e.logprob, e.top) for e in with_logprobs.choices[0].logprobs.entries] == \
           [(e.token, e.logprob, e.top) for e in greedy]
    assert tokens_of(speculating) == list(shipped.generate(speculating.ids, 12, temperature=0))
    assert tokens_of(speculating) == list(shipped.generate(speculating.ids, 12, temperature=0, speculate="lookup"))
    assert speculating.choices[0].stats.drafted_tokens >= speculating.choices[0].stats.accepted_tokens
    assert tokens_of(behind) == tokens_of(alone(shipped, 4, 6, 9))


def test_the_scheduler_thread_uses_the_kernel_threads_of_the_thread_that_starts_it(shipped):
    """`serve --threads 1` sets Numba's count in the main thread; Numba keeps it per
    thread, so the scheduler's own thread must be given it (else it takes every core)."""
    import numba

    seen = []
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        scheduler = Scheduler(shipped, CAPACITY, max_batch=1)
        step = scheduler.step

        def watched_step():
            seen.append(numba.get_num_threads())
            step()

        scheduler.step = watched_step
        scheduler.start()
        request = make_request(shipped, 4, 3, None)
        scheduler.submit(request)
        while not any(isinstance(e, (Finished, Failed)) for e in [request.events.get(timeout=60)]):
            pass
        scheduler.stop()
    finally:
        numba.set_num_threads(before)
    assert seen and set(seen) == {1}
