"""What `generate` and `chat` do with sound, Phi-4-multimodal's pictures and LoRA adapters.

    --audio PATH       a sound file, read and turned into features before the model loads
    --image PATH       (Phi-4-multimodal here; Phi-3-vision's path is in commands.py)
    --lora DIR         a PEFT adapter on the decoder, for any Phi model
    --merge-lora       that adapter, or Phi-4-multimodal's own, merged into the weights
    /image, /audio     in chat: a picture or a recording for the next turn

Phi-4-multimodal chooses its adapter from the prompt (minislm/multimodal/prompt.py):
the vision LoRA when a picture is present, the speech LoRA for sound alone, none for
text. In a chat the whole conversation counts, so the adapter can change between
turns; the KV cache then starts over, since every cached key was computed with the
other adapter's weights.
"""

import sys
import time

from .errors import MinislmError


def process_audios(paths) -> list:
    """--audio files as log-mel features (each a one-line error if it cannot be read)."""
    if not paths:
        return []
    from .multimodal.audio import process_audio

    return [process_audio(path) for path in paths]


def check_reads_audio(model, audios) -> None:
    if audios and model.config.phi4mm is None:
        raise MinislmError(f"--audio: {model.path} is a {model.config.model_type} model, which cannot hear "
                           "(Phi-4-multimodal can)")


def apply_lora_flags(model, args):
    """--lora DIR (and --merge-lora): the model with that PEFT adapter on its decoder."""
    lora, merge = getattr(args, "lora", None), getattr(args, "merge_lora", False)
    if lora is None:
        if merge and model.config.phi4mm is None:
            raise MinislmError("--merge-lora needs --lora DIR (or a Phi-4-multimodal model, whose own adapter it merges)")
        return model
    if model.config.phi4mm is not None:
        raise MinislmError(f"--lora: {model.path} is Phi-4-multimodal, which runs its own vision and speech adapters; "
                           "--lora is for the other Phi models")
    from .lora import read_peft_adapter

    adapter = read_peft_adapter(lora, model.weights, model.config)
    print(f"[adapter {adapter.describe()}{', merged' if merge else ''}]", file=sys.stderr)
    return model.with_adapter(adapter, merge=merge)


def encode_multimodal_prompt(model, prompt: str, pictures: list, audios: list, args):
    """Phi-4-multimodal's prompt -> (the model with the prompt's adapter, ids, features)."""
    start = time.perf_counter()
    mm_prompt = model.multimodal_prompt(prompt, pictures, audios, args.system, chat=not args.no_chat_template,
                                        max_crops=args.num_crops)
    seconds = time.perf_counter() - start
    describe_inputs(mm_prompt, seconds)
    return with_prompt_adapter(model, mm_prompt.adapter, args), mm_prompt.ids, mm_prompt.features


def describe_inputs(mm_prompt, seconds: float, file=sys.stderr) -> None:
    spans = {name: (a, b) for name, a, b in mm_prompt.spans()}
    for k, image in enumerate(mm_prompt.images, 1):
        a, b = spans[f"image {k}"]
        print(f"[image {k}: {image.describe()}, positions {a}..{b - 1}]", file=file)
    for k, audio in enumerate(mm_prompt.audios, 1):
        a, b = spans[f"audio {k}"]
        print(f"[audio {k}: {audio.describe()}, positions {a}..{b - 1}]", file=file)
    if mm_prompt.images or mm_prompt.audios:
        print(f"[encoded in {seconds:.2f} s; adapter: {mm_prompt.adapter}]", file=file)


def with_prompt_adapter(model, adapter: str | None, args):
    return model.with_adapter(adapter, merge=getattr(args, "merge_lora", False) and adapter is not None)


class ChatMedia:
    """The pictures and recordings of a Phi-4-multimodal chat (`/image PATH`, `/audio PATH`).

    Each is processed once when attached and tagged <|image_k|> / <|audio_k|> (numbered
    over the whole conversation) at the start of the next user turn; every turn the
    whole conversation is encoded again and the cache keeps what it can reuse.
    """

    def __init__(self, model, args):
        self.base, self.args = model, args
        self.images, self.audios = [], []  # processed, in tag order
        self.pending_images = self.pending_audios = 0
        self.adapter = None  # the adapter of the last turn sent
        self.memo = {}  # each input's vectors, encoded once (see build_multimodal_prompt)

    def attach(self, kind: str, path: str) -> None:
        from .multimodal.audio import process_audio
        from .multimodal.image import process_image
        from .multimodal.prompt import as_picture

        try:
            if not path:
                raise MinislmError(f"/{kind} needs a file: /{kind} PATH")
            start = time.perf_counter()
            if kind == "image":
                crops = self.args.num_crops or self.base.config.phi4mm.max_crops
                item = process_image(as_picture(path), crops)
                self.images.append(item)
                self.pending_images += 1
                n = len(self.images)
            else:
                item = process_audio(path)
                self.audios.append(item)
                self.pending_audios += 1
                n = len(self.audios)
        except MinislmError as e:  # the chat goes on
            print(f"minislm: error: {e}", file=sys.stderr)
            return
        print(f"[{kind} {n}: {item.describe()}; read in {time.perf_counter() - start:.2f} s]", file=sys.stderr)

    def tags_for_next_turn(self) -> str:
        first_image = len(self.images) - self.pending_images + 1
        first_audio = len(self.audios) - self.pending_audios + 1
        return ("".join(f"<|image_{k}|>" for k in range(first_image, len(self.images) + 1))
                + "".join(f"<|audio_{k}|>" for k in range(first_audio, len(self.audios) + 1)))

    def sent(self) -> None:
        self.pending_images = self.pending_audios = 0

    def clear(self) -> None:
        self.images, self.audios = [], []
        self.pending_images = self.pending_audios = 0
        self.adapter = None
        self.memo = {}

    def encode_chat(self, messages):
        """(ids, features) of the whole conversation; `model_for_turn` then holds the
        model with this conversation's adapter."""
        from .multimodal.prompt import build_multimodal_prompt

        text = self.base.tokenizer.render_chat(messages)
        prompt = build_multimodal_prompt(self.base, text, self.images, self.audios, memo=self.memo)
        self.turn_adapter = prompt.adapter
        return prompt.ids, prompt.features

    def model_for_turn(self, cache):
        """The model for the turn just encoded; a changed adapter empties the cache."""
        if self.turn_adapter != self.adapter and cache.length:
            print(f"[adapter {self.adapter} -> {self.turn_adapter}: the cache starts over]", file=sys.stderr)
            cache.truncate(0)
        self.adapter = self.turn_adapter
        return with_prompt_adapter(self.base, self.adapter, self.args)

