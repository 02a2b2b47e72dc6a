"""`python -m minislm trace PROMPT`: every step of one forward pass, in order.

A `SummaryRecorder` keeps each step's shape, dtype and statistics, never the
values, so the table costs the same for any prompt length; the recorder's budget
bounds the one array made only for it, a layer's attention probabilities.

With `--image` (Phi-3-vision) the same recorder also sees the image side: each
image's views (the global view and the crops), the tower's patch features and the
image tokens after the merge and projector, and the table says where each image's
tokens sit in the sequence.
"""

import json
import math

import numpy as np

from ..trace import SummaryRecorder
from .inputs import check_reads_images, model_and_prompt, parse_layers, pieces, prompt_images, shown_path, write_text


def trace_prompt(model, ids, layers=None) -> SummaryRecorder:
    """One forward over `ids` from an empty cache, every step summarised."""
    trace = SummaryRecorder(layers=layers)
    model.logits(ids, trace)
    return trace


def format_table(summaries) -> str:
    shapes = ["(" + ", ".join(str(n) for n in s.shape) + ")" for s in summaries]
    width = max([16] + [len(shape) + 2 for shape in shapes])  # an image's views are 4-D
    lines = [f"{'step':<15}{'layer':>5}  {'shape':<{width}}{'dtype':<9}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}"]
    for s, shape in zip(summaries, shapes):
        layer = "-" if s.layer is None else str(s.layer)
        # ids (PhiMoE's experts) are labels: their mean and std mean nothing
        spread = f"{'-':>10}{'-':>10}" if np.issubdtype(np.dtype(s.dtype), np.integer) else number(s.mean) + number(s.std)
        lines.append(f"{s.name:<15}{layer:>5}  {shape:<{width}}{s.dtype:<9}{spread}{number(s.min)}{number(s.max)}")
    return "\n".join(lines)


def number(x: float) -> str:
    """10 characters: fixed point for everyday sizes, scientific beyond."""
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:>10.4f}"
    return f"{x:>10.2e}" if math.isfinite(x) else f"{x:>10}"


def step_rows(summaries) -> list[dict]:
    """The table as JSON-ready rows (for --json and the explorer pages). Integer steps
    (PhiMoE's expert ids) are labels: their mean and std are None."""
    rows = []
    for s in summaries:
        ids = np.issubdtype(np.dtype(s.dtype), np.integer)
        rows.append({"name": s.name, "layer": s.layer, "shape": list(s.shape), "dtype": s.dtype,
                     "mean": None if ids else s.mean, "std": None if ids else s.std, "min": s.min, "max": s.max})
    return rows


def as_json(model, ids, summaries) -> dict:
    return {
        "model": str(model.path),
        "tokens": [{"id": int(i), "piece": p} for i, p in zip(ids, pieces(model.tokenizer, ids))],
        "steps": step_rows(summaries),
    }


def trace_image_prompt(model, args, pictures, layers):
    """Phi-3-vision: the prompt with its images; one recorder sees the images being
    encoded and then the forward over text and image tokens."""
    trace = SummaryRecorder(layers=layers)
    prompt = model.image_prompt(args.prompt, pictures, args.num_crops, args.system, chat=args.chat, trace=trace)
    model.logits(prompt.ids, trace, image_features=prompt.features)
    return prompt, trace


def image_lines(prompt) -> list[str]:
    """Where each image went: its crops, its token count, the positions it fills."""
    lines = []
    for k, image in enumerate(prompt.images, 1):
        positions = np.flatnonzero(prompt.ids == -k)
        lines.append(f"image {k}: {image.describe()}, positions {positions[0]}..{positions[-1]} of {len(prompt.ids)}")
    return lines


def run_trace(args) -> int:
    pictures = prompt_images(args)
    model, ids = model_and_prompt(args)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    check_reads_images(model, pictures)
    if pictures:
        prompt, trace = trace_image_prompt(model, args, pictures, layers)
        ids = prompt.ids
    else:
        trace = trace_prompt(model, ids, layers)
    config = model.config
    print(
        f"{shown_path(model.path)}: one forward over {len(ids)} tokens, {config.num_hidden_layers} layers"
        f"{'' if args.layers is None else f' (showing {args.layers})'}; "
        f"T = {len(ids)} tokens, D = {config.hidden_size}, H = {config.num_attention_heads} query heads, "
        f"KV = {config.num_key_value_heads} key/value heads, hd = {config.head_dim}"
        + (f", E = {config.num_local_experts} experts" if config.model_type == "phimoe" else f", F = {config.intermediate_size}")
    )
    if pictures:
        print("\n".join(image_lines(prompt)))
    print(format_table(trace.summaries))
    if args.json:
        write_text(args.json, json.dumps(as_json(model, ids, trace.summaries), ensure_ascii=False) + "\n", "--json")
    return 0
