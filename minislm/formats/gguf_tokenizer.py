"""A GGUF file's tokenizer as a `tokenizers` Tokenizer plus its tokenizer_config.

A GGUF file (llama.cpp's format) carries no tokenizer.json. It stores the
vocabulary as metadata arrays instead:

    tokenizer.ggml.model       "llama" for SentencePiece vocabularies (Phi-3, Llama-2),
                               "gpt2" for byte-level BPE (Phi-4, Phi-4-mini)
    tokenizer.ggml.pre         gpt2 only: which split pattern ("gpt-4o", "dbrx", ...)
    tokenizer.ggml.tokens      the pieces, in id order ("▁the", "<0x0A>", "<|user|>", ...)
    tokenizer.ggml.scores      one float per piece: SentencePiece's merge priority
    tokenizer.ggml.merges      gpt2 only: the BPE merges, "left right", first merged first
    tokenizer.ggml.token_type  one int per piece (GGUF_TOKEN_TYPE below)
    tokenizer.ggml.bos_token_id / eos_token_id / unknown_token_id / padding_token_id
    tokenizer.ggml.add_bos_token / add_eos_token
    tokenizer.chat_template    the Jinja chat template

From these we rebuild the tokenizer the hub's tokenizer.json describes for a Llama
SentencePiece vocabulary, so the rest of minislm treats a GGUF model exactly like
a Hugging Face folder:

* model: BPE over the pieces with byte fallback (a character outside the
  vocabulary becomes its UTF-8 bytes, `<0xE2><0x82><0xAC>`). A SentencePiece
  file stores no merge list, only scores; the merges are every way of splitting
  a piece into two pieces that are also in the vocabulary, the highest-scoring
  piece merged first (`sentencepiece_merges`).
* normalizer: a "▁" in front of the text and "▁" for every space, which is how
  SentencePiece marks word starts. It runs on each stretch of text between
  special tokens, so a "▁" also follows `<|user|>`: this is what the hub's
  tokenizer.json does, and the ids Phi-3 was trained on.
* decoder: the reverse ("▁" -> " ", bytes fused back into characters, the one
  leading space dropped).
* added tokens: control and user-defined pieces (`<s>`, `<|end|>`, ...) are
  matched whole before BPE runs, with the `rstrip` flags of the hub's files
  (`HUB_RSTRIP`).

How llama.cpp differs: it reads the same file but marks *every* Phi-3 special
token rstrip, so it swallows the "\\n" after `<|user|>` and `<|end|>`:
`<s><|user|>\\nHi<|end|>\\n<|assistant|>\\n` is 1, 32010, 6324, 32007, 32001 there
and 1, 32010, 29871, 13, 18567, 32007, 29871, 13, 32001 here (and with the hub's
tokenizer.json under `tokenizers` or transformers 4.4x). We follow the hub,
because those are the ids the model saw in fine-tuning.

The config dict names no `tokenizer_class`: given none, transformers 5 reads
tokenizer.json as written (given "LlamaTokenizer" it rebuilds the normalizer
and drops the "▁" after special tokens; see docs/training.md).

A "gpt2" vocabulary is the byte-level BPE of minislm.tiktoken_bpe: tokens in
GPT-2's byte alphabet ("Ġthe"), the file's merge list, and a split pattern named
by `tokenizer.ggml.pre`. llama.cpp's converter picks that name by hashing how the
hub tokenizer splits a test text (convert_hf_to_gguf.py, get_vocab_base_pre):
Phi-4-mini's o200k vocabulary hashes as "gpt-4o"; Phi-4's cl100k vocabulary hashes
exactly as DBRX's (both are cl100k_base without a BOS), so Phi-4 files say "dbrx".
Those are the two we read (`GPT2_PRE_PATTERNS`); any other name is refused, named.
CONTROL pieces (`<|end|>`, `<|im_end|>`) are special tokens matched whole; pieces
marked UNUSED are the converter's "[PAD123]" fillers for embedding rows no token
names, kept so that every id keeps its number.

Only the reader's `fields` are used, so any object shaped like
`gguf.GGUFReader` works; the `gguf` package itself is not imported here.
"""

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from ..errors import MinislmError
from ..tiktoken_bpe import CL100K_PATTERN, O200K_PATTERN, byte_level_tokenizer

