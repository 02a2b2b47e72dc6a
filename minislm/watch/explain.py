"""`python -m minislm explain PROMPT --out explain.html`: one page to explore a forward pass.

The page is a single file: the numbers inline as JSON, plain JavaScript drawing
them on a canvas, nothing fetched from anywhere, so it opens offline and can be
mailed or committed. A learner picks a layer and a head and sees that head's
attention over the prompt's tokens, the logit lens, the next-token distribution
at any position, the shape and statistics of every step, (PhiMoE) the routing, and
(Phi-3-vision and Phi-4-multimodal, `--image`) each image's views and the positions its
tokens fill, and (Phi-4-multimodal, `--audio`) each recording's spectrogram and its
tokens' positions, with the adapter the decoder ran with.

What it embeds is bounded: at most MAX_PICTURE_TOKENS tokens, attention stored as
16-bit fixed point for the causal lower triangle only, and at most
MAX_ATTENTION_BYTES of it (choose layers with --layers past that).
"""

import base64
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import MinislmError
from ..media_commands import check_reads_audio
from ..trace import Recorder, SummaryRecorder
from .inputs import (check_reads_images, for_image_page, for_picture, model_and_prompt, parse_layers, pieces,
                     prompt_images, write_text)
from .lens import lens_from_trace, probabilities
from .media import audio_data, multimodal_prompt, prompt_audios

TEMPLATE = Path(__file__).with_name("explain.html")
MAX_ATTENTION_BYTES = 16 << 20
FIXED_POINT = 65535  # a probability p is stored as round(p * 65535): steps of 1.5e-5


def lower_triangle_u16(p: np.ndarray) -> str:
    """(T, T) probabilities -> base64 of uint16 little-endian: row t holds keys 0..t only
    (the rest is 0 by the causal mask), so T(T+1)/2 numbers."""
    rows, cols = np.tril_indices(p.shape[0])
    fixed = np.round(np.clip(p[rows, cols], 0, 1) * FIXED_POINT).astype("<u2")
    return base64.b64encode(fixed.tobytes()).decode("ascii")


def view_thumbnail(view: np.ndarray, step: int = 6, mean=None, std=None) -> str:
    """A (3, 336, 336) CLIP-normalised view (or another `mean`/`std`) -> base64 of
    (56, 56, 3) RGB bytes: every 6th pixel, the normalisation undone, for the page to draw."""
    from ..vision.image import CLIP_MEAN, CLIP_STD

    mean = CLIP_MEAN if mean is None else np.asarray(mean, np.float32)
    std = CLIP_STD if std is None else np.asarray(std, np.float32)
    rgb = view[:, ::step, ::step] * std.reshape(-1, 1, 1) + mean.reshape(-1, 1, 1)
    pixels = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)  # (h, w, 3)
    return base64.b64encode(np.ascontiguousarray(pixels).tobytes()).decode("ascii")


def image_data(ids: np.ndarray, images) -> list[dict]:
    """Each image of the shown prompt: how it was cut, its views, where its tokens sit."""
    out = []
    for k, image in enumerate(images, 1):
        positions = np.flatnonzero(ids == -k)
        if not len(positions):
            continue  # after the page's cut
        # Phi-4-multimodal's views are (x - 0.5) / 0.5 of [0, 1] pixels; Phi-3-vision's CLIP-normalised
        scale = {"mean": [0.5] * 3, "std": [0.5] * 3} if hasattr(image, "patch_mask") else {}
        views = [view_thumbnail(v, **scale) for v in image.pixel_values]
        out.append({
            "index": k, "describe": image.describe(), "grid": [int(n) for n in image.grid],
            "tokens": int(len(positions)), "first": int(positions[0]), "last": int(positions[-1]),
            "views": views, "view_size": int(round(image.pixel_values.shape[-1] / 6)),
        })
    return out


