"""The flags of `python -m minislm bench` (kept here so minislm/cli.py stays a list of commands)."""

import argparse

from ..errors import MinislmError


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", action="store_true", help="a tiny model: the whole pipeline in under a minute")
    p.add_argument("--moe", action="store_true", help="Phi-3.5-MoE shapes, cut to 2 layers")
    p.add_argument("--threads", "-t", type=thread_counts, default=[2],
                   help="threads for every engine (default 2); several, e.g. 2,4,16: the whole bench at each, "
                        "then a scaling table and plot (counts above the machine's cores: not measured)")
    p.add_argument("--engines", help="comma-separated rows to run (default: all; see the table for names)")
    p.add_argument("--cache-dir", default="bench-cache", help="where checkpoints and GGUFs are kept (default ./bench-cache)")
    p.add_argument("--json", help="write the results here (default: in --cache-dir)")
    p.add_argument("--plot", help="bar chart PNG (default: beside the JSON)")
    p.add_argument("--prompt-lengths", type=lengths, default=[128, 512], help="prefill prompts (default 128,512)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after the first prompt (default 64)")
    p.add_argument("--profile", action="store_true", help="also time each layer part of the minislm engines")
    p.add_argument("--offline", action="store_true",
                   help="download nothing (llama.cpp's vocabulary); rows that need it are skipped")
    p.add_argument("--contexts", type=lengths, default=[128, 1024, 2048, 4096],
                   help="context sweep: decode speed with this many positions cached (default 128,1024,2048,4096)")
    p.add_argument("--sweep-engines", help="engines of the context sweep, or 'none' (default: "
                   "minislm-int4-g128, llama.cpp-Q4_0, transformers-bf16, those of them in --engines)")
    p.add_argument("--sweep-tokens", type=int, default=16, help="decode steps timed at each context (default 16)")


def counts(text: str, example: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like {example}, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {text!r}")
    return values


def lengths(text: str) -> list[int]:
    return counts(text, "128,512", "prompt lengths")


def thread_counts(text: str) -> list[int]:
    return counts(text, "2,4,16", "thread counts")


def check_bench_flags(args) -> None:
    from pathlib import Path

    cache_dir = Path(args.cache_dir).expanduser()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise MinislmError(f"--cache-dir {args.cache_dir}: is a file, not a folder")
    if not cache_dir.exists() and cache_dir.parent.exists() and not cache_dir.parent.is_dir():
        raise MinislmError(f"--cache-dir {args.cache_dir}: {cache_dir.parent} is a file, not a folder")
    if args.new_tokens < 2:
        raise MinislmError(f"--new-tokens must be >= 2 (decode speed needs a token after the first), got {args.new_tokens}")
    if args.sweep_tokens < 1:
        raise MinislmError(f"--sweep-tokens must be >= 1, got {args.sweep_tokens}")
    if max(args.prompt_lengths) + args.new_tokens > 4096:
        raise MinislmError("--prompt-lengths plus --new-tokens must fit Phi-3-mini's 4096-token context")


def run_bench_command(args) -> int:
    """`python -m minislm bench`: check the flags, then run (minislm/bench/run.py)."""
    from .run import run_bench

    check_bench_flags(args)
    return run_bench(args, args.argv)
