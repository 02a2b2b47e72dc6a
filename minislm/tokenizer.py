"""Text <-> token ids, chat templates, and streaming detokenization.

The BPE itself is the `tokenizers` library reading the model's tokenizer.json:
plumbing, not the lesson. Phi-3-small ships no tokenizer.json, only tiktoken's rank
file `cl100k_base.tiktoken`; minislm.tiktoken_bpe builds the same tokenizer from it. What is worth reading here is the streaming decoder:
Phi-3's SentencePiece vocabulary marks a word's leading space with "▁", and
characters outside ASCII may be split across several `<0xNN>` byte tokens, so
decoding one token at a time drops spaces and prints broken characters.
"""

import json
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .chat_sandbox import TIMEOUT_SECONDS, TemplateRenderError, render_bounded
from .config import read_json
from .errors import MinislmError
from .tiktoken_bpe import PHI3_SMALL_RANK_FILE, phi3_small_tokenizer


# What str.isspace() calls whitespace. The tokenizers library strips Rust's
# char::is_whitespace next to an added token marked lstrip/rstrip, and every one of
# those is in here (tests/test_tokenizer.py checks this list against str.isspace).
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + \
    "\u2028\u2029\u202f\u205f\u3000"


class Tokenizer:
    """A tokenizer.json plus the settings from tokenizer_config.json that change encoding."""

    def __init__(
        self, backend: HFTokenizer, special: dict, add_bos: bool, chat_template: str | None, template_source: str = "chat template"
    ):
        self.backend = backend
        self.special = special  # {"bos_token": "<s>", "eos_token": ..., ...} as strings
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.template_source = template_source  # the file it came from, for error messages
        self.template_timeout = TIMEOUT_SECONDS
        self.bos_id = backend.token_to_id(special["bos_token"]) if special.get("bos_token") else None
        # ids the tokenizer can turn back into text; config.vocab_size may be larger
        # (Phi-3: 32064 embedding rows, padded), and those extra ids must never be sampled.
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Plain text to ids; a BOS in front if the tokenizer config asks for one.

        Through `encode_batch` with a batch of one: it lets go of Python's GIL while the
        Rust code works, where `encode` holds it, so a server tokenizing a long prompt in
        one thread would freeze all the others (measured: 1.2 s for a 1 MB text; the
        same CPU time either way)."""
        try:
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError:
            if isinstance(text, str):  # the Rust side takes no lone surrogates ("\ud800")
                raise MinislmError("the text holds a lone surrogate (a half of a UTF-16 pair), which is not text") from None
            raise
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def fewest_tokens(self, text: str) -> int:
        """At least this many ids come from `encode(text, add_bos=False)`, found without
        tokenizing: a text too long for a context is refused before paying for that.

        No token stands for more than L bytes of text, L being the longest piece in the
        vocabulary (pieces hold their text as the model sees it after normalizing, where
        text only grows: a space becomes "▁", 3 bytes). So a text of n bytes needs at least
        n / L tokens. One exception: an added token marked lstrip/rstrip swallows any run of
        whitespace beside it (Phi-3's "</s>" followed by 10,000 spaces is one token), so when
        a text may hold one, its whitespace is not counted. 0 when this tokenizer's
        normalizer or pre-tokenizer could shrink or drop text: then nothing is promised."""
        longest, strip_starts = self.piece_bound
        if not longest:
            return 0
        size = len(text.encode("utf-8", "surrogatepass"))
        if any(c in text for c in strip_starts):
            size -= sum(text.count(c) * len(c.encode("utf-8")) for c in WHITESPACE)
        return -(-size // longest)

    @cached_property
    def piece_bound(self) -> tuple[int, str]:
        """(L, the first characters of the added tokens that swallow whitespace), or (0, "")
        where `fewest_tokens` promises nothing. Reads tokenizer.json once (~0.1 s for Phi-3)."""
        spec = json.loads(self.backend.to_str())
        steps = pipeline_steps(spec.get("normalizer")) + pipeline_steps(spec.get("pre_tokenizer"))
        # without a piece for every byte (byte fallback, or byte-level BPE), an unknown word could be one <unk>
        every_byte = (spec.get("model") or {}).get("byte_fallback") or any(s.get("type") == "ByteLevel" for s in steps)
        if not (every_byte and all(keeps_text(step) for step in steps)):
            return 0, ""
        longest = max((len(piece.encode("utf-8")) for piece in self.backend.get_vocab(with_added_tokens=True)), default=0)
        strip_starts = {t["content"][0] for t in spec.get("added_tokens", []) if t.get("content")
                        and (t.get("lstrip") or t.get("rstrip"))}
        return longest, "".join(sorted(strip_starts))

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_piece(self, token_id: int) -> str:
        """The vocabulary entry of an id as stored, e.g. '▁Paris' (▁ marks a word start)."""
        return self.backend.id_to_token(int(token_id)) or f"<id {token_id}>"

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template's text for these messages.

        Templates come from downloads, so they render in jinja2's sandbox, in a child
        process with limits on time, memory and output (minislm/chat_sandbox.py);
        whatever goes wrong there is one MinislmError naming the template."""
        if not self.chat_template:
            raise MinislmError("this model's tokenizer_config.json has no chat_template; use --no-chat-template")
        variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)
        try:
            return render_bounded(self.chat_template, variables, timeout=self.template_timeout)
        except TemplateRenderError as e:
            raise MinislmError(f"{self.template_source}: chat template: {e}") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Template output already holds any BOS and special tokens, so add nothing."""
        return self.encode(self.render_chat(messages), add_bos=False)


def pipeline_steps(step: dict | None) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer, Sequences flattened."""
    if step is None:
        return []
    if step.get("type") == "Sequence":
        inner = step.get("normalizers") or step.get("pretokenizers") or []
        return [leaf for s in inner for leaf in pipeline_steps(s)]
    return [step]


