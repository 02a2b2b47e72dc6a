"""A prompt with pictures and sounds: `<|image_k|>` and `<|audio_k|>` tags -> token ids.

The model card writes Phi-4-multimodal prompts with numbered tags:

    <|user|><|image_1|>What is shown?<|end|><|assistant|>
    <|user|><|audio_1|>Transcribe the audio clip into text.<|end|><|assistant|>

None of these tags is a token. The processor replaces image k's tag by its
placeholder token `<|endoftext10|>` repeated as many times as the image has tokens
(`ProcessedImage.num_tokens`), audio k's by `<|endoftext11|>` repeated
`ProcessedAudio.num_tokens` times, and tokenizes the text (transformers' processor
does exactly this with the tokenizer's image and audio tokens). minislm then marks
the placeholders the way Phi-3-vision's are marked (minislm/vision/prompt.py):
image k's positions hold the id -k, audio k's -(1000 + k), and the decoder's
embedding step puts the encoded vectors there, in order.

The prompt also decides the adapter: the vision LoRA (and the audio projector made
for speech with vision) when a picture is present, the speech LoRA when only sound
is, none for text. That is the hub's remote code's rule (its input modes VISION,
VISION_SPEECH, SPEECH, LANGUAGE) and the one transformers' documentation shows.
"""

import re
from dataclasses import dataclass

import numpy as np

from ..errors import MinislmError
from .audio import ProcessedAudio
from .config import AUDIO_TOKEN, IMAGE_TOKEN
from .image import ProcessedImage

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
AUDIO_TAG = re.compile(r"<\|audio_(\d+)\|>")
AUDIO_MARK = 1000  # audio k's placeholders hold -(AUDIO_MARK + k); image k's hold -k
MAX_ITEMS = 999


@dataclass(frozen=True)
class MultimodalPrompt:
    """Token ids with placeholders, what goes in their place, and the adapter to use.

    ids:      (T,) int64: image k's positions hold -k, audio k's -(1000 + k)
    features: (n, D) float32, one row per placeholder, in position order
    adapter:  "vision", "speech" or None (text only)
    images, audios: the processed inputs, in tag order
    """

    ids: np.ndarray
    features: np.ndarray
    adapter: str | None
    images: tuple[ProcessedImage, ...] = ()
    audios: tuple[ProcessedAudio, ...] = ()

    def spans(self) -> list[tuple[str, int, int]]:
        """[("image 1", first position, last position + 1), ("audio 1", ...)] in order."""
        out, i, ids = [], 0, self.ids
        while i < len(ids):
            if ids[i] >= 0:
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            mark = -int(ids[i])
            out.append((f"audio {mark - AUDIO_MARK}" if mark > AUDIO_MARK else f"image {mark}", i, j))
            i = j
        return out


def adapter_for(n_images: int, n_audios: int) -> str | None:
    """vision with any picture, speech with sound only, none for text."""
    if n_images:
        return "vision"
    return "speech" if n_audios else None


def with_tags(text: str, n_images: int, n_audios: int) -> str:
    """`text` unchanged if it has tags; otherwise all images' then all audios' tags in
    front, as the model card writes them (no separator)."""
    if IMAGE_TAG.search(text) or AUDIO_TAG.search(text) or not (n_images or n_audios):
        return text
    images = "".join(f"<|image_{k}|>" for k in range(1, n_images + 1))
    return images + "".join(f"<|audio_{k}|>" for k in range(1, n_audios + 1)) + text


def check_tags(text: str, pattern: re.Pattern, n: int, kind: str) -> None:
    """One tag per input, numbered 1..n in order of appearance."""
    tags = [int(k) for k in pattern.findall(text)]
    if len(tags) != n:
        given = f"{n} {kind}{'s' * (n != 1)} given"
        raise MinislmError(f"the prompt has {len(tags)} <|{kind}_k|> tag{'s' * (len(tags) != 1)} but {given}; "
                           f"use one tag per {kind}")
    if tags != list(range(1, n + 1)):
        raise MinislmError(f"{kind} tags must be <|{kind}_1|> ... <|{kind}_{n}|>, each once and in that order; "
                           "the prompt has " + " ".join(f"<|{kind}_{k}|>" for k in tags))
    if n > MAX_ITEMS:
        raise MinislmError(f"at most {MAX_ITEMS} {kind}s in one prompt, got {n}")


def placeholder_ids(tokenizer, mm=None) -> tuple[int, int]:
    """The ids of `<|endoftext10|>` and `<|endoftext11|>`, which must be special tokens.
    A converted config names the ids the model matches: they must be these."""
    image, audio = tokenizer.token_id(IMAGE_TOKEN), tokenizer.token_id(AUDIO_TOKEN)
    if image is None or audio is None:
        raise MinislmError(f"the tokenizer has no {IMAGE_TOKEN} / {AUDIO_TOKEN} tokens, which Phi-4-multimodal "
                           "uses for its image and audio placeholders")
    if mm is not None and mm.layout == "phi4_multimodal" and (image, audio) != (mm.image_token_id, mm.audio_token_id):
        raise MinislmError(f"config.json's image_token_id / audio_token_id ({mm.image_token_id}, {mm.audio_token_id}) "
                           f"are not the tokenizer's {IMAGE_TOKEN} / {AUDIO_TOKEN} ({image}, {audio})")
    return image, audio


