"""`python -m minislm <command>`: generate, chat, serve, perplexity, quantize, verify, bench.

Flags follow mlx_lm.generate and llama-cli (`--model`, `--prompt`, `--max-tokens`,
`--temp`, `--top-p`, `--top-k`, `--seed`). Generated text streams to stdout;
statistics go to stderr, so `> out.txt` captures only the text. Every input
problem ends as one line on stderr and exit status 2.
"""

import argparse
import sys

from .bench.cli import add_bench_arguments, check_bench_flags
from .errors import MinislmError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message):
        raise MinislmError(message)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="minislm", description="A readable CPU runtime for the Phi-3 family.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    gen = commands.add_parser("generate", help="generate text from a prompt")
    add_model_flags(gen)
    add_quant_flags(gen)
    gen.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    gen.add_argument("--prompt", "-p", help="the prompt")
    gen.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    gen.add_argument("--system", help="system message for the chat template")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    gen.add_argument("--show-experts", action="store_true", help="PhiMoE: print the experts each generated token used, per layer (stderr)")
    gen.add_argument("--save-experts", metavar="FILE", help="PhiMoE: save the experts and weights of every generated token as JSON")
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
    return parser


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="model folder or Hugging Face repo id (default: the bundled model)")
    p.add_argument("--revision", help="branch, tag or commit of a hub repo")
    p.add_argument("--threads", "-t", type=int, help="CPU threads for matmuls (default: all cores)")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=["bf16", "int4"], help="keep matrices as bf16 or quantize them to int4 at load")
    add_group_flags(p)


def add_group_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32, help="int4: weights per scale (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="int4: a zero point per group besides the scale")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Unset flags fall back to the model's generation_config.json (as in transformers),
    and to greedy decoding when it does not ask for sampling."""
    p.add_argument("--temp", type=float, help="temperature; 0 = greedy (default: the model's, else 0)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the best one (0 = off)")
    p.add_argument("--repeat-penalty", type=float, help="penalty for repeated tokens (1 = off)")
    p.add_argument("--seed", type=int, help="random seed: same seed, same text")


def check_flags(args) -> None:
    """Range checks with the flag's own name in the message."""
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise MinislmError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "max_tokens", 0) < 0:
        raise MinislmError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if getattr(args, "window", None) is not None and args.window < 2:
        raise MinislmError(f"--window must be >= 2, got {args.window}")
    if getattr(args, "ctx_size", 1) < 1:
        raise MinislmError(f"--ctx-size must be >= 1, got {args.ctx_size}")
    if getattr(args, "port", 0) is not None and not 0 <= getattr(args, "port", 0) <= 65535:
        raise MinislmError(f"--port must be in [0, 65535], got {args.port}")
    if hasattr(args, "num_beams"):
        check_beam_flags(args)
    if not hasattr(args, "temp"):
        return
    if args.temp is not None and not args.temp >= 0:
        raise MinislmError(f"--temp must be >= 0, got {args.temp}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise MinislmError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise MinislmError(f"--top-k must be >= 0, got {args.top_k}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise MinislmError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.repeat_penalty is not None and not args.repeat_penalty > 0:
        raise MinislmError(f"--repeat-penalty must be > 0, got {args.repeat_penalty}")


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
    try:
        args = build_parser().parse_args(argv)
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
