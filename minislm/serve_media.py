"""The server's pictures and sounds: chat messages with `image_url` / `input_audio`
parts -> a prompt with placeholders, their vectors, and the adapter they choose.

    messages with parts --api_parts--> text with <|image_k|> / <|audio_k|> tags,
                                       Pillow pictures, 16 kHz log-mel recordings
                     --chat template--> the prompt text
                     --processor-------> crops and mel frames: how many tokens each takes
                     --length check----> refused here if the context cannot hold it
                     --encoders--------> the placeholders' vectors (k, D), made later

Phi-4-multimodal reads both, under the LoRA adapter its media choose (vision with a
picture, speech with sound alone); Phi-3-vision reads pictures, with no adapter. The
tags and the prompt are the ones `minislm generate --image/--audio` and
`Model.multimodal_prompt` / `Model.image_prompt` build, so the same prompt gives the
same tokens. The pictures and sounds come only as data (data URLs, base64 audio):
nothing is fetched from the network. Every problem is a 400 naming the part.

Decoding, checking and cutting run in the request's own thread, before it waits for
the model (Pillow, libsndfile, NumPy). The encoders are left to `encode`, which the
scheduler runs on its own thread when the request's turn comes (minislm/batch.py):
they use Numba's kernels, whose threading layer may not take parallel calls from two
threads at once, and the request then decodes alone anyway.
"""

from collections.abc import Callable

import re
from dataclasses import dataclass

import numpy as np

from .errors import MinislmError
from .openai_api import MEDIA_PARTS, ApiError

PART = re.compile(r"^(messages\[\d+\]\.content\[\d+\])")


@dataclass(frozen=True)
class MediaPrompt:
    """ids (T,) with placeholders; `encode()` makes their vectors (k, D), in position
    order; the adapter ("vision", "speech" or None)."""

    ids: list[int]
    encode: Callable[[], np.ndarray]
    adapter: str | None


def first_part(messages, kind: str | tuple[str, ...] = MEDIA_PARTS) -> str | None:
    """Where the first part of `kind` sits: 'messages[i].content[j]', or None."""
    for i, message in enumerate(messages):
        if isinstance(message["content"], list):
            for j, part in enumerate(message["content"]):
                if part.get("type") in kind:
                    return f"messages[{i}].content[{j}]"
    return None


def check_model_reads(model, messages) -> None:
    """Refuse, before decoding anything, media the model has no encoder for."""
    config = model.config
    if config.phi4mm is not None:
        return
    sound = first_part(messages, "input_audio")
    if config.vision is not None and sound is not None:
        raise ApiError(400, f"{sound}: this server's model is a {config.model_type} model, which reads pictures but "
                       "cannot hear (Phi-4-multimodal can)", param=sound, code="unsupported_content")
    if config.vision is None:
        where = first_part(messages)
        raise ApiError(400, f"{where}: this server's model is a {config.model_type} model, which reads text only "
                       "(pictures need Phi-3-vision or Phi-4-multimodal, sound Phi-4-multimodal)",
                       param=where, code="unsupported_content")


def media_prompt(model, messages, fits) -> MediaPrompt:
    """Chat messages with media parts -> MediaPrompt. `fits(n_tokens)` raises the
    server's context error; it is called once the pictures are cut into crops and the
    sounds into frames (their token counts known), before either encoder runs."""
    from .multimodal.api_parts import messages_with_media

    check_model_reads(model, messages)
    if not model.tokenizer.chat_template:
        raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        plain, pictures, sounds = messages_with_media(list(messages))
        text = model.tokenizer.render_chat(plain)
        if model.config.phi4mm is not None:
            return phi4mm_prompt(model, text, pictures, sounds, fits)
        return phi3_vision_prompt(model, text, pictures, fits)
    except MinislmError as e:
        where = PART.match(str(e))
        raise ApiError(400, str(e), param=where[1] if where else "messages") from None


def phi4mm_prompt(model, text: str, pictures: list, sounds: list, fits) -> MediaPrompt:
    from .multimodal.image import process_image
    from .multimodal.prompt import adapter_for, build_multimodal_prompt, tokenize_with_media

    mm = model.config.phi4mm
    processed = [process_image(p, mm.max_crops) for p in pictures]
    ids = tokenize_with_media(model.tokenizer, text, [p.num_tokens for p in processed], [s.num_tokens for s in sounds], mm)
    fits(len(ids))
    adapter = adapter_for(len(processed), len(sounds))
    return MediaPrompt([int(t) for t in ids], lambda: build_multimodal_prompt(model, text, processed, sounds).features,
                       adapter)


def phi3_vision_prompt(model, text: str, pictures: list, fits) -> MediaPrompt:
    from .vision.image import process_image
    from .vision.prompt import build_image_prompt, tokenize_with_images

    processed = [process_image(p, model.config.vision.num_crops) for p in pictures]
    ids = tokenize_with_images(model.tokenizer, text, [p.num_tokens for p in processed])
    fits(len(ids))
    return MediaPrompt([int(t) for t in ids], lambda: build_image_prompt(model, text, processed).features, None)