def tokenize_with_media(tokenizer, text: str, image_tokens: list[int], audio_tokens: list[int], mm=None) -> np.ndarray:
    """Text with tags -> ids: each tag becomes its placeholder token (tokenized with the
    rest, as transformers' processor does), then each placeholder is repeated and
    marked: image k -> [-k] x image_tokens[k-1], audio k -> [-(1000+k)] x audio_tokens[k-1]."""
    check_tags(text, IMAGE_TAG, len(image_tokens), "image")
    check_tags(text, AUDIO_TAG, len(audio_tokens), "audio")
    image_id, audio_id = placeholder_ids(tokenizer, mm)
    for token in (IMAGE_TOKEN, AUDIO_TOKEN):
        if token in text:
            raise MinislmError(f"the prompt holds {token}, the model's own placeholder token; write <|image_k|> / "
                               "<|audio_k|> tags instead")
    flat = AUDIO_TAG.sub(AUDIO_TOKEN, IMAGE_TAG.sub(IMAGE_TOKEN, text))
    ids: list[int] = []
    counters = {image_id: 0, audio_id: 0}
    for token in tokenizer.encode(flat):
        if token == image_id:
            counters[token] += 1
            ids.extend([-counters[token]] * image_tokens[counters[token] - 1])
        elif token == audio_id:
            counters[token] += 1
            ids.extend([-(AUDIO_MARK + counters[token])] * audio_tokens[counters[token] - 1])
        else:
            ids.append(token)
    if counters[image_id] != len(image_tokens) or counters[audio_id] != len(audio_tokens):
        raise MinislmError("the tokenizer did not keep the placeholder tokens whole; is this Phi-4-multimodal's tokenizer?")
    return np.array(ids, dtype=np.int64)


def as_picture(image):
    """A path (opened and checked, keeping its mode) or a Pillow image, as it is."""
    from ..vision.image import open_image

    return open_image(image, mode=None) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else image


def build_multimodal_prompt(model, text: str, images=(), audios=(), trace=None, max_crops=None,
                            memo: dict | None = None) -> MultimodalPrompt:
    """Final prompt text (chat template already applied) with tags, images (paths,
    Pillow images or ProcessedImage) and audios (paths, bytes, (samples, rate) or
    ProcessedAudio) -> ids with placeholders, their vectors and the adapter.

    `memo` (a dict the caller keeps) remembers each processed input's vectors, so a
    chat that encodes its whole conversation every turn runs each encoder once per
    input (an audio's vectors depend on whether a picture is present: two entries)."""
    from ..model import NO_TRACE
    from .audio import process_audio
    from .audio_embedding import encode_audio
    from .image import process_image
    from .image_embedding import encode_image

    mm = model.config.phi4mm
    if mm is None:
        raise MinislmError(f"{model.path}: a {model.config.model_type} model reads no audio; pictures and sound "
                           "together need Phi-4-multimodal (phi4mm)")
    check_tags(text, IMAGE_TAG, len(images), "image")
    check_tags(text, AUDIO_TAG, len(audios), "audio")
    crops = mm.max_crops if max_crops is None else max_crops
    pictures = tuple(p if isinstance(p, ProcessedImage) else process_image(as_picture(p), crops) for p in images)
    sounds = tuple(a if isinstance(a, ProcessedAudio) else process_audio(a) for a in audios)
    ids = tokenize_with_media(model.tokenizer, text, [p.num_tokens for p in pictures], [a.num_tokens for a in sounds], mm)
    trace = NO_TRACE if trace is None else trace
    memo = {} if memo is None else memo

    def remembered(key, compute):
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    with_image = bool(pictures)
    encoded = {-(k + 1): remembered((id(p), None), lambda p=p: encode_image(mm, model.weights, p, trace))
               for k, p in enumerate(pictures)}
    encoded.update({-(AUDIO_MARK + k + 1): remembered((id(a), with_image),
                                                      lambda a=a: encode_audio(mm, model.weights, a, with_image, trace))
                    for k, a in enumerate(sounds)})
    order = list(dict.fromkeys(int(i) for i in ids if i < 0))  # the items in order of position
    D = model.config.hidden_size
    features = np.concatenate([encoded[mark] for mark in order]) if order else np.zeros((0, D), np.float32)
    return MultimodalPrompt(ids, features, adapter_for(len(pictures), len(sounds)), pictures, sounds)
