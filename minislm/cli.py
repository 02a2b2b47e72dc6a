"""`python -m minislm <command>`: generate, chat, serve, perplexity, quantize, verify,
bench, and the learner's windows into a forward pass (tokenize, trace, lens,
attention, rope, routing, explain: see minislm/watch/).

Flags follow mlx_lm.generate and llama-cli (`--model`, `--prompt`, `--max-tokens`,
`--temp`, `--top-p`, `--top-k`, `--seed`). Generated text streams to stdout;
statistics go to stderr, so `> out.txt` captures only the text. Every input
problem ends as one line on stderr and exit status 2.
"""

import argparse
import sys

from .bench.cli import add_bench_arguments, check_bench_flags
from .errors import MinislmError
from .quantize import GROUP_SIZES
from .watch.cli import WATCH_COMMANDS, add_watch_commands, run_watch_command

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message):
        raise MinislmError(message)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="minislm", description="A readable CPU runtime for the Phi-3 family.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    add_model_flags(gen)
    add_quant_flags(gen)
    gen.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    gen.add_argument("--prompt", "-p", help="the prompt ('-' reads it from stdin)")
    gen.add_argument("--file", "-f", help="read the prompt from this UTF-8 text file")
    gen.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    gen.add_argument("--show-experts", action="store_true", help="PhiMoE: print the experts each generated token used, per layer (stderr)")
    gen.add_argument("--save-experts", metavar="FILE", help="PhiMoE: save the experts and weights of every generated token as JSON")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="Phi-3-vision: an image to show the model (repeatable; <|image_1|> ... in the prompt place them)")
    add_num_crops_flag(gen)
    add_sampling_flags(gen)
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with N beams; prints when done (default 1: no beams)")
    gen.add_argument("--length-penalty", type=float, default=1.0,
                     help="beam search: a hypothesis scores log-prob sum / length ** this (default 1.0)")
    gen.add_argument("--early-stopping", action="store_true", help="beam search: stop once N hypotheses have ended")
    gen.add_argument("--num-return-sequences", type=int, default=1, metavar="K",
                     help="beam search: print the K best hypotheses, K <= --num-beams (default 1)")

    chat = commands.add_parser("chat", help="multi-turn chat that keeps the KV cache between turns")
    add_model_flags(chat)
    add_quant_flags(chat)
    chat.add_argument("--max-tokens", "-n", type=int, default=512, help="most tokens per reply (default 512)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--ctx-size", type=int, default=4096, help="KV cache size in tokens (default 4096)")
    chat.add_argument("--show-experts", action="store_true", help="PhiMoE: after each reply, print the experts each of its tokens used, per layer (stderr)")
    add_num_crops_flag(chat)
    add_sampling_flags(chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    add_model_flags(serve)
    add_quant_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free port)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    serve.add_argument("--ctx-size", type=int, default=4096, help="KV cache size: prompt + completion tokens (default 4096)")

    verify = commands.add_parser("verify", help="compare minislm's logits with transformers' on a checkpoint")
    add_model_flags(verify)
    verify.add_argument("--prompt", "-p", help="text to run (default: a fixed sentence, or random ids without a tokenizer)")
    verify.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| that passes (default 1e-4)")
    verify.add_argument("--max-tokens", "-n", type=int, default=8, help="greedy tokens to compare (default 8)")

    ppl = commands.add_parser("perplexity", help="nats/char, bits/char and token perplexity of a text file")
    add_model_flags(ppl)
    add_quant_flags(ppl)
    ppl.add_argument("--file", "-f", required=True, help="UTF-8 text file to score")
    ppl.add_argument("--window", type=int, help="tokens per forward (default: the model's context)")
    ppl.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")

    quantize = commands.add_parser("quantize", help="write an int4 checkpoint that loads without re-quantizing")
    add_model_flags(quantize)
    quantize.add_argument("--bits", type=int, choices=[4], default=4, help="bits per weight (4)")
    add_group_flags(quantize)
    quantize.add_argument("--out", "-o", required=True, help="new folder for the quantized model")

    bench = commands.add_parser("bench", help="speed against llama.cpp and transformers on Phi-3-mini shapes")
    add_bench_arguments(bench)

    add_watch_commands(commands)  # tokenize, trace, lens, attention, rope, routing, explain
    return parser


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="model folder, Hugging Face repo id or .gguf file (default: the bundled model)")
    p.add_argument("--revision", help="branch, tag or commit of a hub repo")
    p.add_argument("--threads", "-t", type=int, help="CPU threads for matmuls (default: all cores)")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=["bf16", "int4", "float32"],
                   help="keep matrices as bf16 or quantize them to int4 at load; float32: unpack a GGUF/AWQ/GPTQ/MLX "
                        "file's weights exactly to float32 instead of multiplying its codes")
    add_group_flags(p)
    p.add_argument("--kv-cache", choices=["float32", "float16", "int8"],
                   help="KV cache dtype (default: float32 for float32 weights, float16 for bf16/int4)")


def add_group_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, help="int4: weights per scale (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="int4: a zero point per group besides the scale")


