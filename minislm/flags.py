"""Flags more than one command takes, and the checks every command's flags go through.

minislm/cli.py (generate, chat, serve, ...) and minislm/watch/cli.py (the learner's
commands) both build their parsers from these; neither imports the other.
"""

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from .cache import DTYPES as KV_CACHE_DTYPES
from .errors import MinislmError
from .quantize import ENCODER_ACTIVATIONS, GROUP_SIZES
from .sampling import check_setting
from .text_input import check_utf8


@dataclass(frozen=True)
class Command:
    """One row of `python -m minislm`'s table of commands: its name, the one-line summary
    `--help` lists, the function that adds its flags, and the one that runs it."""

    name: str
    summary: str
    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="model folder, Hugging Face repo id or .gguf file (default: the bundled model)")
    p.add_argument("--revision", help="branch, tag or commit of a hub repo")
    p.add_argument("--threads", "-t", type=int, help="CPU threads for matmuls (default: all cores)")


def add_quant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=["bf16", "int4", "float32"],
                   help="keep matrices as bf16 or quantize them to int4 at load; float32: unpack a GGUF/AWQ/GPTQ/MLX "
                        "file's weights exactly to float32 instead of multiplying its codes")
    add_group_flags(p)
    p.add_argument("--kv-cache", choices=list(KV_CACHE_DTYPES),
                   help="KV cache dtype (default: float32 for float32 weights, float16 for bf16/int4)")
    p.add_argument("--encoder-activations", choices=list(ENCODER_ACTIVATIONS),
                   help="Phi-3-vision and Phi-4-multimodal with --quant bf16/int4: bf16 rounds the image and speech "
                        "encoders' activations to bf16 before each matrix product, as transformers does in bf16 "
                        "(about twice as fast where the CPU has AVX512-BF16; default float32: exact products)")
    p.add_argument("--decoder-activations", choices=list(ENCODER_ACTIVATIONS),
                   help="with --quant bf16: bf16 rounds the decoder's activations to bf16 before each matrix "
                        "product, as transformers does in bf16 (about twice as fast a prefill where the CPU has "
                        "AVX512-BF16; default float32: exact products)")


def add_group_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, help="int4: weights per scale (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="int4: a zero point per group besides the scale")


def add_num_crops_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-crops", type=int, metavar="N",
                   help="cut each image into at most N crops: Phi-3-vision 336x336, 1..16 (default: the model's, "
                        "usually 16); Phi-4-multimodal 448x448, 1..64 (default 36)")


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", metavar="DIR",
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) for the decoder")
    p.add_argument("--merge-lora", action="store_true",
                   help="merge the adapter into the weights once (W + scale·B·A) instead of adding B·(A·x) per "
                        "token: --lora's, or Phi-4-multimodal's for the prompt's modality")


def add_audio_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="Phi-4-multimodal: a sound file to play the model (repeatable; WAV/FLAC/OGG/MP3 at any rate; "
                        "<|audio_1|> ... in the prompt place them)")


def add_hide_reasoning_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hide-reasoning", action="store_true",
                   help="reasoning models: print only the answer, not the <think> section before it (stderr says "
                        "how much was hidden)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Unset flags fall back to the model's generation_config.json (as in transformers),
    and to greedy decoding when it does not ask for sampling."""
    p.add_argument("--temp", type=float, help="temperature; 0 = greedy (default: the model's, else 0)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, help="drop tokens below min-p x the best one (0 = off)")
    p.add_argument("--repeat-penalty", type=float, help="penalty for repeated tokens (1 = off)")
    p.add_argument("--seed", type=int, help="random seed: same seed, same text")


def add_speculation_flags(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (minislm/speculative.py): greedy output is unchanged, sampled
    output keeps its distribution; only the speed changes."""
    p.add_argument("--speculate", choices=["lookup"],
                   help="speculative decoding with prompt lookup: guess from the text so far (no second model)")
    p.add_argument("--draft-model", metavar="DIR",
                   help="speculative decoding with a smaller model sharing the tokenizer (loaded with the same --quant)")
    p.add_argument("--num-draft", type=int, default=4, metavar="K",
                   help="speculative decoding: tokens guessed and verified per forward (default 4)")


# Largest --logprobs: OpenAI's top_logprobs allows 20.
MAX_LOGPROBS = 20

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
    if isinstance(getattr(args, "threads", None), int) and args.threads < 1:  # bench: a list, checked by its type
        raise MinislmError(f"--threads must be >= 1, got {args.threads}")
    if getattr(args, "max_tokens", 0) < 0:
        raise MinislmError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if getattr(args, "window", None) is not None and args.window < 2:
        raise MinislmError(f"--window must be >= 2, got {args.window}")
    if getattr(args, "stride", None) is not None and args.stride < 1:
        raise MinislmError(f"--stride must be >= 1, got {args.stride}")
    if getattr(args, "ctx_size", 1) < 1:
        raise MinislmError(f"--ctx-size must be >= 1, got {args.ctx_size}")
    for flag in ("max_batch", "prefill_chunk"):
        if getattr(args, flag, 1) < 1:
            raise MinislmError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if getattr(args, "num_crops", None) is not None and not 1 <= args.num_crops <= 64:
        raise MinislmError(f"--num-crops must be from 1 to 64 (Phi-3-vision takes at most 16), got {args.num_crops}")
    if getattr(args, "model", None) is not None and not args.model.strip():
        raise MinislmError("--model is empty; give a model folder or a Hugging Face repo id (or leave --model out)")
    for attr, (setting, flag) in SAMPLING_FLAGS.items():
        if hasattr(args, attr):
            check_setting(setting, getattr(args, attr), flag)
    # Text the tokenizer will see must be UTF-8; bytes that are not arrive from the shell
    # as lone surrogates, which only fail later, deep in the tokenizer.
    for attr, flag in (("prompt_text", "PROMPT"), ("prompt", "--prompt"), ("system", "--system")):
        check_utf8(getattr(args, attr, None), flag)
    for stop in getattr(args, "stop", None) or ():
        check_utf8(stop, "--stop")
    if getattr(args, "port", 0) is not None and not 0 <= getattr(args, "port", 0) <= 65535:
        raise MinislmError(f"--port must be in [0, 65535], got {args.port}")
    if hasattr(args, "num_draft"):
        check_speculation_flags(args)
    if getattr(args, "logprobs", None) is not None and not 0 <= args.logprobs <= MAX_LOGPROBS:
        raise MinislmError(f"--logprobs must be from 0 to {MAX_LOGPROBS} (alternatives shown per token), got {args.logprobs}")
    if hasattr(args, "num_beams"):
        check_beam_flags(args)


def check_speculation_flags(args) -> None:
    if args.num_draft < 1:
        raise MinislmError(f"--num-draft must be >= 1, got {args.num_draft}")
    if args.speculate and args.draft_model is not None:
        raise MinislmError("--speculate lookup and --draft-model are two ways to guess: choose one")
    if args.draft_model is not None and not args.draft_model.strip():
        raise MinislmError("--draft-model is empty; give a model folder or a Hugging Face repo id")


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
                "--show-experts": args.show_experts or None, "--save-experts": args.save_experts,
                "--speculate": args.speculate, "--draft-model": args.draft_model, "--json-schema": args.json_schema,
                "--logprobs": args.logprobs}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given:
        raise MinislmError(f"{given[0]} does not apply to beam search (--num-beams), which scores whole sequences "
                           "deterministically")
