"""A prompt with pictures: `<|image_k|>` tags -> token ids with placeholders.

`<|image_1|>` is not a token. Phi-3-vision's processor splits the prompt text at
its `<|image_k|>` tags, tokenizes each piece of text on its own (so each piece
starts with its own BOS, `<s>`), and puts image k's placeholders between them:
the id -k, repeated as many times as image k has tokens (`num_image_tokens`).

    "<|user|>\\n<|image_1|>\\nWhat is shown?<|end|>\\n<|assistant|>\\n", a 500x300 photo, 4 crops
    -> [<s> <|user|> ▁ \\n] [-1 x 757] [<s> ▁ \\n What ▁is ▁shown ? <|end|> ▁ \\n <|assistant|>]

The decoder's embedding step puts the image's 757 feature vectors where the -1s
are (`model.embed`). Tags must be numbered 1..n in order of appearance, one per
image: the reference fills the placeholders with the images in order, whatever
their numbers say, so anything else would silently pair tags and pictures wrongly.
"""

import re
from dataclasses import dataclass

import numpy as np

from ..errors import MinislmError
from .image import ProcessedImage

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")


@dataclass(frozen=True)
class ImagePrompt:
    """Token ids with image placeholders, and what goes in their place.

    ids:      (T,) int64; image k's positions hold -k
    features: (n, D) float32, one row per placeholder, in order of position
    images:   the processed images, in tag order (their pixels, grid, token count)
    """

    ids: np.ndarray
    features: np.ndarray
    images: tuple[ProcessedImage, ...]


def image_tags(text: str) -> list[int]:
    """The k of every <|image_k|> tag in `text`, in order."""
    return [int(k) for k in IMAGE_TAG.findall(text)]


def with_image_tags(text: str, n_images: int) -> str:
    """`text` unchanged if it has tags; otherwise the tags of all images in front,
    one per line, as Phi-3-vision's model cards write them."""
    if n_images == 0 or image_tags(text):
        return text
    return "".join(f"<|image_{k}|>\n" for k in range(1, n_images + 1)) + text


def check_image_tags(text: str, n_images: int) -> None:
    """One tag per image, numbered 1..n in order of appearance."""
    tags = image_tags(text)
    if len(tags) != n_images:
        given = f"{n_images} image{'s' * (n_images != 1)} given"
        raise MinislmError(f"the prompt has {len(tags)} <|image_k|> tag{'s' * (len(tags) != 1)} but {given}; use one tag per image")
    if tags != list(range(1, n_images + 1)):
        raise MinislmError(
            f"image tags must be <|image_1|> ... <|image_{n_images}|>, each once and in that order; the prompt has "
            + " ".join(f"<|image_{k}|>" for k in tags)
        )


def tokenize_with_images(tokenizer, text: str, tokens_per_image: list[int]) -> np.ndarray:
    """Text with <|image_k|> tags -> ids: each text chunk encoded alone (with the BOS the
    tokenizer adds to any text), image k's tag replaced by -k x tokens_per_image[k-1]."""
    check_image_tags(text, len(tokens_per_image))
    chunks = IMAGE_TAG.split(text)[::2]  # split() also returns the captured numbers: skip them
    ids: list[int] = []
    for k, chunk in enumerate(chunks, 1):
        ids.extend(tokenizer.encode(chunk))
        if k <= len(tokens_per_image):
            ids.extend([-k] * tokens_per_image[k - 1])
    return np.array(ids, dtype=np.int64)


def as_picture(image):
    """A path (opened and checked with `open_image`) or a Pillow image, as it is."""
    from .image import open_image

    return open_image(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else image


def build_image_prompt(model, text: str, images, num_crops: int | None = None, trace=None) -> ImagePrompt:
    """Final prompt text (chat template already applied) and images (paths, Pillow
    images or ProcessedImage) -> ids with placeholders and the encoded images, in tag order."""
    from ..model import NO_TRACE
    from .embedding import encode_image
    from .image import check_num_crops, process_image

    vision = model.config.vision
    if model.config.phi4mm is not None:
        raise MinislmError(f"{model.path}: Phi-4-multimodal takes pictures (and sound) through "
                           "Model.multimodal_prompt, which also chooses its adapter")
    if vision is None:
        raise MinislmError(
            f"{model.path}: a {model.config.model_type} model has no image encoder; "
            "images need a phi3_v model (Phi-3-vision, Phi-3.5-vision)"
        )
    num_crops = vision.num_crops if num_crops is None else num_crops
    check_num_crops(num_crops)
    check_image_tags(text, len(images))
    processed = tuple(p if isinstance(p, ProcessedImage) else process_image(as_picture(p), num_crops) for p in images)
    ids = tokenize_with_images(model.tokenizer, text, [p.num_tokens for p in processed])
    trace = NO_TRACE if trace is None else trace
    features = [encode_image(vision, model.weights, p, trace) for p in processed]
    D = model.config.hidden_size
    return ImagePrompt(ids, np.concatenate(features) if features else np.zeros((0, D), np.float32), processed)