def page_data(model, ids: np.ndarray, layers: list[int], top_k: int, truncated_from: int | None,
              image_features: np.ndarray | None = None, images=(), image_steps=(), audios=()) -> dict:
    """Everything the page shows, as JSON-ready data. With images (Phi-3-vision), `ids`
    hold placeholders, `image_features` their tokens, `images` the processed pictures
    and `image_steps` the recorder's summaries of their encoding."""
    config = model.config
    T = len(ids)
    attention_bytes = len(layers) * config.num_attention_heads * T * (T + 1)
    if attention_bytes > MAX_ATTENTION_BYTES:
        fit = max(1, MAX_ATTENTION_BYTES // (config.num_attention_heads * T * (T + 1)))
        raise MinislmError(
            f"the attention of {len(layers)} layers x {config.num_attention_heads} heads over {T} tokens would embed "
            f"{attention_bytes / 2**20:.0f} MiB (the page takes {MAX_ATTENTION_BYTES >> 20}); "
            f"choose at most {fit} layers with --layers, or a shorter prompt"
        )
    names = ("embed", "resid_post", "logits", "attn_probs", "experts", "expert_weights")
    trace = Recorder(names=names)
    model.logits(ids, trace, image_features=image_features)
    lens = lens_from_trace(model, ids, trace)
    final = probabilities(trace.get("logits"))  # (T, V)
    best = np.argsort(-final, axis=-1, kind="stable")[:, :top_k]  # (T, k)
    labels = pieces(model.tokenizer, ids)
    steps = SummaryRecorder()
    model.logits(ids, steps, image_features=image_features)
    summaries = list(image_steps) + steps.summaries
    data = {
        "model": model.path.name if model.path else "model",
        "model_type": config.model_type,
        "quant": model.weights_format.describe(),
        "config": {
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim,
            "hidden": config.hidden_size, "vocab": config.vocab_size,
        },
        "tokens": [{"id": int(i), "piece": p} for i, p in zip(ids, labels)],
        "truncated_from": truncated_from,
        "attention": {
            "layers": layers,
            "fixed_point": FIXED_POINT,
            "maps": [[lower_triangle_u16(p) for p in trace.get("attn_probs", layer)] for layer in layers],
        },
        "lens": {
            "rows": lens.rows,
            "top_pieces": lens.top_pieces,
            "top_probs": np.round(lens.top_probs, 4).tolist(),
            "next_ranks": lens.next_ranks.tolist(),
        },
        "next": [
            [{"id": int(i), "piece": model.tokenizer.token_piece(int(i)), "p": round(float(final[t, i]), 5)} for i in row]
            for t, row in enumerate(best)
        ],
        "steps": [
            {"name": s.name, "layer": s.layer, "shape": list(s.shape), "dtype": s.dtype,
             "mean": s.mean, "std": s.std, "min": s.min, "max": s.max}
            for s in summaries
        ],
        "routing": None,
        "images": image_data(ids, images) or None,
        "audios": audio_data(ids, audios) or None,  # Phi-4-multimodal's recordings
        "adapter": model.adapter.describe() if model.adapter is not None else None,
    }
    if config.model_type == "phimoe":
        data["routing"] = {
            "experts": np.stack(trace.per_layer("experts")).tolist(),  # (L, T, 2)
            "weights": np.round(np.stack(trace.per_layer("expert_weights")), 4).tolist(),
            "num_experts": config.num_local_experts,
        }
    return data


def render(data: dict) -> str:
    """The template with the data inline. Every '<' is written as \\u003c, which JSON
    reads back as '<', so no token piece ('</script>', '<!--') can end or bend the script."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return TEMPLATE.read_text(encoding="utf-8").replace("/*DATA*/null", payload)


def run_explain(args) -> int:
    pictures, audios = prompt_images(args), prompt_audios(args)
    model, ids = model_and_prompt(args)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    if args.top_k < 1:
        raise MinislmError(f"--top-k must be >= 1, got {args.top_k}")
    check_reads_images(model, pictures)
    check_reads_audio(model, audios)
    features, images, image_steps = None, (), ()
    if model.config.phi4mm is not None and (pictures or audios):  # the encoders, then the prompt's adapter
        recorder = SummaryRecorder()
        prompt, model = multimodal_prompt(model, args, pictures, audios, recorder)
        shown = for_image_page(prompt.ids)
        features = prompt.features[: int(np.count_nonzero(shown < 0))]
        ids, images, image_steps = prompt.ids, prompt.images, recorder.summaries
    elif pictures:
        recorder = SummaryRecorder()  # the images' views, patches and tokens, for the steps table
        prompt = model.image_prompt(args.prompt, pictures, args.num_crops, args.system, chat=args.chat, trace=recorder)
        shown = for_image_page(prompt.ids)
        features = prompt.features[: int(np.count_nonzero(shown < 0))]
        ids, images, image_steps = prompt.ids, prompt.images, recorder.summaries
    else:
        shown = for_picture(ids, "the page")
    truncated_from = len(ids) if len(shown) < len(ids) else None
    ids = shown
    html = render(page_data(model, ids, layers, args.top_k, truncated_from, features, images, image_steps, audios))
    write_text(args.out, html, "--out")
    print(f"wrote {args.out}: {len(ids)} tokens, {len(layers)} layers, {len(html) / 1024:.0f} KiB; open it in a browser",
          file=sys.stderr)
    return 0