def add_num_crops_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-crops", type=int, metavar="N",
                   help="Phi-3-vision: cut each image into at most N 336x336 crops, 1..16 (default: the model's, usually 16)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Unset flags fall back to the model's generation_config.json (as in transformers),
    and to greedy decoding when it does not ask for sampling."""
    p.add_argument("--temp", type=float, help="temperature; 0 = greedy (default: the model's, else 0)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the best one (0 = off)")
    p.add_argument("--repeat-penalty", type=float, help="penalty for repeated tokens (1 = off)")
    p.add_argument("--seed", type=int, help="random seed: same seed, same text")


# Sampling flag -> the setting it sets; their legal ranges live in sampling.SETTING_RANGES.
SAMPLING_FLAGS = {
    "temp": ("temperature", "--temp"),
    "top_k": ("top_k", "--top-k"),
    "top_p": ("top_p", "--top-p"),
    "min_p": ("min_p", "--min-p"),
    "repeat_penalty": ("repetition_penalty", "--repeat-penalty"),
    "seed": ("seed", "--seed"),
}


def check_flags(args) -> None:
    """Range checks with the flag's own name in the message."""
    from .sampling import check_setting

    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise MinislmError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "max_tokens", 0) < 0:
        raise MinislmError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if getattr(args, "window", None) is not None and args.window < 2:
        raise MinislmError(f"--window must be >= 2, got {args.window}")
    if getattr(args, "stride", None) is not None and args.stride < 1:
        raise MinislmError(f"--stride must be >= 1, got {args.stride}")
    if getattr(args, "ctx_size", 1) < 1:
        raise MinislmError(f"--ctx-size must be >= 1, got {args.ctx_size}")
    if getattr(args, "num_crops", None) is not None and not 1 <= args.num_crops <= 16:
        raise MinislmError(f"--num-crops must be from 1 to 16, got {args.num_crops}")
    if getattr(args, "model", None) is not None and not args.model.strip():
        raise MinislmError("--model is empty; give a model folder or a Hugging Face repo id (or leave --model out)")
    for attr, (setting, flag) in SAMPLING_FLAGS.items():
        if hasattr(args, attr):
            check_setting(setting, getattr(args, attr), flag)
    # Text the tokenizer will see must be UTF-8; bytes that are not arrive from the shell
    # as lone surrogates, which only fail later, deep in the tokenizer.
    from .text_input import check_utf8

    for attr, flag in (("prompt_text", "PROMPT"), ("prompt", "--prompt"), ("system", "--system")):
        check_utf8(getattr(args, attr, None), flag)
    for stop in getattr(args, "stop", None) or ():
        check_utf8(stop, "--stop")
    if getattr(args, "port", 0) is not None and not 0 <= getattr(args, "port", 0) <= 65535:
        raise MinislmError(f"--port must be in [0, 65535], got {args.port}")
    if hasattr(args, "num_beams"):
        check_beam_flags(args)


def check_beam_flags(args) -> None:
    """Beam search is deterministic and prints whole sequences: sampling flags, stop
    strings and per-token expert traces do not apply to it."""
    if args.num_beams < 1:
        raise MinislmError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.num_beams == 1:
        if args.length_penalty != 1.0 or args.early_stopping or args.num_return_sequences != 1:
            raise MinislmError("--length-penalty, --early-stopping and --num-return-sequences need --num-beams > 1")
        return
    if not 1 <= args.num_return_sequences <= args.num_beams:
        raise MinislmError(f"--num-return-sequences must be in [1, --num-beams {args.num_beams}], got {args.num_return_sequences}")
    if args.max_tokens < 1:
        raise MinislmError(f"--max-tokens must be >= 1 with --num-beams, got {args.max_tokens}")
    sampling = {"--temp": args.temp if args.temp else None, "--top-k": args.top_k, "--top-p": args.top_p,
                "--min-p": args.min_p, "--seed": args.seed, "--stop": args.stop or None,
                "--show-experts": args.show_experts or None, "--save-experts": args.save_experts}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given:
        raise MinislmError(f"{given[0]} does not apply to beam search (--num-beams), which scores whole sequences "
                           "deterministically")


def main(argv=None) -> int:
    import numpy as np

    # NaN/Inf from a damaged checkpoint are found and named by an explicit check of the
    # logits (minislm/finite.py); NumPy's per-operation RuntimeWarnings would only add
    # lines of noise before that one-line error.
    with np.errstate(all="ignore"):
        return run_command(argv)


def run_command(argv) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # `python -m minislm`: what can I do?
            parser.print_help()
            return 0
        check_flags(args)
        if args.command == "generate":
            from .commands import run_generate

            return run_generate(args)
        if args.command == "chat":
            from .commands import run_chat

            return run_chat(args)
        if args.command == "serve":
            from .serve import run_serve

            return run_serve(args)
        if args.command == "perplexity":
            from .perplexity import run_perplexity

            return run_perplexity(args)
        if args.command == "quantize":
            from .quantize import run_quantize

            return run_quantize(args)
        if args.command == "verify":
            from .verify import run_verify

            return run_verify(args)
        if args.command in WATCH_COMMANDS:
            return run_watch_command(args)
        if args.command == "bench":
            from .bench.run import run_bench

            check_bench_flags(args)
            return run_bench(args, argv if argv is not None else sys.argv[1:])
        raise MinislmError(f"unknown command {args.command}")
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