# llama.cpp's token types (enum llama_token_type / gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The special tokens that carry `rstrip: true` in the hub's own Phi-3 tokenizer.json
# (Phi-3-vision-128k-instruct's, same vocabulary as Phi-3-mini): text right after
# them loses its leading whitespace. `<unk>`, `<s>`, `<|endoftext|>`, `<|system|>`,
# `<|end|>` and `<|user|>` are NOT in this set, which is why "\n" after `<|user|>`
# stays a token. A GGUF file records no such flags, so we restore them by name.
HUB_RSTRIP = frozenset(
    ["</s>", "<|assistant|>"] + [f"<|placeholder{i}|>" for i in range(1, 7)]
)

SPACE_MARK = "▁"  # SentencePiece's word-start mark, U+2581

# tokenizer.ggml.pre -> the split pattern of the hub tokenizer that name stands for.
GPT2_PRE_PATTERNS = {"gpt-4o": O200K_PATTERN, "dbrx": CL100K_PATTERN}


def tokenizer_from_gguf(reader) -> tuple[Tokenizer, dict]:
    """The tokenizer a GGUF file describes, and the tokenizer_config.json it implies.

    `reader` is a `gguf.GGUFReader` (or anything with the same `fields`). The
    config dict has the keys minislm's `load_tokenizer` reads from
    tokenizer_config.json: bos/eos/unk/pad_token (as strings), add_bos_token,
    add_eos_token, chat_template, model_max_length. Raises MinislmError for a
    tokenizer model other than "llama" or for missing/inconsistent metadata.
    """
    kind = field(reader, "tokenizer.ggml.model")
    if kind not in ("llama", "gpt2"):
        raise MinislmError(
            f"GGUF tokenizer.ggml.model is {kind!r}; minislm reads 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies"
        )
    if kind == "gpt2":
        return gpt2_tokenizer_from_gguf(reader)
    pieces = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    if not (len(pieces) == len(scores) == len(types)):
        raise MinislmError(
            f"GGUF tokenizer arrays disagree: {len(pieces)} tokens, {len(scores)} scores, {len(types)} token types"
        )
    config = tokenizer_config(reader, pieces)
    tokenizer = sentencepiece_bpe(pieces, scores, types)
    if config["add_bos_token"] or config["add_eos_token"]:
        tokenizer.post_processor = special_token_template(config, pieces)
    return tokenizer, config


def gpt2_tokenizer_from_gguf(reader) -> tuple[Tokenizer, dict]:
    """A "gpt2" vocabulary: byte-level BPE with the pattern `tokenizer.ggml.pre` names."""
    pre = field(reader, "tokenizer.ggml.pre", None)
    if pre not in GPT2_PRE_PATTERNS:
        raise MinislmError(
            f"GGUF tokenizer.ggml.pre is {pre!r}; minislm reads the gpt2 vocabularies of Phi models only "
            f"({', '.join(repr(p) for p in GPT2_PRE_PATTERNS)})"
        )
    pieces = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    if len(pieces) != len(types):
        raise MinislmError(f"GGUF tokenizer arrays disagree: {len(pieces)} tokens, {len(types)} token types")
    pairs = []
    for merge in merges:
        left, space, right = merge.partition(" ")
        if not space or not left or not right:
            raise MinislmError(f"GGUF tokenizer.ggml.merges holds {merge[:40]!r}, not 'left right'")
        pairs.append((left, right))
    vocab = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(piece, i)
    if len(vocab) != len(pieces):
        raise MinislmError(f"GGUF tokenizer.ggml.tokens repeats {len(pieces) - len(vocab)} pieces; ids would shift")
    config = tokenizer_config(reader, pieces)
    tokenizer = byte_level_tokenizer(vocab, pairs, GPT2_PRE_PATTERNS[pre])
    specials = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    tokenizer.add_tokens([added_token(pieces[i], types[i], rstrip=False) for i in specials])
    config["clean_up_tokenization_spaces"] = False
    if config["add_bos_token"] or config["add_eos_token"]:
        tokenizer.post_processor = special_token_template(config, pieces)
    return tokenizer, config


