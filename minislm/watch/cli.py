"""The learner's commands, as rows of minislm/cli.py's table: tokenize, trace, lens,
attention, rope, routing, explain, explore.

Every command that runs the model takes the same model flags as `generate`
(`--model`, `--quant`, ...) and reads PROMPT as plain text (BOS first when the
tokenizer asks for one), or through the chat template with `--chat`.
"""

import argparse

from ..flags import Command, add_model_flags, add_num_crops_flag, add_quant_flags
from .attention import run_attention
from .explain import run_explain
from .explore import run_explore
from .lens import run_lens
from .rope import run_rope
from .routing import run_routing
from .steps import run_trace
from .tokens import run_tokenize


def add_prompt_flags(p: argparse.ArgumentParser, prompt: str = "required") -> None:
    """The flags of a command that runs the model on PROMPT."""
    add_model_flags(p)
    add_quant_flags(p)
    nargs = None if prompt == "required" else "?"
    p.add_argument("prompt", nargs=nargs, metavar="PROMPT", help="the text to run through the model")
    add_chat_flags(p)


def add_tokenize_flags(tokenize: argparse.ArgumentParser) -> None:
    add_model_flags(tokenize)
    tokenize.add_argument("prompt", metavar="TEXT", help="the text to tokenize")
    add_chat_flags(tokenize)


def add_trace_flags(trace: argparse.ArgumentParser) -> None:
    add_prompt_flags(trace)
    trace.add_argument("--layers", help="only these layers, e.g. 0,2-3 (default: all)")
    trace.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    add_image_flags(trace)


def add_lens_flags(lens: argparse.ArgumentParser) -> None:
    add_prompt_flags(lens)
    lens.add_argument("--last", type=int, default=8, metavar="N", help="positions in the text table (default: the last 8)")
    lens.add_argument("--top-k", type=int, default=10, metavar="K", help="next-token candidates to list (default 10)")
    add_png_flag(lens)


def add_attention_flags(attention: argparse.ArgumentParser) -> None:
    add_prompt_flags(attention)
    attention.add_argument("--layer", type=int, required=True, metavar="L", help="which layer (0 = first)")
    attention.add_argument("--head", type=int, metavar="H", help="one query head (default: all, as a grid)")
    attention.add_argument("--top", type=int, default=3, metavar="N", help="keys listed per query in the text (default 3)")
    add_png_flag(attention)


def add_rope_flags(rope: argparse.ArgumentParser) -> None:
    add_model_flags(rope)
    add_png_flag(rope)


def add_routing_flags(routing: argparse.ArgumentParser) -> None:
    add_prompt_flags(routing, prompt="optional")
    routing.add_argument("--from", dest="from_json", metavar="FILE", help="read a `generate --save-experts` JSON file instead of running PROMPT")
    add_png_flag(routing)


def add_explain_flags(explain: argparse.ArgumentParser) -> None:
    add_prompt_flags(explain)
    explain.add_argument("--out", "-o", required=True, metavar="FILE", help="the HTML file to write")
    explain.add_argument("--layers", help="only these layers' attention, e.g. 0,2-3 (default: all)")
    explain.add_argument("--top-k", type=int, default=10, metavar="K", help="next-token candidates per position (default 10)")
    add_image_flags(explain)


def add_explore_flags(explore: argparse.ArgumentParser) -> None:
    add_model_flags(explore)
    add_quant_flags(explore)
    explore.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    explore.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free port, printed)")
    add_image_flags(explore)


def add_image_flags(p: argparse.ArgumentParser) -> None:
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


WATCH_COMMANDS = [
    Command("tokenize", "show how a text becomes token ids: pieces, word starts, byte fallbacks", add_tokenize_flags,
            run_tokenize),
    Command("trace", "every step of one forward pass: name, layer, shape, dtype, mean, std, min, max", add_trace_flags,
            run_trace),
    Command("lens", "the logit lens: what each layer's residual stream would predict", add_lens_flags, run_lens),
    Command("attention", "attention probabilities of one layer, per head, over the prompt's tokens",
            add_attention_flags, run_attention),
    Command("rope", "rotary embedding: frequencies and wavelengths per dimension pair, LongRoPE's two factor sets",
            add_rope_flags, run_rope),
    Command("routing", "PhiMoE: which 2 experts each token used, per layer", add_routing_flags, run_routing),
    Command("explain", "write one self-contained HTML page to explore a forward pass", add_explain_flags, run_explain),
    Command("explore", "a live page on this machine: type a prompt, step through generation, watch sampling, "
            "the KV cache and attention's arithmetic", add_explore_flags, run_explore),
]
