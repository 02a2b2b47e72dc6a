"""`python -m minislm explain PROMPT --out explain.html`: one page to explore a forward pass.

The page is a single file: the numbers inline as JSON, plain JavaScript drawing
them on a canvas, nothing fetched from anywhere, so it opens offline and can be
mailed or committed. A learner picks a layer and a head and sees that head's
attention over the prompt's tokens, the logit lens, the next-token distribution
at any position, the shape and statistics of every step, (PhiMoE) the routing, and
(Phi-3-vision, `--image`) each image's views and the positions its tokens fill.

What it embeds is bounded: at most MAX_PICTURE_TOKENS tokens, attention stored as
16-bit fixed point (the lower triangle only when every key after its query is
exactly 0, as the causal mask makes it), and at most MAX_ATTENTION_BYTES of it
(choose layers with --layers past that).

The page draws what was computed, not what should have been: exact zeros are grey
because they are zero, and each legend and caption ("rows sum to ...", "grey: N
keys after their query") is counted from the numbers (views.js, shared with the
live page of `python -m minislm explore`).
"""

import base64
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import MinislmError
from ..runtime import allowed_ids
from ..trace import Recorder, SummaryRecorder
from .inputs import (check_reads_images, for_image_page, for_picture, model_and_prompt, parse_layers, pieces,
                     prompt_images, write_text)
from .lens import lens_from_trace, most_likely, probabilities
from .steps import step_rows

HERE = Path(__file__).parent
TEMPLATE = HERE / "explain.html"
MAX_ATTENTION_BYTES = 16 << 20
# A probability p is stored as 16 bits: 0 when p is exactly 0 (what the page draws grey),
# else 1 + round(p * (FIXED_POINT - 1)), so a nonzero p never reads as an exact 0: steps of 1.5e-5.
FIXED_POINT = 65535


def encode_probabilities(p: np.ndarray, layout: str) -> str:
    """(T, T) probabilities -> base64 of uint16 little-endian, row by row: with layout
    "lower" row t holds keys 0..t only, T(T+1)/2 numbers (use it only when every key
    after its query is exactly 0); with "full", all T*T."""
    rows, cols = np.tril_indices(p.shape[0]) if layout == "lower" else np.indices(p.shape).reshape(2, -1)
    values = p[rows, cols]
    fixed = np.where(values == 0, 0, 1 + np.round(np.clip(values, 0, 1) * (FIXED_POINT - 1))).astype("<u2")
    return base64.b64encode(fixed.tobytes()).decode("ascii")


def attention_data(maps: list[np.ndarray], layers: list[int]) -> dict:
    """Each layer's (H, T, T) probabilities for the page, and the facts its legend states:
    whether anything after the diagonal is nonzero (then the whole square is stored) and
    each row's sum, per head."""
    layouts = ["full" if np.any(np.triu(probs, 1)) else "lower" for probs in maps]
    sums = [probs.astype(np.float64).sum(axis=-1) for probs in maps]  # (H, T) each
    return {
        "layers": layers,
        "fixed_point": FIXED_POINT,
        "layouts": layouts,
        "maps": [[encode_probabilities(p, layout) for p in probs] for probs, layout in zip(maps, layouts)],
        "row_sums": [[[round(float(r.min()), 6), round(float(r.max()), 6)] for r in s] for s in sums],
    }


def check_attention_bytes(n_heads: int, T: int, layouts: list[str]) -> None:
    """Refuse a page whose attention would pass MAX_ATTENTION_BYTES: before the forward
    with every layer's layout "lower", after it with the layouts the data asked for."""
    per_layer = [T * (T + 1) if layout == "lower" else 2 * T * T for layout in layouts]  # bytes per head
    attention_bytes = n_heads * sum(per_layer)
    if attention_bytes > MAX_ATTENTION_BYTES:
        fit = max(1, MAX_ATTENTION_BYTES // (n_heads * max(per_layer)))
        raise MinislmError(
            f"the attention of {len(layouts)} layers x {n_heads} heads over {T} tokens would embed "
            f"{attention_bytes / 2**20:.0f} MiB (the page takes {MAX_ATTENTION_BYTES >> 20}); "
            f"choose at most {fit} layers with --layers, or a shorter prompt"
        )


def model_data(model) -> dict:
    """What the page says about the model: its name, sizes, and the two vocabularies."""
    config = model.config
    return {
        "model": model.path.name if model.path else "model",
        "model_type": config.model_type,
        "quant": model.weights_format.describe(),
        "config": {
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "hidden": config.hidden_size, "vocab": config.vocab_size,
            "sliding_window": config.sliding_window, "tied": bool(config.tie_word_embeddings),
        },
        "vocab": {"embedding": config.vocab_size, "tokenizer": allowed_ids(model) or config.vocab_size},
    }


def lens_data(lens) -> dict:
    return {
        "rows": lens.rows,
        "top_ids": lens.top_ids.tolist(),
        "top_pieces": lens.top_pieces,
        "top_probs": np.round(lens.top_probs, 4).tolist(),
        "next_ranks": lens.next_ranks.tolist(),
        "entropy": np.round(lens.entropy, 4).tolist(),
        "kl_to_final": np.round(lens.kl_to_final, 4).tolist(),
    }


def next_data(tokenizer, final: np.ndarray, top_k: int) -> list[list[dict]]:
    """The top_k next-token candidates after each position, from (T, V) probabilities."""
    best = most_likely(final, top_k)  # (T, k)
    return [
        [{"id": int(i), "piece": tokenizer.token_piece(int(i)), "p": round(float(final[t, i]), 5)} for i in row]
        for t, row in enumerate(best)
    ]


def view_thumbnail(view: np.ndarray, step: int = 6) -> str:
    """A (3, 336, 336) CLIP-normalised view -> base64 of (56, 56, 3) RGB bytes: every
    6th pixel, the normalisation undone, for the page to draw."""
    from ..vision.image import CLIP_MEAN, CLIP_STD

    rgb = view[:, ::step, ::step] * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]
    pixels = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)  # (h, w, 3)
    return base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode("ascii")


