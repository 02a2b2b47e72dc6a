"""One exploration: a prompt, the tokens generated after it one step at a time, and
everything each forward pass computed, kept for the live page (`minislm explore`).

A step is what `minislm generate` does for one token, through the same policy
(runtime.make_sampler, the stop ids): the sampler's stages for the last logits, the
id they choose, then one cached forward of that id. The difference is a recorder
riding along: every forward (the prefill, each decode step, LongRoPE's re-prefill)
writes what it computed at its positions into arrays that grow with the sequence,
so the page can show any position without running the model again:

    q          (L, H, C, hd)  queries after RoPE: with the cache, any attention row again
                              (`attention_rows`), and the arithmetic view
    heads      (L, C, H*hd)   what attention handed to o_proj (the kernel's output)
    lens       (R, C) ...     the logit lens's measures of each position
    routing    (L, C, 2)      PhiMoE's experts and weights
    kv_error   (C, 2)         how far the cached keys/values are from the float32 ones

C is the capacity, MAX_EXPLORE_TOKENS at most, so all of it is bounded from the start.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import MinislmError
from ..runtime import make_drafter, make_sampler, sampling_settings, stop_ids
from ..sampling import SamplingSettings, is_sampled, probabilities
from ..speculative import ACCEPTED, CORRECTED, DEFAULT_NUM_DRAFT, Draft, judge
from .. import model as spine
from ..blocksparse import is_dense_layer, token_mask
from ..trace import STEPS, StepSummary, SummaryRecorder
from .inputs import MAX_PICTURE_TOKENS, pieces
from .lens import lens_logits, log_probabilities, measures, most_likely

MAX_EXPLORE_TOKENS = MAX_PICTURE_TOKENS  # prompt + generated tokens the page follows
MAX_STEPS = 32  # tokens one "next N tokens" request may ask for
MAX_DRAFT = 8  # guesses one speculative step may verify
TOP_CANDIDATES = 10  # next-token candidates kept per position
SAMPLING_CANDIDATES = 12  # ids the sampling panel follows through its stages
LENS_ROWS_PER_PASS = 128  # lens rows sent through lm_head together: one read of its weights
KEPT = ("embed", "q", "k", "v", "attn_heads", "resid_post", "experts", "expert_weights")
SMALL = 1 << 16  # bytes: a value this small is kept and summarised only if its layer is shown


class ViewRecorder(SummaryRecorder):
    """Keeps whole the few values the page draws, and what the step table needs of
    every step: small values (a decode step's) as they are, summarised only for the
    layer the page shows; larger ones (a prompt's) summarised at once.

    It does not ask for the attention probabilities: the fast path never forms them,
    and `attention_rows` computes any of them later from the kept queries and the cache,
    as the recorder would have (model.record_attention_probabilities).
    """

    def __init__(self):
        super().__init__(names=[name for name in STEPS if name != "attn_probs"])
        self.values = {}  # (name, layer) -> a copy of the value
        self.table = []  # (name, layer, a StepSummary or a small value to summarise when asked)

    def record(self, name, value, layer=None):
        value = np.asarray(value)
        if not self.wants(name, layer, value.nbytes):
            return
        kept = value.copy() if value.nbytes <= SMALL or name in KEPT else None
        self.table.append((name, layer, kept if value.nbytes <= SMALL else StepSummary.of(name, layer, 0, value)))
        if kept is not None:
            self.nbytes += value.nbytes  # the recorder's budget (max_bytes) counts what is kept whole
        if name in KEPT:
            self.values[name, layer] = kept

    def kept(self, name, layer=None) -> np.ndarray:
        return self.values[name, layer]

    @property
    def positions(self) -> np.ndarray:
        """The sequence positions of the forward (all of them after a LongRoPE re-prefill)."""
        return self._positions


@dataclass
class Step:
    """One "next token": what was chosen from what, and what the forward after it did."""

    index: int
    token: int
    stages: list  # sampling.Stage, the distribution the token came from
    forward_ms: float
    reprefilled: bool  # LongRoPE: the forward ran the whole sequence again


@dataclass
class Round:
    """One speculative step: the guesses, the target's verdict on each token it kept
    (speculative.judge), and the cache positions the verify forward wrote."""

    position: int  # where the first guess went: the text's length before the round
    guesses: list  # the drafter's ids
    tokens: list  # what joined the text: the accepted guesses, then the correction or the bonus
    verdicts: list  # speculative.ACCEPTED / CORRECTED / BONUS, one per token
    verify_ms: float  # the one forward of the guesses


@dataclass
class Exploration:
    model: object
    ids: np.ndarray  # (n,) the prompt, then every chosen id
    prompt_length: int
    settings: SamplingSettings
    seed: int
    capacity: int
    cache: object = None
    sampler: object = None
    logits: np.ndarray | None = None  # (V,) the last position's, as generate computes them
    steps: list = field(default_factory=list)
    table: list = field(default_factory=list)  # the last forward's steps (ViewRecorder.table)
    ended: str | None = None  # why no further step can be taken
    images: list | None = None  # Phi-3-vision: explain.image_data of the prompt's images
    forward_ms: float = 0.0
    rounds: list = field(default_factory=list)  # Round, one per speculative step
    last_round: bool = False  # the latest step was speculative


def start(model, ids, settings: SamplingSettings, seed: int, kv_cache: str | None = None,
          image_features: np.ndarray | None = None) -> Exploration:
    """Prefill `ids` into a fresh cache and keep what the forward computed. Phi-3-vision:
    `ids` may hold image placeholders, filled by `image_features`; the page follows
    MAX_EXPLORE_TOKENS text tokens, and the image tokens besides."""
    ids = np.asarray(ids, dtype=np.int64)
    images = int(np.count_nonzero(ids < 0))
    capacity = min(MAX_EXPLORE_TOKENS + images, model.config.max_position_embeddings)
    if len(ids) >= capacity:
        raise MinislmError(f"the prompt is {len(ids) - images} tokens; the explorer follows at most "
                           f"{capacity - images} (prompt and generated tokens together), so leave room for one more")
    run = Exploration(model, ids, len(ids), settings, seed, capacity)
    run.cache = model.new_cache(capacity, kv_cache)
    run.weight_bytes = weights_read_per_token(model)
    run.sampler = make_sampler(model, settings, seed)
    allocate(run)
    forward(run, ids, image_features)
    return run


def weights_read_per_token(model) -> int:
    """Bytes of weights one decode step reads: all of them, but for PhiMoE only the
    experts a token uses (2 of E in each layer)."""
    total = experts = 0
    for name, w in model.weights.items():
        size = int(getattr(w, "nbytes", 0))
        total += size
        experts += size if ".experts." in name else 0
    config = model.config
    unused = 1 - config.num_experts_per_tok / config.num_local_experts if config.model_type == "phimoe" else 0
    return int(total - experts * unused)


def allocate(run: Exploration) -> None:
    c, C = run.model.config, run.capacity
    L, H, hd = c.num_hidden_layers, c.num_attention_heads, c.head_dim
    R = L + 1
    run.q = np.zeros((L, H, C, hd), np.float32)
    run.heads = np.zeros((L, C, H * hd), np.float32)
    run.lens = {name: np.zeros((R, C), dtype) for name, dtype in (
        ("top_ids", np.int64), ("top_probs", np.float64), ("entropy", np.float64), ("kl_to_final", np.float64),
        ("next_ranks", np.int64))}
    run.lens_pieces = np.empty((R, C), dtype=object)  # the tokenizer's piece of each top id
    run.next = [None] * C  # (id, piece, probability) of the top candidates after each position
    run.pending_lens = None  # (R, V) log-probabilities of the last position, to rank the next token when chosen
    run.experts = np.zeros((L, C, 2), np.int64)
    run.expert_weights = np.zeros((L, C, 2), np.float32)
    run.kv_error = np.zeros((C, 2), np.float64)  # max |stored - computed| of keys, values per position


def retune(run: Exploration, settings: SamplingSettings, seed: int) -> None:
    """New settings for the next draws. The random generator carries on (the same seed
    gives the same draws as `generate`); a new seed starts a new one."""
    if seed != run.seed:
        run.sampler = make_sampler(run.model, settings, seed)
    elif settings != run.settings:
        rng = run.sampler.rng
        run.sampler = make_sampler(run.model, settings, seed)
        run.sampler.rng = rng
    run.settings, run.seed = settings, seed


def step(run: Exploration) -> Step:
    """One token, as `generate` chooses it, then one cached forward of it."""
    if run.ended:
        raise MinislmError(f"generation has ended ({run.ended}); type a new prompt")
    history = [int(t) for t in run.ids if t >= 0]
    stages = run.sampler.stages(run.logits, history)
    token = run.sampler.choose(stages)
    rank_pending(run, token)
    run.ids = np.append(run.ids, token)
    run.last_round = False
    record = Step(len(run.steps), token, stages, 0.0, False)
    run.steps.append(record)
    run.ended = ending(run, token, len(run.ids))
    if run.ended:
        return record
    positions = forward(run, np.array([token]))
    record.forward_ms = run.forward_ms
    record.reprefilled = len(positions) > 1  # one new token, yet the forward ran from position 0
    return record


def ending(run: Exploration, token: int, length: int) -> str | None:
    """Why no step can follow `token`, the text now `length` ids long: a stop id, or the
    page's capacity; None while generation goes on."""
    if token in stop_ids(run.model):
        return f"{run.model.tokenizer.token_piece(token)!r} is a stop id"
    if length >= run.capacity:
        return f"the explorer follows {run.capacity} tokens"
    return None


def speculative_step(run: Exploration, num_draft: int = DEFAULT_NUM_DRAFT) -> Round:
    """One round of speculative decoding with prompt lookup, through the library's own
    accept loop (speculative.judge): guess up to `num_draft` ids from the text, run
    them through the cache in one forward, keep the guesses the target agrees with and
    its token after them. The cache then forgets the rejected guesses' positions
    (KVCache.truncate) and takes the newest token in one more forward, as `step` leaves
    it; the page's per-position views of the forgotten positions lie past the cache's
    length, unseen, until later tokens write over them."""
    if run.ended:
        raise MinislmError(f"generation has ended ({run.ended}); type a new prompt")
    model, cache = run.model, run.cache
    n = len(run.ids)  # the cache holds every id, and run.logits come after the last
    history = [int(t) for t in run.ids if t >= 0]
    k = min(num_draft, run.capacity - n - 1)  # the guesses and one token more fit
    rope = model.config.rope
    if rope.kind == "longrope" and not cache.rope_long:  # the verify forward stays before LongRoPE's switch;
        k = max(0, min(k, rope.original_max_position_embeddings - n))  # a one-token forward re-prefills after it
    drafter = make_drafter(model, run.sampler, run.capacity, "lookup")
    draft = drafter.propose(history, k) if k > 0 else Draft([], [])
    rows, recorder = run.logits[None], None  # (1, V): the row before the first guess
    begin = time.perf_counter()
    if draft.tokens:
        recorder = ViewRecorder()
        hidden = model.forward(np.array(draft.tokens), cache, recorder)
        rows = np.concatenate([rows, model.lm_head(hidden)])  # (1 + guesses, V)
    record = Round(n, list(draft.tokens), [], [], 1000 * (time.perf_counter() - begin))
    for token, verdict, stages in judge(run.sampler, rows, draft, history):
        record.tokens.append(token)
        record.verdicts.append(verdict)
        run.steps.append(Step(len(run.steps), token, stages, 0.0, False))
        run.ended = ending(run, token, n + len(record.tokens))
        if run.ended:
            break
    rank_pending(run, record.tokens[0])  # the last forward's lens ranks the first new token
    run.ids = np.append(run.ids, record.tokens)
    if recorder is not None:  # the guesses' positions, ranked against the tokens that really followed
        keep_attention(run, recorder, recorder.positions)
        keep_lens(run, recorder, recorder.positions)
        keep_kv_error(run, recorder, recorder.positions)
    cache.truncate(len(run.ids) - 1)  # every token but the newest, which the next forward adds
    run.rounds.append(record)
    run.last_round = True
    if not run.ended:
        positions = forward(run, np.array(record.tokens[-1:]))
        run.steps[-1].forward_ms = run.forward_ms
        run.steps[-1].reprefilled = len(positions) > 1
    return record


def forward(run: Exploration, new_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
    """Run new tokens through the model after the cached ones, as `generate` does, and
    keep what the recorder saw at the positions it saw (all of them after LongRoPE's
    re-prefill); return those positions."""
    model = run.model
    recorder = ViewRecorder()
    begin = time.perf_counter()
    hidden = model.forward(new_ids, run.cache, recorder, image_features)
    run.logits = model.lm_head(hidden[-1:])[0]  # (V,) exactly as generate_tokens computes them
    run.forward_ms = 1000 * (time.perf_counter() - begin)
    positions = recorder.positions
    run.table, run.last_positions = recorder.table, positions
    keep_attention(run, recorder, positions)
    keep_lens(run, recorder, positions)
    keep_kv_error(run, recorder, positions)
    return positions


def keep_attention(run: Exploration, recorder: ViewRecorder, positions: np.ndarray) -> None:
    for layer in range(run.model.config.num_hidden_layers):
        run.q[layer][:, positions] = recorder.kept("q", layer)
        run.heads[layer][positions] = recorder.kept("attn_heads", layer)
        if run.model.config.model_type == "phimoe":
            run.experts[layer][positions] = recorder.kept("experts", layer)
            run.expert_weights[layer][positions] = recorder.kept("expert_weights", layer)


def keep_lens(run: Exploration, recorder: ViewRecorder, positions: np.ndarray) -> None:
    """The lens of every stream at the forward's positions: the rows go through the final
    norm and lm_head LENS_ROWS_PER_PASS at a time, so a decode step reads lm_head once."""
    L = run.model.config.num_hidden_layers
    streams = np.stack([recorder.kept("embed")] + [recorder.kept("resid_post", layer) for layer in range(L)])  # (R, T, D)
    R, T, D = streams.shape
    flat = streams.reshape(R * T, D)
    log_p = np.concatenate([log_probabilities(lens_logits(run.model, flat[i : i + LENS_ROWS_PER_PASS]))
                            for i in range(0, R * T, LENS_ROWS_PER_PASS)]).reshape(R, T, -1)  # (R, T, V)
    next_ids = np.array([run.ids[t + 1] if t + 1 < len(run.ids) else -1 for t in positions])
    measured = measures(log_p, log_p[-1], next_ids)  # every row at once, (R, T) each
    for name, value in zip(("top_ids", "top_probs", "entropy", "kl_to_final", "next_ranks"), measured):
        run.lens[name][:, positions] = value
    tokenizer = run.model.tokenizer
    run.lens_pieces[:, positions] = np.array([pieces(tokenizer, row) for row in run.lens["top_ids"][:, positions]],
                                             dtype=object).reshape(R, T)
    final = np.exp(log_p[-1])  # (T, V)
    best = most_likely(final, TOP_CANDIDATES)  # (T, k)
    for t, row, p in zip(positions, best, final):
        run.next[t] = [(int(i), tokenizer.token_piece(int(i)), float(p[i])) for i in row]
    run.pending_lens = log_p[:, -1]  # (R, V): ranks the token chosen after the last position


def rank_pending(run: Exploration, token: int) -> None:
    """The chosen token is the last position's real next token: its rank in each lens row."""
    t = len(run.ids) - 1
    log_p = run.pending_lens
    run.lens["next_ranks"][:, t] = 1 + (log_p > log_p[:, token : token + 1]).sum(axis=-1)


def attention_rows(run: Exploration, layer: int, rows) -> np.ndarray:
    """(H, len(rows), S) attention probabilities of the queries at `rows` over the S cached
    keys: the plain definition (model.attention_probabilities) on the queries the forward
    computed and the keys as the cache stores them, under the model's own mask. Keys
    after a query are masked, so a row is what it was when its query was computed."""
    config, cache = run.model.config, run.cache
    S = cache.length
    rows = np.asarray(rows)
    keys, _ = cache.read(layer, S)  # (KV, S, hd), widened as attention reads them
    G = config.num_attention_heads // config.num_key_value_heads
    allowed = spine.attention_mask(rows, S, config.sliding_window)  # (T, S)
    if config.phi3small is not None and not is_dense_layer(config, layer):
        allowed = token_mask(config, rows, S)  # (H, T, S): each head's block pattern
    heads = np.arange(config.num_attention_heads)
    return spine.attention_probabilities(run.q[layer][:, rows], keys[heads // G], allowed, spine.attention_scale(config))


def step_table(run: Exploration, layer: int) -> list:
    """The last forward's steps for the model and one layer, as StepSummary rows,
    attn_probs included (from `attention_rows`, where the step table would list it)."""
    summaries = []
    for name, l, value in run.table:
        if l is None or l == layer:
            summaries.append(value if isinstance(value, StepSummary) else StepSummary.of(name, l, 0, value))
        if name == "v" and l == layer:
            probs = attention_rows(run, layer, run.last_positions)
            summaries.append(StepSummary.of("attn_probs", layer, 0, probs))
    return summaries


def keep_kv_error(run: Exploration, recorder: ViewRecorder, positions: np.ndarray) -> None:
    """How far each position's stored keys and values are from the float32 ones the
    forward computed: 0 in a float32 cache, rounding in float16, quantization in int8."""
    error = np.zeros((len(positions), 2))
    for layer in range(run.model.config.num_hidden_layers):
        storage = run.cache.layer(layer)
        for n, (codes, scales, name) in enumerate(((storage.keys, storage.key_scales, "k"),
                                                   (storage.values, storage.value_scales, "v"))):
            stored = codes[:, positions].astype(np.float32)  # (KV, T, hd), widened as attention reads them
            if scales is not None:
                stored *= scales[:, positions, None]
            error[:, n] = np.maximum(error[:, n], np.abs(stored - recorder.kept(name, layer)).max(axis=(0, 2)))
    run.kv_error[positions] = error


# ---------------------------------------------------------------- what the page shows


def sampling_view(run: Exploration, stages=None, chosen: int | None = None) -> dict:
    """The distribution after each stage of the sampler, for a few candidate ids: the
    most likely before any setting and after the last stage, which of them each stage
    keeps, and how many ids survive it."""
    if stages is None:
        stages = run.sampler.stages(run.logits, [int(t) for t in run.ids if t >= 0])
    first = probabilities(stages[0].logits)
    last = probabilities(stages[-1].logits)
    survivors = [int(i) for i in most_likely(last[None], SAMPLING_CANDIDATES)[0] if last[i] > 0]
    candidates = list(dict.fromkeys(survivors + most_likely(first[None], SAMPLING_CANDIDATES)[0].tolist()))
    if chosen is not None and chosen not in candidates:
        candidates.append(chosen)
    candidates.sort(key=lambda i: (-last[i], -first[i]))
    rows = []
    for stage in stages:
        p = probabilities(stage.logits)
        rows.append({"name": stage.name, "survivors": int(np.count_nonzero(stage.logits > -np.inf)),
                     "p": [round(float(p[i]), 6) for i in candidates],
                     "kept": [bool(stage.logits[i] > -np.inf) for i in candidates]})
    tokenizer = run.model.tokenizer
    return {"candidates": [{"id": i, "piece": tokenizer.token_piece(i)} for i in candidates], "stages": rows,
            "sampled": is_sampled(stages), "chosen": chosen}


def kv_view(run: Exploration) -> dict:
    """The cache as it fills: its size, what a decode step reads, the window, LongRoPE."""
    config, cache = run.model.config, run.cache
    S = cache.length
    window = config.sliding_window
    read = S + 1 if window is None else min(S + 1, window)  # the next query reads itself and these
    rope = config.rope
    return {
        "dtype": cache.dtype, "capacity": cache.capacity, "length": S,
        "bytes_per_position": cache.bytes_per_position, "bytes": S * cache.bytes_per_position,
        "next_step_reads": {"positions": read, "bytes": read * cache.bytes_per_position, "weights_bytes": run.weight_bytes},
        "window": window, "left_attention": max(0, S + 1 - read),
        "longrope": None if rope.kind != "longrope" else {
            "switch_after": rope.original_max_position_embeddings, "long": bool(cache.rope_long),
            "reprefills": [s.index for s in run.steps if s.reprefilled]},
        "error": np.round(run.kv_error[:S], 6).tolist(),
        "rolled_back": rolled_back(run),
    }


def rolled_back(run: Exploration) -> list[int] | None:
    """[first, end) of the positions the last speculative step's verify forward wrote and
    the cache then forgot: the rejected and unchecked guesses' (the first of them holds
    the target's correction now), or None after a plain step."""
    if not run.last_round:
        return None
    r = run.rounds[-1]
    kept = sum(v == ACCEPTED for v in r.verdicts)
    return [r.position + kept, r.position + len(r.guesses)]


def speculative_view(run: Exploration) -> dict | None:
    """Every speculative round: each guess as accepted, rejected (the first the target
    disagreed with) or unchecked (after a rejection, or after a stop id ended the text),
    the target's own token after them, and the counts so far."""
    if not run.rounds:
        return None
    tokenizer = run.model.tokenizer
    rounds = []
    for r in run.rounds:
        judged = dict(enumerate(r.verdicts[: len(r.guesses)]))
        guesses = [{"id": g, "piece": tokenizer.token_piece(g),
                    "verdict": {ACCEPTED: "accepted", CORRECTED: "rejected"}.get(judged.get(i), "unchecked")}
                   for i, g in enumerate(r.guesses)]
        last = r.verdicts[-1]
        rounds.append({
            "position": r.position, "guesses": guesses, "verify_ms": round(r.verify_ms, 1),
            "token": None if last == ACCEPTED else {"id": r.tokens[-1], "piece": tokenizer.token_piece(r.tokens[-1]),
                                                    "kind": "corrected" if last == CORRECTED else "bonus"},
        })
    return {"rounds": rounds, "drafted": sum(len(r.guesses) for r in run.rounds),
            "accepted": sum(v == ACCEPTED for r in run.rounds for v in r.verdicts),
            "last": run.last_round, "max_draft": MAX_DRAFT}


def lens_view(run: Exploration) -> dict:
    n = len(run.ids)
    known = min(n, run.cache.length)  # the last chosen id has not been through the model yet
    L = run.model.config.num_hidden_layers
    lens = {name: values[:, :known] for name, values in run.lens.items()}
    ranks = lens["next_ranks"][:, : max(0, min(known, n - 1))]
    return {
        "rows": ["embed"] + [f"layer {i}" for i in range(L)],
        "top_ids": lens["top_ids"].tolist(),
        "top_pieces": run.lens_pieces[:, :known].tolist(),
        "top_probs": np.round(lens["top_probs"], 4).tolist(),
        "entropy": np.round(lens["entropy"], 4).tolist(),
        "kl_to_final": np.round(lens["kl_to_final"], 4).tolist(),
        "next_ranks": ranks.tolist(),
    }


def settings_from(model, values: dict) -> tuple[SamplingSettings, int]:
    """The page's sliders as settings, through the one policy (unset values: the model's
    generation_config.json, as `generate` takes them)."""
    seed = values.get("seed", 0)
    settings = sampling_settings(model, temperature=values.get("temperature"), top_k=values.get("top_k"),
                                 top_p=values.get("top_p"), min_p=values.get("min_p"),
                                 repetition_penalty=values.get("repetition_penalty"))
    return settings, seed