def sentencepiece_bpe(pieces: list[str], scores: list[float], types: list[int]) -> Tokenizer:
    """The Llama-style tokenizer over these pieces (see the module docstring)."""
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = sentencepiece_merges(pieces, scores, types)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPACE_MARK), normalizers.Replace(" ", SPACE_MARK)]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE_MARK, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # the space the normalizer put in front
        ]
    )
    tokenizer.add_tokens([added_token(pieces[i], types[i]) for i in range(len(pieces)) if types[i] in (CONTROL, USER_DEFINED)])
    return tokenizer


def sentencepiece_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges recovered from SentencePiece scores.

    SentencePiece's BPE joins, at each step, the adjacent pair whose union is the
    highest-scoring piece in the vocabulary. A merge list expresses the same
    preference as a rank: every split of a piece into two vocabulary pieces is a
    merge, ranked by the piece's score (high first). Ties keep a fixed order —
    longer left part first, then longer right part, then lower id — the order
    the hub's converted tokenizer.json files use, so ours matches them exactly.
    Control, byte and padding entries are not text and take part in no merge.
    """
    vocab = {piece: i for i, piece in enumerate(pieces)}
    candidates = []  # (score, len(left), len(right), id of the merged piece, left, right)
    for i, piece in enumerate(pieces):
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[i], -len(left), -len(right), i, left, right))
    candidates.sort()
    return [(left, right) for *_, left, right in candidates]


def added_token(piece: str, token_type: int, rstrip: bool | None = None) -> AddedToken:
    """A piece matched whole in raw text, before the normalizer and BPE see it.

    CONTROL pieces (`<s>`, `<|end|>`) are special: `decode(skip_special_tokens=True)`
    hides them. USER_DEFINED ones (Phi-3's `</s>`) are plain text that must stay
    one token, as in the hub's file.
    """
    return AddedToken(
        piece,
        special=token_type == CONTROL,
        normalized=False,
        rstrip=piece in HUB_RSTRIP if rstrip is None else rstrip,
        lstrip=False,
        single_word=False,
    )


def tokenizer_config(reader, pieces: list[str]) -> dict:
    """The tokenizer_config.json entries a GGUF file records."""

    def token(key):
        token_id = field(reader, key, None)
        if token_id is None:
            return None
        if not 0 <= token_id < len(pieces):
            raise MinislmError(f"GGUF {key} = {token_id} is outside the vocabulary of {len(pieces)} tokens")
        return pieces[token_id]

    arch = field(reader, "general.architecture", None)
    config = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", field(reader, "tokenizer.ggml.model") == "llama")),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "clean_up_tokenization_spaces": False,  # SentencePiece decoding keeps spaces as written
        "chat_template": field(reader, "tokenizer.chat_template", None),
    }
    context = field(reader, f"{arch}.context_length", None) if arch else None
    if context is not None:
        config["model_max_length"] = int(context)
    if config["add_bos_token"] and config["bos_token"] is None:
        raise MinislmError("GGUF asks for a BOS token (tokenizer.ggml.add_bos_token) but names none")
    if config["add_eos_token"] and config["eos_token"] is None:
        raise MinislmError("GGUF asks for an EOS token (tokenizer.ggml.add_eos_token) but names none")
    return {key: value for key, value in config.items() if value is not None}


def special_token_template(config: dict, pieces: list[str]) -> processors.TemplateProcessing:
    """BOS (and EOS) around encoded text, for `encode(..., add_special_tokens=True)`.

    minislm adds BOS itself from `add_bos_token`; the post-processor keeps the
    tokenizer.json honest for other readers (transformers, `tokenizers` alone).
    """
    bos = [config["bos_token"]] if config["add_bos_token"] else []
    eos = [config["eos_token"]] if config["add_eos_token"] else []
    single = bos + ["$A"] + eos
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    ids = [(t, pieces.index(t)) for t in dict.fromkeys(bos + eos)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)


def field(reader, key: str, default=...):
    """One metadata value as a Python int/float/bool/str or list, or `default` if absent."""
    entry = reader.fields.get(key)
    if entry is None:
        if default is ...:
            raise MinislmError(f"GGUF file has no {key} (needed for the tokenizer)")
        return default
    try:
        return entry.contents()
    except Exception as e:  # gguf raises assorted errors for damaged fields
        raise MinislmError(f"GGUF {key}: cannot read the value ({e})") from None
