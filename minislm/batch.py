"""Continuous batching: the requests a server holds decode together, one forward per step.

A decode step reads every weight once to make one token, so on a CPU it is bound by
memory, not arithmetic. Several sequences that step together share that one read:
B tokens for about the price of one, as long as the arithmetic keeps up. The loop:

    waiting (first come, first served) --a free slot--> prefilling --> decoding --> done
                                                        one chunk per step   one token per step

    each step:  admit waiting requests into free slots (a slot is a KV cache)
                one decode step over every decoding sequence (Model.decode_step)
                one chunk of the oldest prompt still prefilling
                each new token goes to its request's queue; finished sequences free their slot

A request joins between two steps and leaves as soon as it is done (continuous
batching: vLLM, llama-server's slots). A long prompt is fed in chunks, one per step,
so the sequences already decoding wait at most one chunk's time for each token
instead of the whole prompt's. At most `max_batch` sequences hold a slot; later
requests wait, in the order they came, and past `max_waiting` they are refused.

Every sequence follows the one generation policy (minislm/runtime.py): its own
sampler from `make_sampler` (its own seed), the stop ids of `stop_ids`, the stop rule
of `generate.stop_reason`, the prefix its slot already caches (`reuse_cached_prefix`).
And a sequence's tokens do not depend on who shares its steps: `Model.decode_step`
gives each row exactly the logits it gets alone (see `runtime.decode_matrix`).

`n > 1` (several samples of one prompt) prefills the prompt once, in one slot, copies
that cache into n - 1 more slots, and then decodes n sequences, choice i sampling with
seed + i: what n separate requests with seeds seed, seed + 1, ... would get.

A request may also ask for what minislm/generate.py's loop does per token: a JSON
schema's mask and each token's log-probability (`generate.choose`, per choice), which
batch like anything else. Speculative decoding does not: its step verifies several
guessed tokens of one sequence in one forward, which is its own way of sharing a weight
read. A request with a drafter therefore decodes alone, through `runtime.generate_ids`:
it waits until the running sequences are done, and the requests behind it wait for it.

A request with pictures or sound (Phi-4-multimodal, Phi-3-vision) decodes alone the
same way: its prompt holds placeholder ids (< 0) whose vectors (`features`, or
`encode()` run here when its turn comes) the decoder puts in their place, and
Phi-4-multimodal runs it under the LoRA adapter its media choose (`adapter`: "vision"
or "speech"), other weights than the batch's. A slot remembers the adapter its cache
was computed under, and a request under another one reuses nothing from it: every
cached key and value would be another model's.

The scheduler runs in its own thread (`start`), or by hand, one `step()` at a time
(the tests do that, to make requests join at chosen steps).
"""

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .cache import KVCache, available_memory_bytes
from .errors import MinislmError
from .finite import check_logits
from .generate import GenerationStats, choose, stop_reason
from .kernels import get_threads, set_threads
from .logprobs import Logprobs
from .runtime import generate_ids, make_sampler, reuse_cached_prefix, stop_ids
from .sampling import Sampler, SamplingSettings

# Prompt tokens fed per step while other sequences decode: each of their tokens waits
# at most one chunk's prefill. Smaller chunks interrupt less and prefill less
# efficiently (docs/serve.md has the figures).
PREFILL_CHUNK = 64


class Busy(Exception):
    """More requests wait than the scheduler accepts."""


# What a request's queue receives, in order: Admitted once, then Token and Finished
# events of its choices (interleaved when n > 1), or Failed instead of the rest.


@dataclass(frozen=True)
class Admitted:
    reused: int  # prompt tokens its slot already held


@dataclass(frozen=True)
class Token:
    choice: int
    token: int


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "eos", "length" or "context", as GenerationStats.stop_reason


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass
class Slot:
    """One KV cache. It keeps what it holds after its sequence ends, for the next
    request that begins with the same tokens (a chat follow-up)."""

    index: int
    cache: KVCache
    last_used: int = 0
    adapter: str | None = None  # the LoRA adapter its cached keys and values were computed under


@dataclass(eq=False)  # each one is itself: a dict key
class Choice:
    """One sequence: a request's only one, or one of its n samples."""

    index: int
    sampler: Sampler
    history: list[int]  # every id so far, for the repetition penalty
    stats: GenerationStats = field(default_factory=GenerationStats)
    slot: Slot | None = None
    next_token: int | None = None  # fed in the next decode step
    done: bool = False
    grammar: object = None  # its own JSON-schema automaton (minislm/grammar.py): the state is per sequence
    logprobs: Logprobs | None = None  # its tokens' log-probabilities, when the request asks for them


