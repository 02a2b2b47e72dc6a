"""Where a minislm forward spends its time, per layer part (`bench --profile`).

Two instruments, both outside the model code:
- every matrix is wrapped in a `TimedWeight` that times its own matmuls (the
  model calls `w.matmul(x)` on anything that is not a plain array, the same
  door the bf16/int4 weights use), so qkv_proj, o_proj, gate_up_proj,
  down_proj, lm_head and the embedding lookup are timed separately even though
  they go through one `linear` function;
- cProfile gives the cumulative time of the pure functions of model.py
  (rms_norm, attention, mlp, apply_rope, rope_tables); attention's own share
  is attention() minus the RoPE it applies (the projections are outside it);
  swiglu is mlp() minus its two projections.
"other" is the rest of the wall time: residual adds, the Python loop over
layers, the profiler's own overhead (about a microsecond per Python call, a
few hundred calls a token). Decode figures are per token; effective GB/s =
bytes of that part's weights one token reads / its time.
"""

import cProfile
import pstats
import time
from collections import defaultdict

import numpy as np

from ..model import embed, linear

# hub tensor name -> the part it is timed as (PhiMoE: experts' w1/w3 are their
# gate/up, w2 their down; the router is `block_sparse_moe.gate`)
PART_OF = {
    "qkv_proj": "qkv_proj", "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
    "o_proj": "o_proj", "gate_up_proj": "gate_up_proj", "down_proj": "down_proj",
    "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj", "gate": "router",
    "lm_head": "lm_head", "embed_tokens": "embed",
}
PARTS = ["embed", "norms", "qkv_proj", "rope", "attention", "o_proj", "router",
         "gate_up_proj", "swiglu", "down_proj", "lm_head", "other"]


class TimedWeight:
    """A weight that adds the time of each of its matmuls to timers[part]."""

    def __init__(self, weight, part: str, timers: dict):
        self.weight, self.part, self.timers = weight, part, timers
        self.shape, self.nbytes = weight.shape, weight.nbytes

    def matmul(self, x):
        start = time.perf_counter()
        y = linear(x, self.weight)
        self.timers[self.part] += time.perf_counter() - start
        return y

    def rows(self, ids):
        start = time.perf_counter()
        y = embed(self.weight, ids)
        self.timers[self.part] += time.perf_counter() - start
        return y


def part_of(name: str) -> str | None:
    for key, part in PART_OF.items():
        if f".{key}." in f".{name}":
            return part
    return None


def timed_weights(weights: dict, timers: dict) -> dict:
    """Matrices (ndarrays or packed bf16/int4 weights) wrapped; norms and biases left as they are."""
    return {name: TimedWeight(w, part_of(name), timers) if part_of(name) and len(w.shape) == 2 else w
            for name, w in weights.items()}


def cumulative(profiler, *functions) -> float:
    """Seconds spent in (and under) model.py's functions of these names."""
    total = 0.0
    for (filename, _, name), (_, _, _, cumtime, _) in pstats.Stats(profiler).stats.items():
        if name in functions and filename.endswith("model.py"):
            total += cumtime
    return total


def run_profiled(work, timers: dict) -> dict:
    """Seconds per part of one call of work(), timers and profiler started fresh."""
    timers.clear()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    work()
    profiler.disable()
    wall = time.perf_counter() - start
    parts = {part: timers[part] for part in ("embed", "qkv_proj", "o_proj", "router", "gate_up_proj", "down_proj", "lm_head")}
    parts["norms"] = cumulative(profiler, "rms_norm")
    parts["rope"] = cumulative(profiler, "apply_rope", "rope_tables")
    # attention() receives q, k, v already projected and returns the heads before
    # o_proj (model.forward calls the projections), so only RoPE is inside it.
    parts["attention"] = cumulative(profiler, "attention") - cumulative(profiler, "apply_rope")
    parts["swiglu"] = cumulative(profiler, "mlp") - parts["gate_up_proj"] - parts["down_proj"]
    parts["other"] = wall - sum(parts.values())
    return {"wall_s": wall, "parts_s": {p: parts[p] for p in PARTS}}


def profile_minislm(engine, checkpoint, threads: int, prompt_len: int, new_tokens: int,
                    experts_read: float = 1.0) -> dict:
    """`experts_read`: the fraction of MoE expert weights one decoded token reads (top_k / experts)."""
    from .engines import minislm_model
    from .measure import prompts

    model = minislm_model(engine, checkpoint, threads)
    timers = defaultdict(float)
    model.weights = timed_weights(model.weights, timers)
    part_bytes = defaultdict(int)
    for name, w in model.weights.items():
        if isinstance(w, TimedWeight) and w.part != "embed":
            part_bytes[w.part] += int(w.nbytes * (experts_read if ".experts." in name else 1.0))
    ids = prompts([8, prompt_len], model.config.vocab_size)

    def prefill(prompt, cache):
        return model.lm_head(model.forward(prompt, cache)[-1:])[0]

    prefill(ids[8], model.new_cache(8))  # warm-up: JIT compilation, first-touch of buffers
    cache = model.new_cache(prompt_len + new_tokens)
    state = {}
    pre = run_profiled(lambda: state.update(logits=prefill(ids[prompt_len], cache)), timers)

    def decode():
        for _ in range(new_tokens):
            token = int(np.argmax(state["logits"]))
            state["logits"] = model.lm_head(model.forward([token], cache))[0]

    dec = run_profiled(decode, timers)
    dec = {"wall_s": dec["wall_s"] / new_tokens, "parts_s": {p: s / new_tokens for p, s in dec["parts_s"].items()}}
    return {
        "engine": engine.name,
        "status": "ok",
        "prompt_tokens": prompt_len,
        "decode_tokens": new_tokens,
        "prefill": pre,
        "decode_per_token": dec,
        "part_bytes": dict(part_bytes),
    }
