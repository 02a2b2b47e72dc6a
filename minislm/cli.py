"""`python -m minislm <command>`: one table of commands, each with its flags.

Flags follow mlx_lm.generate and llama-cli (`--model`, `--prompt`, `--max-tokens`,
`--temp`, `--top-p`, `--top-k`, `--seed`). Generated text streams to stdout;
statistics go to stderr, so `> out.txt` captures only the text. Every input
problem ends as one line on stderr and exit status 2.
"""

import argparse
import sys

from .bench.cli import add_bench_arguments, run_bench_command
from .commands import run_chat, run_generate, run_quantize
from .errors import MinislmError
from .flags import (
    Command, add_audio_flag, add_group_flags, add_hide_reasoning_flag, add_lora_flags, add_model_flags,
    add_num_crops_flag, add_quant_flags, add_sampling_flags, add_speculation_flags, check_flags,
)
from .openai_api import REASONING_FORMATS
from .perplexity import run_perplexity
from .serve import MAX_BATCH, PREFILL_CHUNK, run_serve
from .verify import run_verify
from .watch.cli import WATCH_COMMANDS

EXIT_USAGE = 2


def add_generate_flags(gen: argparse.ArgumentParser) -> None:
    add_model_flags(gen)
    add_quant_flags(gen)
    gen.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    gen.add_argument("--prompt", "-p", help="the prompt ('-' reads it from stdin)")
    gen.add_argument("--file", "-f", help="read the prompt from this UTF-8 text file")
    gen.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    add_hide_reasoning_flag(gen)
    gen.add_argument("--show-experts", action="store_true", help="PhiMoE: print the experts each generated token used, per layer (stderr)")
    gen.add_argument("--save-experts", metavar="FILE", help="PhiMoE: save the experts and weights of every generated token as JSON")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="Phi-3-vision, Phi-4-multimodal: an image to show the model (repeatable; <|image_1|> ... in "
                          "the prompt place them)")
    add_audio_flag(gen)
    add_num_crops_flag(gen)
    add_lora_flags(gen)
    add_sampling_flags(gen)
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with N beams; prints when done (default 1: no beams)")
    gen.add_argument("--length-penalty", type=float, default=1.0,
                     help="beam search: a hypothesis scores log-prob sum / length ** this (default 1.0)")
    gen.add_argument("--early-stopping", action="store_true", help="beam search: stop once N hypotheses have ended")
    gen.add_argument("--num-return-sequences", type=int, default=1, metavar="K",
                     help="beam search: print the K best hypotheses, K <= --num-beams (default 1)")
    add_speculation_flags(gen)
    gen.add_argument("--json-schema", metavar="FILE",
                     help="the reply is a JSON document valid under this JSON schema (needs llguidance: pip install 'minislm[json]')")
    gen.add_argument("--logprobs", type=int, metavar="N",
                     help="after the text, print each token's log-probability and the N most likely alternatives (stderr)")


def add_chat_flags(chat: argparse.ArgumentParser) -> None:
    add_model_flags(chat)
    add_quant_flags(chat)
    chat.add_argument("--max-tokens", "-n", type=int, default=512, help="most tokens per reply (default 512)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--ctx-size", type=int, default=4096, help="KV cache size in tokens (default 4096)")
    chat.add_argument("--show-experts", action="store_true", help="PhiMoE: after each reply, print the experts each of its tokens used, per layer (stderr)")
    add_hide_reasoning_flag(chat)
    add_num_crops_flag(chat)
    add_lora_flags(chat)
    add_sampling_flags(chat)
    add_speculation_flags(chat)


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    add_model_flags(serve)
    add_quant_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free port)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    serve.add_argument("--ctx-size", type=int, default=4096, help="KV cache size: prompt + completion tokens (default 4096)")
    serve.add_argument("--max-batch", type=int, default=MAX_BATCH,
                       help=f"requests decoding together, each with its own --ctx-size KV cache; more wait (default {MAX_BATCH})")
    serve.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                       help=f"prompt tokens fed per step while other requests decode (default {PREFILL_CHUNK})")
    serve.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="deepseek",
                       help="chat replies that open with <think>: deepseek puts the thinking in the message's "
                            "reasoning_content and the answer in content (default); none leaves the raw text in "
                            "content")
    add_speculation_flags(serve)


def add_verify_flags(verify: argparse.ArgumentParser) -> None:
    add_model_flags(verify)
    verify.add_argument("--prompt", "-p", help="text to run (default: a fixed sentence, or random ids without a tokenizer)")
    verify.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| that passes (default 1e-4)")
    verify.add_argument("--max-tokens", "-n", type=int, default=8, help="greedy tokens to compare (default 8)")


def add_perplexity_flags(ppl: argparse.ArgumentParser) -> None:
    add_model_flags(ppl)
    add_quant_flags(ppl)
    ppl.add_argument("--file", "-f", required=True, help="UTF-8 text file to score")
    ppl.add_argument("--window", type=int, help="tokens per forward (default: the model's context)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")


def add_quantize_flags(quantize: argparse.ArgumentParser) -> None:
    add_model_flags(quantize)
    quantize.add_argument("--bits", type=int, choices=[4], default=4, help="bits per weight (4)")
    add_group_flags(quantize)
    quantize.add_argument("--out", "-o", required=True, help="new folder for the quantized model")


COMMANDS = [
    Command("generate", "generate text from a prompt", add_generate_flags, run_generate),
    Command("chat", "multi-turn chat that keeps the KV cache between turns", add_chat_flags, run_chat),
    Command("serve", "an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)", add_serve_flags,
            run_serve),
    Command("verify", "compare minislm's logits with transformers' on a checkpoint", add_verify_flags, run_verify),
    Command("perplexity", "nats/char, bits/char and token perplexity of a text file", add_perplexity_flags,
            run_perplexity),
    Command("quantize", "write an int4 checkpoint that loads without re-quantizing", add_quantize_flags, run_quantize),
    Command("bench", "speed against llama.cpp and transformers on Phi-3-mini shapes", add_bench_arguments,
            run_bench_command),
    *WATCH_COMMANDS,  # tokenize, trace, lens, attention, rope, routing, explain: see minislm/watch/
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message):
        raise MinislmError(message)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="minislm", description="A readable CPU runtime for the Phi-3 family.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for command in COMMANDS:
        command.add_flags(subparsers.add_parser(command.name, help=command.summary, description=command.summary))
    return parser


def main(argv=None) -> int:
    import numpy as np

    # NaN/Inf from a damaged checkpoint are found and named by an explicit check of the
    # logits (minislm/finite.py); NumPy's per-operation RuntimeWarnings would only add
    # lines of noise before that one-line error.
    with np.errstate(all="ignore"):
        return run_command(sys.argv[1:] if argv is None else argv)


def run_command(argv: list[str]) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # `python -m minislm`: what can I do?
            parser.print_help()
            return 0
        args.argv = argv  # the bench records the command line it ran
        check_flags(args)
        return next(c for c in COMMANDS if c.name == args.command).run(args)
    except MinislmError as e:
        print(f"minislm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `| head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except OSError as e:  # the machine said no (permissions, a full disk) where no check of ours did
        where = f"{e.filename}: " if e.filename else ""
        print(f"minislm: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