class Request:
    """A tokenized prompt and how to continue it; `events` is where its tokens arrive.

    `cancel()` may be called from any thread (a client that left, a stop string found):
    the scheduler drops the request between two steps.
    """

    def __init__(self, ids, max_new_tokens: int, settings: SamplingSettings, seed: int | None = None, n: int = 1,
                 grammar=None, top_logprobs: int | None = None, drafter=None, num_draft: int = 4,
                 features=None, encode=None, adapter: str | None = None):
        """`grammar`: makes a fresh JSON-schema automaton (one per choice); `top_logprobs`:
        record each token's log-probability and that many alternatives (None: nothing);
        `drafter`: makes the guesser of speculative decoding from the choice's sampler
        (`runtime.make_drafter`): then the request decodes alone (n must be 1).
        `features` (k, D): the vectors of the prompt's k placeholders (pictures, sounds),
        or `encode`, which makes them on the scheduler's thread when the request's turn
        comes; `adapter`: the model's LoRA adapter they call for. Such a request decodes
        alone too."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        media = features is not None or encode is not None
        if (drafter is not None or media) and n != 1:
            raise ValueError(f"speculative decoding and media follow one sequence; n must be 1, got {n}")
        if adapter is not None and not media:
            raise ValueError("an adapter is chosen by a prompt's pictures or sounds: pass their features")
        self.features = features
        self.encode = encode
        self.adapter = adapter
        self.grammar = grammar
        self.top_logprobs = top_logprobs
        self.drafter = drafter
        self.num_draft = num_draft
        self.ids = [int(t) for t in ids]
        self.max_new_tokens = max_new_tokens
        self.settings = settings
        self.seed = seed
        self.n = n
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()  # the whole request
        self.stopped: set[int] = set()  # single choices (a stop string ends one sample, not its siblings)
        self.choices: list[Choice] = []
        self.reused = 0  # prompt tokens its slot already held
        self.fed = 0  # prompt tokens in the prefill slot's cache so far

    @property
    def alone(self) -> bool:
        """Speculative decoding, or media: this request decodes with nobody else."""
        return self.drafter is not None or self.features is not None or self.encode is not None

    def cancel(self, choice: int | None = None) -> None:
        """Stop generating for every choice, or for one."""
        if choice is None:
            self.cancelled.set()
        else:
            self.stopped.add(choice)

    def seed_of(self, choice: int) -> int | None:
        """Choice i samples with seed + i; no seed (or -1) is fresh entropy for each."""
        return self.seed if self.seed in (None, -1) else self.seed + choice


class Scheduler:
    """The model, `max_batch` slots of `capacity` positions each, and the queue in front."""

    def __init__(self, model, capacity: int, max_batch: int = 4, max_waiting: int = 64,
                 prefill_chunk: int = PREFILL_CHUNK):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.model = model
        self.capacity = capacity
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.stop_ids = stop_ids(model)
        check_slots_fit(model, capacity, max_batch)
        self.slots = [Slot(i, model.new_cache(capacity)) for i in range(max_batch)]
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()  # admitted, prompt not all fed yet (oldest first)
        self.decoding: list[Choice] = []
        self.alone: Request | None = None  # admitted to decode by itself (speculative decoding)
        self.requests: dict[Choice, Request] = {}
        self.adapted = {None: model}  # the model under each LoRA adapter a request asked for
        self.clock = itertools.count(1)  # for least-recently-used slots
        self.condition = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # ------------------------------------------------------------ from other threads

    def submit(self, request: Request) -> None:
        """Queue a request whose prompt and max_new_tokens fit the slots' capacity."""
        if request.n > self.max_batch:
            raise ValueError(f"n = {request.n} samples need as many slots; there are {self.max_batch} (max_batch)")
        with self.condition:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are waiting for the model")
            self.waiting.append(request)
            self.condition.notify_all()

    def start(self) -> None:
        """Step in a thread of its own, with the kernel threads of the thread that starts
        it (`serve --threads`): Numba keeps that count per thread, and a new thread would
        start with every core."""
        self.thread = threading.Thread(target=self.run, args=(get_threads(),), name="minislm-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            self.condition.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def run(self, threads: int | None = None) -> None:
        """Step while there is work; sleep until a request comes (or is cancelled)."""
        if threads is not None:
            set_threads(threads)
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self.stopping or self.has_work())
                if self.stopping:
                    return
            self.step()

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding or self.alone)

    # ------------------------------------------------------------ the step

    def step(self) -> None:
        """Admit, decode one token for every decoding sequence, feed one prompt chunk."""
        self.drop_cancelled()
        self.admit()
        if self.alone is not None:
            self.guarded(self.decode_alone, self.alone)
            return
        if self.decoding:
            self.guarded(self.decode, list(self.decoding))
        if self.prefilling:
            self.guarded(self.prefill, self.prefilling[0])

    def guarded(self, work, arg) -> None:
        """Run `work`; if it raises (a damaged model's NaN logits, a bug), the requests it
        touched fail with that error and everyone else carries on."""
        try:
            work(arg)
        except Exception as error:  # noqa: BLE001 - handed to the request's thread, which reports it
            touched = {self.requests.get(c) for c in arg} if isinstance(arg, list) else {arg}
            for request in touched - {None}:
                request.events.put(Failed(error))
                self.release(request)

    def drop_cancelled(self) -> None:
        with self.condition:
            for request in [r for r in self.waiting if r.cancelled.is_set()]:
                self.waiting.remove(request)
        for request in {r for r in [*self.prefilling, *self.requests.values()] if r.cancelled.is_set()}:
            self.release(request)
        for choice in [c for c in self.decoding if c.index in self.requests[c].stopped]:
            self.retire(choice)

    def admit(self) -> None:
        """Give waiting requests slots, first come first served: one that needs more free
        slots than there are (n > 1) waits, and so does everyone behind it."""
        while True:
            with self.condition:
                free = [slot for slot in self.slots if not self.in_use(slot)]
                if not self.waiting or len(free) < self.waiting[0].n or self.alone is not None:
                    return
                if self.waiting[0].alone and self.requests:  # it waits until the others are done
                    return
                request = self.waiting.popleft()
            if self.encoded(request):
                self.start_request(request, free)

    def encoded(self, request: Request) -> bool:
        """Run a media request's encoders, here on the model's thread, where Numba's
        kernels run (its threading layer need not take parallel calls from two threads),
        now that the request has the model to itself. False if they failed: the request
        is told so and dropped."""
        if request.features is None and request.encode is not None:
            try:
                request.features = request.encode()
            except Exception as error:  # noqa: BLE001 - handed to the request's thread, which reports it
                request.events.put(Failed(error))
                return False
        return True

    def in_use(self, slot: Slot) -> bool:
        return any(c.slot is slot for c in self.requests)

    def start_request(self, request: Request, free: list[Slot]) -> None:
        """The free slot caching the longest start of the prompt prefills it (the least
        recently used among equals, so recent conversations stay for their follow-ups).
        Only a cache computed under the request's adapter counts: another one starts over."""
        ids = np.asarray(request.ids)

        def shared(slot: Slot) -> int:
            return slot.cache.shared_prefix(ids, request.features) if slot.adapter == request.adapter else 0

        best = max(free, key=lambda s: (shared(s), -s.last_used))
        others = sorted((s for s in free if s is not best), key=lambda s: s.last_used)[: request.n - 1]
        if best.adapter != request.adapter:
            best.cache.truncate(0)
        request.reused = reuse_cached_prefix(best.cache, ids, request.features)
        request.fed = request.reused
        for i, slot in enumerate([best, *others]):
            slot.adapter = request.adapter
            choice = Choice(i, make_sampler(self.model, request.settings, request.seed_of(i)), list(request.ids), slot=slot,
                            grammar=request.grammar() if request.grammar is not None else None,
                            logprobs=Logprobs(request.top_logprobs) if request.top_logprobs is not None else None)
            choice.stats.prompt_tokens = len(request.ids) - request.reused
            slot.last_used = next(self.clock)
            request.choices.append(choice)
            self.requests[choice] = request
        if request.alone:
            self.alone = request
        else:
            self.prefilling.append(request)
        request.events.put(Admitted(request.reused))

    def prefill(self, request: Request) -> None:
        """Feed the next chunk of the prompt into the first choice's slot. After the
        last chunk, the others copy that cache and every choice samples its first token."""
        first = request.choices[0]
        chunk = request.ids[request.fed : request.fed + self.prefill_chunk]
        start = time.perf_counter()
        hidden = self.model.forward(np.asarray(chunk, dtype=np.int64), first.slot.cache)
        request.fed += len(chunk)
        if request.fed < len(request.ids):
            first.stats.prefill_seconds += time.perf_counter() - start
            return
        logits = self.model.lm_head(hidden[-1:])[0]  # (V,) for the prompt's last position
        for choice in request.choices[1:]:
            choice.slot.cache.copy_from(first.slot.cache)
        elapsed = time.perf_counter() - start
        self.prefilling.remove(request)
        for choice in request.choices:
            choice.stats.prefill_seconds = first.stats.prefill_seconds + elapsed
            self.decoding.append(choice)
            self.take_token(choice, logits)

    def decode(self, choices: list[Choice]) -> None:
        """One forward over the next token of every decoding sequence."""
        start = time.perf_counter()
        logits = self.model.decode_step(np.array([c.next_token for c in choices]), [c.slot.cache for c in choices])
        elapsed = time.perf_counter() - start
        for choice, row in zip(choices, logits):
            choice.stats.decode_seconds += elapsed
            self.take_token(choice, row)

    def take_token(self, choice: Choice, logits: np.ndarray) -> None:
        """Sample the choice's next token, hand it over, and end the sequence if the
        policy says so (as minislm/generate.py's loop does, token for token)."""
        if not np.isfinite(logits).all():  # a damaged checkpoint: say where (minislm/finite.py)
            check_logits(self.model, logits, choice.history)
        request = self.requests[choice]
        token = choose(choice.sampler, logits, choice.history, choice.grammar, choice.logprobs)
        choice.history.append(token)
        choice.stats.generated_tokens += 1
        request.events.put(Token(choice.index, token))
        limit = min(self.model.config.max_position_embeddings, choice.slot.cache.capacity)
        reason = stop_reason(token, choice.stats.generated_tokens, request.max_new_tokens, self.stop_ids,
                             choice.slot.cache.length, limit)
        if reason:
            choice.stats.stop_reason = reason
            request.events.put(Finished(choice.index, reason))
            self.retire(choice)
        else:
            choice.next_token = token

    def decode_alone(self, request: Request) -> None:
        """A speculative or media request, start to end: the one loop of
        `runtime.generate_ids` (with its drafter, its adapter, the vectors of the
        placeholders its slot does not hold yet), on its slot's cache, its tokens handed
        over as they come. Between tokens it looks for a cancel; nobody else runs meanwhile."""
        choice = request.choices[0]
        features = request.features
        if features is not None:  # the cached placeholders' vectors are in the cache already
            features = features[choice.slot.cache.placeholders(request.reused):]
        tokens = generate_ids(self.model_for(request.adapter), request.ids[request.reused:], request.max_new_tokens,
                              choice.sampler, cache=choice.slot.cache, history=request.ids[:request.reused],
                              stats=choice.stats, image_features=features, grammar=choice.grammar,
                              logprobs=choice.logprobs, num_draft=request.num_draft,
                              drafter=request.drafter(choice.sampler) if request.drafter is not None else None)
        try:
            for token in tokens:
                choice.history.append(token)
                request.events.put(Token(0, token))
                if request.cancelled.is_set() or 0 in request.stopped:
                    break
            else:
                request.events.put(Finished(0, choice.stats.stop_reason))
        finally:
            tokens.close()
            self.alone = None
            self.retire(choice)

    def model_for(self, adapter: str | None):
        """The model under `adapter` (made once: `Model.with_adapter` shares the weights)."""
        if adapter not in self.adapted:
            self.adapted[adapter] = self.model.with_adapter(adapter)
        return self.adapted[adapter]

    def retire(self, choice: Choice) -> None:
        """The sequence is done: its slot is free (its cache stays, for reuse)."""
        choice.done = True
        if choice in self.decoding:
            self.decoding.remove(choice)
        self.requests.pop(choice, None)

    def release(self, request: Request) -> None:
        """Drop a request wherever it is (cancelled, or failed)."""
        if request in self.prefilling:
            self.prefilling.remove(request)
        if self.alone is request:
            self.alone = None
        for choice in request.choices:
            if not choice.done:
                self.retire(choice)


def check_slots_fit(model, capacity: int, max_batch: int) -> None:
    """Refuse, before allocating, slots whose caches could not all fill up in memory.

    A cache's pages are taken from the OS as its positions fill, so the server would
    start and then die under load, deep in a forward, when the last slots fill."""
    nbytes = max_batch * capacity * model.new_cache(1).bytes_per_position
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise MinislmError(
            f"{max_batch} KV caches (--max-batch) of {capacity} positions (--ctx-size) need {nbytes / 2**30:.1f} GiB, "
            f"but {available / 2**30:.1f} GiB of memory is available; lower --max-batch or --ctx-size"
        )
