"""What the watch commands share: the model, the prompt's ids and their pieces, layer
lists, output files, and the cap on what a picture shows."""

import sys
from pathlib import Path

import numpy as np

from ..commands import load_model
from ..errors import MinislmError

# A picture (and the explorer page) shows at most this many tokens: more labels than
# this do not fit an axis, and the page's attention maps grow with its square.
MAX_PICTURE_TOKENS = 128


def model_and_prompt(args):
    """The loaded model and PROMPT's ids (plain text, or a chat turn with --chat)."""
    for flag in ("png", "json", "out"):
        check_output_path(getattr(args, flag, None), "--" + flag)
    if getattr(args, "png", None):
        from .plots import require_matplotlib

        require_matplotlib()
    model = load_model(args)
    ids = encode_prompt(model.tokenizer, args, model.path)
    if ids.size > model.config.max_position_embeddings:
        raise MinislmError(
            f"PROMPT is {ids.size} tokens, longer than the model's context of {model.config.max_position_embeddings}"
        )
    return model, ids


def prompt_images(args) -> list:
    """--image files, decoded before the model loads (a bad file fails at once), and
    the flags that only make sense with them."""
    from ..commands import open_images

    pictures = open_images(args.image)
    if args.num_crops is not None and not pictures:
        raise MinislmError("--num-crops: applies to --image only")
    if pictures and getattr(args, "no_bos", False):
        raise MinislmError("--no-bos: with --image every text chunk starts with BOS, as Phi-3-vision's processor does")
    return pictures


def check_reads_images(model, pictures) -> None:
    """A one-line error when --image meets a model that cannot read images."""
    if pictures and model.config.vision is None:
        from ..commands import check_reads_images as refuse

        refuse(model, pictures)


def encode_prompt(tokenizer, args, folder) -> np.ndarray:
    """PROMPT as plain text (BOS as the tokenizer config says, none with --no-bos) or,
    with --chat, as a user turn of the chat template, exactly as `generate` feeds it."""
    if args.system and not args.chat:
        raise MinislmError("--system needs --chat (a system message only exists in the chat template)")
    if args.chat and args.no_bos:
        raise MinislmError("--no-bos is for plain text; with --chat the template decides about BOS")
    if args.chat and not tokenizer.chat_template:
        raise MinislmError(f"--chat: {folder} has no chat template")
    if args.chat:  # the template writes BOS and the special tokens itself
        ids = tokenizer.encode(tokenizer.render_chat(chat_messages(args)), add_bos=False)
    else:
        ids = tokenizer.encode(args.prompt, add_bos=False if args.no_bos else None)
    ids = np.array(ids, dtype=np.int64)
    if ids.size == 0:
        raise MinislmError("PROMPT gives no tokens: give some text")
    return ids


def shown_path(path) -> str:
    """A model folder as a reader would type it: relative to here when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def chat_messages(args) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": args.prompt}]


def pieces(tokenizer, ids) -> list[str]:
    """The vocabulary entry of each id, '▁' word starts and '<0xNN>' bytes as they are;
    an image placeholder (Phi-3-vision: image k's positions hold -k) as '<image_k>'."""
    return [tokenizer.token_piece(int(i)) if i >= 0 else f"<image_{-int(i)}>" for i in ids]


def for_picture(ids: np.ndarray, what: str) -> np.ndarray:
    """The first MAX_PICTURE_TOKENS ids, saying so when the prompt is longer. In a causal
    model the first n positions do not depend on what follows, so they are exact."""
    return ids[: picture_tokens(len(ids), what, "(what a causal model computes for them does not depend on the rest)")]


def for_image_page(ids: np.ndarray) -> np.ndarray:
    """An image prompt for the page: every image token, and text tokens up to
    MAX_PICTURE_TOKENS (cut at a text token, so no image is cut in two)."""
    text = np.flatnonzero(ids >= 0)
    if len(text) <= MAX_PICTURE_TOKENS:
        return ids
    end = int(text[MAX_PICTURE_TOKENS])
    print(f"minislm: note: the page shows the first {end} of {len(ids)} tokens ({MAX_PICTURE_TOKENS} text tokens "
          "and the images among them)", file=sys.stderr)
    return ids[:end]


def picture_tokens(n: int, what: str, why: str = "") -> int:
    """How many of n tokens a picture shows, with a note on stderr when not all."""
    if n <= MAX_PICTURE_TOKENS:
        return n
    print(f"minislm: note: {n} tokens; {what} shows the first {MAX_PICTURE_TOKENS} {why}".rstrip(), file=sys.stderr)
    return MAX_PICTURE_TOKENS


def parse_layers(text: str | None, n_layers: int, flag: str = "--layers") -> list[int]:
    """'0,2-3' -> [0, 2, 3]; None -> every layer. Negative numbers count from the end."""
    if text is None:
        return list(range(n_layers))
    layers = set()
    for part in text.split(","):
        bounds = part.strip().split("-") if not part.strip().startswith("-") else [part.strip()]
        try:
            numbers = [int(b) for b in bounds]
        except ValueError:
            raise MinislmError(f"{flag}: expected layer numbers like 0,2-3, got {text!r}") from None
        if len(numbers) > 2 or len(numbers) == 2 and numbers[0] > numbers[1]:
            raise MinislmError(f"{flag}: {part.strip()!r} is not a layer or a range a-b with a <= b")
        for n in range(numbers[0], numbers[-1] + 1):
            layers.add(check_layer(n, n_layers, flag))
    return sorted(layers)


def check_layer(layer: int, n_layers: int, flag: str = "--layer") -> int:
    if not -n_layers <= layer < n_layers:
        raise MinislmError(f"{flag}: layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
    return layer % n_layers


def check_output_path(path: str | None, flag: str) -> None:
    """Fail before any work when the file cannot be written where asked."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise MinislmError(f"{flag}: the folder of {path} does not exist")


def write_text(path: str, text: str, flag: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise MinislmError(f"{flag}: cannot write {path} ({e.strerror})") from None