def keeps_text(step: dict) -> bool:
    """Whether a normalizer or pre-tokenizer step never shrinks or drops text: the steps
    Phi-3's and byte-level BPE's tokenizers use. Anything else is not assumed to."""
    kind = step.get("type")
    if kind == "Replace":
        pattern = (step.get("pattern") or {}).get("String")
        return pattern is not None and len(step.get("content", "").encode()) >= len(pattern.encode())
    if kind in ("Split", "Punctuation"):
        return step.get("behavior") != "Removed"
    return kind in ("Prepend", "Metaspace", "ByteLevel", "Digits")


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    """The tokenizer of a model folder (tokenizer.json, or Phi-3-small's
    cl100k_base.tiktoken), or None if it has neither."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    config_path = model_dir / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    if not path.is_file() and (model_dir / PHI3_SMALL_RANK_FILE).is_file():
        return phi3_small_folder_tokenizer(model_dir, config)
    if not path.is_file():
        return None
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise MinislmError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0][:200]})") from None

    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # serialized AddedToken
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    template_file = "chat_template.jinja" if not isinstance(config.get("chat_template"), (str, list)) else "tokenizer_config.json"
    return Tokenizer(
        backend, special, bos_policy(backend, config, special), chat_template(model_dir, config), str(model_dir / template_file)
    )


def phi3_small_folder_tokenizer(model_dir: Path, config: dict) -> Tokenizer:
    """Phi-3-small: cl100k_base plus its specials. Its tokenizer class (hub remote code,
    never run here) names `<|endoftext|>` as both BOS and EOS, adds neither when
    encoding, and lets special-token text in the input become special ids
    (tiktoken's allowed_special="all"); the chat template supplies the BOS."""
    backend = phi3_small_tokenizer(model_dir)
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    template_file = "chat_template.jinja" if not isinstance(config.get("chat_template"), (str, list)) else "tokenizer_config.json"
    return Tokenizer(backend, special, False, chat_template(model_dir, config), str(model_dir / template_file))


def bos_policy(backend: HFTokenizer, config: dict, special: dict) -> bool:
    """Whether plain-text prompts start with BOS: tokenizer_config's `add_bos_token` if it
    says, else whatever tokenizer.json's post-processor does (as transformers would)."""
    if "add_bos_token" in config and config["add_bos_token"] is not None:
        if not isinstance(config["add_bos_token"], bool):
            raise MinislmError(f"tokenizer_config.json: 'add_bos_token' must be true or false, got {config['add_bos_token']!r:.80}")
        return config["add_bos_token"]
    bos = special.get("bos_token")
    bos_id = backend.token_to_id(bos) if bos else None
    if bos_id is None:
        return False
    with_special = backend.encode("a", add_special_tokens=True).ids
    return bool(with_special) and with_special[0] == bos_id


def chat_template(model_dir: Path, config: dict) -> str | None:
    """From tokenizer_config.json (a string, or a list of named templates) or chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = Path(model_dir) / "chat_template.jinja"
    if not template and jinja_file.is_file():
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MinislmError(f"{jinja_file}: cannot read ({e})") from None
    return template if isinstance(template, str) else None


class StreamingDetokenizer:
    """Turns a stream of ids into a stream of text pieces that concatenate to
    `tokenizer.decode(all_ids)`.

    Decoding each id alone is wrong twice over: "▁world" alone decodes to "world"
    (the space is stripped at the start of a text), and "é" arriving as two byte
    tokens decodes to "\\ufffd" twice. So we decode a short window that ends at the
    newest id and starts a token or so before the text already printed, and emit
    only what is new; while the window ends in an incomplete UTF-8 character
    ("\\ufffd") we wait for more bytes.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: text before it is final
        self.read_offset = 0  # ids before this have been emitted as text

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly "")."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        already = decode(self.ids[self.prefix_offset : self.read_offset])
        window = decode(self.ids[self.prefix_offset :])
        if len(window) > len(already) and not window.endswith("\ufffd"):
            # The first window begins the text, so a leading space is stripped, exactly
            # as the full decode strips it; later windows start a token earlier and keep it.
            new_text = window[len(already) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a dangling partial character) at the end."""
        already = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window[len(already) :]
