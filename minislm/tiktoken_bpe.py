"""OpenAI's byte-level BPE vocabularies (cl100k_base, o200k_base) as `tokenizers` Tokenizers.

Phi-3-small, Phi-4 and Phi-4-mini do not use SentencePiece. Their vocabularies are
tiktoken's: Phi-3-small and Phi-4 use `cl100k_base` (GPT-4's, 100,256 ranks),
Phi-4-mini `o200k_base` (GPT-4o's, 199,998 ranks), each with the model's own
special tokens on top. Tokenizing with them is three steps:

1. Split the text with a regular expression (`CL100K_PATTERN`, `O200K_PATTERN`):
   words with their leading space, runs of up to three digits, punctuation runs,
   whitespace. No merge ever crosses one of these boundaries.
2. Turn each piece into its UTF-8 bytes. Every byte is a token, so no text is ever
   unknown: an emoji the vocabulary lacks is just its four bytes.
3. Merge bytes: repeatedly join the adjacent pair whose union has the lowest rank
   in the file, until no adjacent pair is in the vocabulary. A piece that is one
   vocabulary entry as a whole is that entry at once.

A `.tiktoken` file is exactly that rank table: one `base64(bytes) rank` per line.
The `tokenizers` library has no rank-driven model, but its BPE is equivalent when
the merge list holds *every* way to split a vocabulary entry into two entries,
ordered by the rank of the entry they make (`rank_merges`): the pair it merges
first is then the pair whose union ranks lowest, as in tiktoken. Its
`ignore_merges` takes a whole-piece entry at once, as tiktoken does. The
ByteLevel steps map each byte to a printable character (GPT-2's table) so that
byte strings can be vocabulary keys, and map them back when decoding.

Special tokens (`<|endoftext|>`, `<|end|>`, ...) are matched whole in the raw
text first, as tiktoken's `allowed_special="all"` does.
"""

import base64
import binascii
import gzip
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .errors import MinislmError

# GPT-4's split (cl100k_base). tiktoken >= 0.7 ships an equivalent pattern with
# possessive quantifiers; this is the form the hub's tokenizer.json files and
# llama.cpp carry (the sweep in tools/make_tiktoken_tokenizers.py checks both agree).
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# GPT-4o's split (o200k_base): a word may start with capitals and continue in lower
# case ("HTTPServer" -> "HTTP", "Server"), marks (\p{M}) stay with their letters,
# and "/" may trail a punctuation run.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Phi-3-small's specials, from the hub's tokenization_phi3_small.py (never run here):
# cl100k's own five, the chat tokens, and "dummy" ids that fill the padded
# embedding (100,352 rows) so that every id has a name.
PHI3_SMALL_VOCAB_SIZE = 100352
PHI3_SMALL_SPECIAL = {
    "<|dummy_id_2|>": 100256,
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|system|>": 100261,
    "<|user|>": 100262,
    "<|assistant|>": 100263,
    "<|dummy_id_0|>": 100264,
    "<|dummy_id_1|>": 100265,
    "<|end|>": 100266,
    **{f"<|dummy_id_{i}|>": 100264 + i for i in range(3, 12)},  # 100267..100275
    "<|endofprompt|>": 100276,
    **{f"<|dummy_id_{11 + k}|>": 100276 + k for k in range(1, PHI3_SMALL_VOCAB_SIZE - 100276)},  # ..100351
}
PHI3_SMALL_RANK_FILE = "cl100k_base.tiktoken"


def read_ranks(path: Path) -> dict[bytes, int]:
    """A `.tiktoken` rank file (optionally gzipped): {token bytes: rank}.

    Ranks must be 0..n-1 with no gaps or repeats: they become token ids."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MinislmError(f"{path}: cannot read the rank file ({e})") from None
    ranks = {}
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise MinislmError(f"{path}: line {number} is not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise MinislmError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: bytes that are printable Latin-1
    characters stand for themselves, the rest (control bytes, space, ...) map to
    U+0100 onwards. So b" the" is the vocabulary key "Ġthe"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def rank_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every entry into two entries, in the order of the entry's rank
    (see the module docstring for why all splits, not one)."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        for cut in range(1, len(token)):
            if token[:cut] in ranks and token[cut:] in ranks:
                merges.append((token[:cut], token[cut:]))
    return merges


def byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str) -> Tokenizer:
    """A GPT-2-style tokenizer: `pattern` splits, bytes become characters, BPE merges.

    `vocab` and `merges` are in the ByteLevel alphabet ("Ġthe"), as tokenizer.json
    files and GGUF `tokenizer.ggml.tokens`/`merges` store them."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def tokenizer_from_ranks(ranks: dict[bytes, int], pattern: str, special: dict[str, int]) -> Tokenizer:
    """The tokenizer of a rank table plus special tokens {text: id}, ids as given."""
    to_char = byte_to_char()

    def chars(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {chars(token): rank for token, rank in ranks.items()}
    merges = [(chars(left), chars(right)) for left, right in rank_merges(ranks)]
    taken = set(ranks.values()) & set(special.values())
    if taken:
        raise MinislmError(f"special token ids {sorted(taken)[:5]} are already rank ids of the vocabulary")
    tokenizer = byte_level_tokenizer(vocab, merges, pattern)
    add_specials(tokenizer, special)
    return tokenizer


def add_specials(tokenizer: Tokenizer, special: dict[str, int]) -> None:
    """Add special tokens at their own ids. `tokenizers` numbers added tokens from the
    vocabulary's end, so ids with gaps (Phi-4-mini's start at 199,999 after 199,998
    ranks, then jump to 200,018) are padded by placeholder entries first."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    wanted = sorted(special.items(), key=lambda item: item[1])
    for text, token_id in wanted:
        while size < token_id:  # an id no name covers: an unreachable placeholder
            tokenizer.add_special_tokens([AddedToken(f"<|minislm_unused_{size}|>", special=True, normalized=False)])
            size += 1
        added = AddedToken(text, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if tokenizer.add_special_tokens([added]) != 1 or tokenizer.token_to_id(text) != token_id:
            raise MinislmError(f"special token {text!r} could not take id {token_id}")
        size += 1


def phi3_small_tokenizer(model_dir: Path) -> Tokenizer:
    """Phi-3-small's tokenizer from its folder's cl100k_base.tiktoken."""
    return tokenizer_from_ranks(read_ranks(Path(model_dir) / PHI3_SMALL_RANK_FILE), CL100K_PATTERN, PHI3_SMALL_SPECIAL)