def image_data(ids: np.ndarray, images) -> list[dict]:
    """Each image of the shown prompt: how it was cut, its views, where its tokens sit."""
    out = []
    for k, image in enumerate(images, 1):
        positions = np.flatnonzero(ids == -k)
        if not len(positions):
            continue  # after the page's cut
        views = [view_thumbnail(v) for v in image.pixel_values]
        out.append({
            "index": k, "describe": image.describe(), "grid": [int(n) for n in image.grid],
            "tokens": int(len(positions)), "first": int(positions[0]), "last": int(positions[-1]),
            "views": views, "view_size": int(round(image.pixel_values.shape[-1] / 6)),
        })
    return out


def page_data(model, ids: np.ndarray, layers: list[int], top_k: int, truncated_from: int | None,
              image_features: np.ndarray | None = None, images=(), image_steps=()) -> dict:
    """Everything the page shows, as JSON-ready data. With images (Phi-3-vision), `ids`
    hold placeholders, `image_features` their tokens, `images` the processed pictures
    and `image_steps` the recorder's summaries of their encoding."""
    config = model.config
    check_attention_bytes(config.num_attention_heads, len(ids), ["lower"] * len(layers))
    names = ("embed", "resid_post", "logits", "attn_probs", "experts", "expert_weights")
    trace = Recorder(names=names)
    model.logits(ids, trace, image_features=image_features)
    maps = [trace.get("attn_probs", layer) for layer in layers]
    attention = attention_data(maps, layers)
    check_attention_bytes(config.num_attention_heads, len(ids), attention["layouts"])
    lens = lens_from_trace(model, ids, trace)
    steps = SummaryRecorder()
    model.logits(ids, steps, image_features=image_features)
    data = model_data(model) | {
        "tokens": [{"id": int(i), "piece": p} for i, p in zip(ids, pieces(model.tokenizer, ids))],
        "truncated_from": truncated_from,
        "attention": attention,
        "lens": lens_data(lens),
        "next": next_data(model.tokenizer, probabilities(trace.get("logits")), top_k),
        "steps": step_rows(list(image_steps) + steps.summaries),
        "routing": routing_data(model, trace),
        "images": image_data(ids, images) or None,
    }
    return data


def routing_data(model, trace) -> dict | None:
    """PhiMoE: the two experts of every token in every layer, and their weights."""
    if model.config.model_type != "phimoe":
        return None
    return {
        "experts": np.stack(trace.per_layer("experts")).tolist(),  # (L, T, 2)
        "weights": np.round(np.stack(trace.per_layer("expert_weights")), 4).tolist(),
        "num_experts": model.config.num_local_experts,
    }


def render(template: Path, data: dict | None = None) -> str:
    """A page: the template with the shared views and style inline, and `data` too when
    given. Every '<' in the data is written as \\u003c, which JSON reads back as '<', so
    no token piece ('</script>', '<!--') can end or bend the script."""
    html = template.read_text(encoding="utf-8")
    html = html.replace("/*STYLE*/", (HERE / "views.css").read_text(encoding="utf-8"))
    html = html.replace("/*VIEWS*/", (HERE / "views.js").read_text(encoding="utf-8"))
    if data is not None:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
        html = html.replace("/*DATA*/null", payload)
    return html


def run_explain(args) -> int:
    pictures = prompt_images(args)
    model, ids = model_and_prompt(args)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    if args.top_k < 1:
        raise MinislmError(f"--top-k must be >= 1, got {args.top_k}")
    check_reads_images(model, pictures)
    features, images, image_steps = None, (), ()
    if pictures:
        recorder = SummaryRecorder()  # the images' views, patches and tokens, for the steps table
        prompt = model.image_prompt(args.prompt, pictures, args.num_crops, args.system, chat=args.chat, trace=recorder)
        shown = for_image_page(prompt.ids)
        features = prompt.features[: int(np.count_nonzero(shown < 0))]
        ids, images, image_steps = prompt.ids, prompt.images, recorder.summaries
    else:
        shown = for_picture(ids, "the page")
    truncated_from = len(ids) if len(shown) < len(ids) else None
    ids = shown
    html = render(TEMPLATE, page_data(model, ids, layers, args.top_k, truncated_from, features, images, image_steps))
    write_text(args.out, html, "--out")
    print(f"wrote {args.out}: {len(ids)} tokens, {len(layers)} layers, {len(html) / 1024:.0f} KiB; open it in a browser",
          file=sys.stderr)
    return 0
