"""`python -m minislm trace PROMPT`: every step of one forward pass, in order.

A `SummaryRecorder` keeps each step's shape, dtype and statistics, never the
values, so the table costs the same for any prompt length; the recorder's budget
bounds the one array made only for it, a layer's attention probabilities.
"""

import json
import math

from ..trace import SummaryRecorder
from .inputs import model_and_prompt, parse_layers, pieces, shown_path, write_text


def trace_prompt(model, ids, layers=None) -> SummaryRecorder:
    """One forward over `ids` from an empty cache, every step summarised."""
    trace = SummaryRecorder(layers=layers)
    model.logits(ids, trace)
    return trace


def format_table(summaries) -> str:
    lines = [f"{'step':<15}{'layer':>5}  {'shape':<16}{'dtype':<9}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}"]
    for s in summaries:
        layer = "-" if s.layer is None else str(s.layer)
        shape = "(" + ", ".join(str(n) for n in s.shape) + ")"
        lines.append(
            f"{s.name:<15}{layer:>5}  {shape:<16}{s.dtype:<9}{number(s.mean)}{number(s.std)}{number(s.min)}{number(s.max)}"
        )
    return "\n".join(lines)


def number(x: float) -> str:
    """10 characters: fixed point for everyday sizes, scientific beyond."""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:>10.4f}"
    return f"{x:>10.2e}" if math.isfinite(x) else f"{x:>10}"


def as_json(model, ids, summaries) -> dict:
    return {
        "model": str(model.path),
        "tokens": [{"id": int(i), "piece": p} for i, p in zip(ids, pieces(model.tokenizer, ids))],
        "steps": [
            {"name": s.name, "layer": s.layer, "shape": list(s.shape), "dtype": s.dtype,
             "mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
            for s in summaries
        ],
    }


def run_trace(args) -> int:
    model, ids = model_and_prompt(args)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    trace = trace_prompt(model, ids, layers)
    config = model.config
    print(
        f"{shown_path(model.path)}: one forward over {len(ids)} tokens, {config.num_hidden_layers} layers"
        f"{'' if args.layers is None else f' (showing {args.layers})'}; "
        f"T = {len(ids)} tokens, D = {config.hidden_size}, H = {config.num_attention_heads} query heads, "
        f"KV = {config.num_key_value_heads} key/value heads, hd = {config.head_dim}"
        + (f", E = {config.num_local_experts} experts" if config.model_type == "phimoe" else f", F = {config.intermediate_size}")
    )
    print(format_table(trace.summaries))
    if args.json:
        write_text(args.json, json.dumps(as_json(model, ids, trace.summaries), ensure_ascii=False) + "\n", "--json")
    return 0
