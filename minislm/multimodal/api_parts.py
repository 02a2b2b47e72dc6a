"""OpenAI-style content parts -> a prompt with `<|image_k|>` / `<|audio_k|>` tags.

The chat completions API sends a user turn's content as a list of parts:

    {"type": "text", "text": "What is in this picture?"}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}}
    {"type": "input_audio", "input_audio": {"data": "UklGR...", "format": "wav"}}

`messages_with_media` turns such messages into plain-text messages for the chat
template (each picture or sound replaced by its tag, numbered over the whole
conversation) plus the decoded pictures and processed recordings, in tag order:
what `Model.multimodal_prompt` and `build_multimodal_prompt` take.

Only data URLs are accepted: a server that fetched `http(s)://` addresses on a
client's behalf could be made to reach anything its network can. Pictures are
checked by Pillow's header (size, decompression-bomb limit) and recordings by
libsndfile's (length, rate) before they are decoded. WAV at any rate is resampled;
mp3 needs a libsndfile with MP3 (1.1 or newer, as soundfile's wheels carry).
Every problem is a MinislmError naming the part (`messages[1].content[2]`), which a
server answers with 400.
"""

import base64
import binascii
import io
import re

from ..errors import MinislmError

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
MAX_PART_BYTES = 64 << 20  # a data URL larger than this is refused before it is decoded
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,(?P<data>.*)$", re.DOTALL)


def decode_base64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise MinislmError(f"{where}: expected base64 text")
    if len(text) > MAX_PART_BYTES * 4 // 3 + 4:
        raise MinislmError(f"{where}: larger than {MAX_PART_BYTES >> 20} MiB")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MinislmError(f"{where}: not valid base64") from None


def image_from_url(url, where: str):
    """A `data:image/...;base64,` URL -> a Pillow image, checked before decoding."""
    from ..vision.image import require_pillow

    if not isinstance(url, str):
        raise MinislmError(f"{where}.image_url.url: expected a string")
    match = DATA_URL.match(url)
    if match is None:
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise MinislmError(f"{where}.image_url.url: only data URLs (data:image/...;base64,...) are accepted, "
                           f"not {scheme}: this server fetches nothing from the network")
    data = decode_base64(match["data"], f"{where}.image_url.url")
    Image = require_pillow()
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.width * image.height > limit:
            raise MinislmError(f"{where}: a {image.width}x{image.height} picture, more than {limit} pixels")
        image.load()
    except MinislmError:
        raise
    except Image.DecompressionBombError:
        raise MinislmError(f"{where}: more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS}") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MinislmError(f"{where}: not an image Pillow can read ({str(e).splitlines()[0][:80]})") from None
    return image


def audio_from_part(part, where: str):
    """{"data": base64, "format": "wav" | "mp3" | ...} -> ProcessedAudio (16 kHz log-mel)."""
    from .audio import process_audio, require_audio_libraries

    if not isinstance(part, dict):
        raise MinislmError(f"{where}.input_audio: expected an object with 'data' and 'format'")
    kind = part.get("format")
    if kind not in AUDIO_FORMATS:
        raise MinislmError(f"{where}.input_audio.format: {kind!r:.20} is not one of {', '.join(AUDIO_FORMATS)}")
    soundfile, _ = require_audio_libraries()
    if kind == "mp3" and "MP3" not in soundfile.available_formats():
        raise MinislmError(f"{where}: mp3 needs libsndfile 1.1 or newer (this one is {soundfile.__libsndfile_version__}); "
                           "send wav")
    return process_audio(decode_base64(part.get("data"), f"{where}.input_audio.data"), name=where)


def messages_with_media(messages: list) -> tuple[list[dict], list, list]:
    """Chat messages whose content may be lists of parts -> (messages with text content
    and tags, pictures, recordings). The parts of one message are joined with newlines,
    in their order (as the server joins text parts, and vLLM does)."""
    plain, images, audios = [], [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            plain.append(message)
            continue
        pieces = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise MinislmError(f"{where}.text: expected a string")
                pieces.append(part["text"])
            elif kind == "image_url":
                url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
                images.append(image_from_url(url, where))
                pieces.append(f"<|image_{len(images)}|>")
            elif kind == "input_audio":
                audios.append(audio_from_part(part.get("input_audio"), where))
                pieces.append(f"<|audio_{len(audios)}|>")
            else:
                raise MinislmError(f"{where}.type: {kind!r:.20} is not one of text, image_url, input_audio")
        plain.append({**message, "content": "\n".join(pieces)})
    return plain, images, audios
