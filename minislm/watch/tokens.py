"""`python -m minislm tokenize TEXT`: how a text becomes the ids the model reads.

Phi-3's vocabulary is SentencePiece-style BPE: a piece that begins a word carries
the space before it as '▁' ("▁soft"), and a character with no piece of its own is
spelled as its UTF-8 bytes, one `<0xNN>` token each ("é" = <0xC3> <0xA9>). Special
tokens (<s>, <|user|>, ...) are whole ids that text never splits into.
"""

import re
from dataclasses import dataclass

from ..commands import model_argument
from ..errors import MinislmError
from ..hub import resolve_model_dir
from ..tokenizer import load_tokenizer
from .inputs import chat_messages, encode_prompt

BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TokenRow:
    index: int
    id: int
    piece: str
    kind: str  # "special", "word start", "byte" or "piece"
    note: str = ""


def describe(tokenizer, ids) -> list[TokenRow]:
    """One row per id, byte-fallback runs annotated with the characters they spell."""
    special = {i for i, token in tokenizer.backend.get_added_tokens_decoder().items() if token.special}
    rows = []
    for n, token_id in enumerate(int(i) for i in ids):
        piece = tokenizer.token_piece(token_id)
        if token_id in special:
            note = "BOS" if token_id == tokenizer.bos_id else ""
            rows.append(TokenRow(n, token_id, piece, "special", note))
        elif BYTE_PIECE.match(piece):
            rows.append(TokenRow(n, token_id, piece, "byte"))
        elif piece.startswith("▁"):
            rows.append(TokenRow(n, token_id, piece, "word start"))
        else:
            rows.append(TokenRow(n, token_id, piece, "piece"))
    return annotate_bytes(rows)


def annotate_bytes(rows: list[TokenRow]) -> list[TokenRow]:
    """Give each UTF-8 character spelled by byte tokens a note on its bytes: 'é' (1/2)."""
    out = list(rows)
    n = 0
    while n < len(out):
        if out[n].kind != "byte":
            n += 1
            continue
        lead = int(BYTE_PIECE.match(out[n].piece).group(1), 16)
        length = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        run = out[n : n + length]
        if len(run) == length and all(r.kind == "byte" for r in run):
            data = bytes(int(BYTE_PIECE.match(r.piece).group(1), 16) for r in run)
            char = data.decode("utf-8", errors="replace")
        else:
            length, char = 1, "\ufffd"
        for k in range(length):
            out[n + k] = TokenRow(out[n + k].index, out[n + k].id, out[n + k].piece, "byte", f"{char!r} byte {k + 1}/{length}")
        n += length
    return out


KIND_TEXT = {"special": "special token", "word start": "starts a word (▁ = the space before it)", "byte": "byte", "piece": ""}


def format_rows(rows: list[TokenRow]) -> str:
    width = max([len(r.piece) for r in rows] + [5])
    lines = [f"{'#':>4} {'id':>6}  {'piece':<{width}}  what it is"]
    for r in rows:
        what = KIND_TEXT[r.kind] + (f" ({r.note})" if r.kind == "special" and r.note else "")
        if r.kind == "byte":
            what = f"byte fallback: {r.note}"
        lines.append(f"{r.index:>4} {r.id:>6}  {r.piece:<{width}}  {what}".rstrip())
    counts = {kind: sum(r.kind == kind for r in rows) for kind in KIND_TEXT}
    lines.append(
        f"{len(rows)} tokens: {counts['word start']} start a word, {counts['piece']} continue one, "
        f"{counts['byte']} are byte fallbacks, {counts['special']} special"
    )
    return "\n".join(lines)


def show_newlines(text: str) -> str:
    return text.replace("\n", "↵\n")


def run_tokenize(args) -> int:
    folder = resolve_model_dir(model_argument(args), args.revision)
    tokenizer = load_tokenizer(folder)  # the tokenizer alone: no weights are read
    if tokenizer is None:
        raise MinislmError(f"{folder}: no tokenizer.json in the model folder")
    ids = encode_prompt(tokenizer, args, folder)
    if args.chat:
        print("the chat template renders (↵ = a newline in the text):")
        print(show_newlines(tokenizer.render_chat(chat_messages(args))))
        print()
    elif tokenizer.add_bos and tokenizer.bos_id is not None and not args.no_bos:
        print("plain text, BOS first as the tokenizer config asks (--chat: as a chat turn)")
    print(format_rows(describe(tokenizer, ids)))
    print("ids:", " ".join(str(int(i)) for i in ids))
    return 0

