"""The flags of the learner's commands; `minislm.cli` adds them beside generate and chat.

Every command that runs the model takes the same model flags as `generate`
(`--model`, `--quant`, ...) and reads PROMPT as plain text (BOS first when the
tokenizer asks for one), or through the chat template with `--chat`.
"""

import argparse

WATCH_COMMANDS = ("tokenize", "trace", "lens", "attention", "rope", "routing", "explain")


def add_watch_commands(commands) -> None:
    """Add the subcommands to `minislm.cli`'s subparsers."""
    from ..cli import add_model_flags, add_quant_flags

    def model_command(name: str, summary: str, prompt: str = "required") -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=summary, description=summary)
        add_model_flags(p)
        add_quant_flags(p)
        nargs = None if prompt == "required" else "?"
        p.add_argument("prompt", nargs=nargs, metavar="PROMPT", help="the text to run through the model")
        add_chat_flags(p)
        return p

    tokenize = commands.add_parser(
        "tokenize", help="show how a text becomes token ids: pieces, word starts, byte fallbacks",
        description="show how a text becomes token ids: pieces, word starts, byte fallbacks",
    )
    add_model_flags(tokenize)
    tokenize.add_argument("prompt", metavar="TEXT", help="the text to tokenize")
    add_chat_flags(tokenize)

    trace = model_command("trace", "every step of one forward pass: name, layer, shape, dtype, mean, std, min, max")
    trace.add_argument("--layers", help="only these layers, e.g. 0,2-3 (default: all)")
    trace.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    add_image_flags(trace)

    lens = model_command("lens", "the logit lens: what each layer's residual stream would predict")
    lens.add_argument("--last", type=int, default=8, metavar="N", help="positions in the text table (default: the last 8)")
    lens.add_argument("--top-k", type=int, default=10, metavar="K", help="next-token candidates to list (default 10)")
    add_png_flag(lens)

    attention = model_command("attention", "attention probabilities of one layer, per head, over the prompt's tokens")
    attention.add_argument("--layer", type=int, required=True, metavar="L", help="which layer (0 = first)")
    attention.add_argument("--head", type=int, metavar="H", help="one query head (default: all, as a grid)")
    attention.add_argument("--top", type=int, default=3, metavar="N", help="keys listed per query in the text (default 3)")
    add_png_flag(attention)

    rope = commands.add_parser(
        "rope", help="rotary embedding: frequencies and wavelengths per dimension pair, LongRoPE's two factor sets",
        description="rotary embedding: frequencies and wavelengths per dimension pair, LongRoPE's two factor sets",
    )
    add_model_flags(rope)
    add_png_flag(rope)

    routing = model_command("routing", "PhiMoE: which 2 experts each token used, per layer", prompt="optional")
    routing.add_argument("--from", dest="from_json", metavar="FILE", help="read a `generate --save-experts` JSON file instead of running PROMPT")
    add_png_flag(routing)

    explain = model_command("explain", "write one self-contained HTML page to explore a forward pass")
    explain.add_argument("--out", "-o", required=True, metavar="FILE", help="the HTML file to write")
    explain.add_argument("--layers", help="only these layers' attention, e.g. 0,2-3 (default: all)")
    explain.add_argument("--top-k", type=int, default=10, metavar="K", help="next-token candidates per position (default 10)")
    add_image_flags(explain)


def add_image_flags(p: argparse.ArgumentParser) -> None:
    from ..cli import add_num_crops_flag

    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="Phi-3-vision: an image for the prompt (repeatable; <|image_k|> tags place them, "
                        "else they go first): its views and where its tokens sit")
    add_num_crops_flag(p)


def add_chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template as a user turn")
    p.add_argument("--system", help="with --chat: a system message")
    p.add_argument("--no-bos", action="store_true", help="plain text without the BOS token the tokenizer config asks for")


def add_png_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--png", metavar="FILE", help="also draw it as a PNG (needs matplotlib: pip install 'minislm[plot]')")


def run_watch_command(args) -> int:
    """Import only the command that runs (matplotlib and friends load on demand)."""
    if args.command == "tokenize":
        from .tokens import run_tokenize

        return run_tokenize(args)
    if args.command == "trace":
        from .steps import run_trace

        return run_trace(args)
    if args.command == "lens":
        from .lens import run_lens

        return run_lens(args)
    if args.command == "attention":
        from .attention import run_attention

        return run_attention(args)
    if args.command == "rope":
        from .rope import run_rope

        return run_rope(args)
    if args.command == "routing":
        from .routing import run_routing

        return run_routing(args)
    from .explain import run_explain

    return run_explain(args)
