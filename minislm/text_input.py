"""Where text comes from: the prompt (an argument, --file, stdin) and its checks.

Everything a user types or pipes in must be UTF-8 before the tokenizer sees it;
each failure is one MinislmError naming the flag or file.
"""

import sys
from pathlib import Path

from .errors import MinislmError


def read_prompt(args) -> str:
    """The prompt from exactly one place: PROMPT, --prompt TEXT, --file PATH, or stdin
    (`-p -`, `-` as PROMPT, or a pipe when no prompt is given). A long prompt read from
    a file or a pipe does not meet the shell's argument limit. Text read from a file or
    stdin loses one trailing newline, so `echo "ROMEO:" | minislm generate` is
    `minislm generate "ROMEO:"`."""
    given = [(name, value) for name, value in (("PROMPT", args.prompt_text), ("--prompt", args.prompt), ("--file", args.file))
             if value is not None]
    if len(given) > 1:
        raise MinislmError(f"give the prompt once: {' and '.join(name for name, _ in given)} were both given")
    if not given:
        if stdin_is_terminal():
            raise MinislmError('no prompt: minislm generate "your prompt" (or --prompt TEXT, --file PATH, or pipe it in)')
        given = [("stdin", "-")]
    name, value = given[0]
    if name == "--file":
        return strip_one_newline(read_text_file(value, "--file"))
    if value == "-" or name == "stdin":
        text = read_stdin()
        if not text:
            raise MinislmError("no prompt: stdin was empty")
        return strip_one_newline(text)
    return check_utf8(value, name)


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        return True


def read_stdin() -> str:
    try:
        data = sys.stdin.buffer.read()
    except (AttributeError, OSError, ValueError) as e:
        raise MinislmError(f"cannot read the prompt from stdin ({e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinislmError(f"the prompt on stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file, every failure one line naming the flag and the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MinislmError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise MinislmError(f"{flag} {path}: is a folder, not a file") from None
    except OSError as e:
        raise MinislmError(f"{flag} {path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinislmError(f"{flag} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def strip_one_newline(text: str) -> str:
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def check_utf8(text: str | None, name: str) -> str | None:
    """Arguments and chat lines that were not valid UTF-8 arrive with lone surrogates
    (Python's surrogateescape); the tokenizer cannot encode them, so say so here,
    naming the flag or argument."""
    try:
        if text is not None:
            text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape")
        raise MinislmError(f"{name}: not valid UTF-8 text (byte 0x{raw[0]:02x} at character {e.start})") from None
    return text
