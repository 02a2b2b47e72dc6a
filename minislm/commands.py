"""What `generate` and `chat` do once their flags are parsed and checked."""

import json
import resource
import sys
from pathlib import Path

from .errors import MinislmError
from .generate import GenerationStats, generate_text, generate_tokens
from .load import BUNDLED_MODEL, bundled_model  # noqa: F401  (BUNDLED_MODEL: for tests and tools)
from .moe import routing_per_token
from .sampling import Sampler, SamplingSettings
from .text_input import check_utf8, read_prompt
from .trace import Recorder


def model_argument(args) -> str:
    """--model, or the small model shipped inside the package when there is one.
    (An empty --model is refused by the flag checks: it is an unset shell variable,
    not a request for the default.)"""
    return args.model if args.model is not None else str(bundled_model())


def set_threads(threads: int | None) -> None:
    """--threads: Numba's kernels and BLAS both use this many (default: all cores)."""
    if threads:
        from .kernels import set_threads as set_kernel_threads

        try:
            set_kernel_threads(threads)
        except ValueError as e:
            raise MinislmError(str(e)) from None


def load_model(args):
    from .hub import resolve_model_dir
    from .load import load

    set_threads(args.threads)
    model_dir = resolve_model_dir(model_argument(args), args.revision)
    if not (model_dir / "tokenizer.json").is_file() and (model_dir / "config.json").is_file():
        raise MinislmError(f"{model_dir}: no tokenizer.json in the model folder")
    return load(
        model_dir,
        quant=getattr(args, "quant", None),
        group_size=getattr(args, "group_size", None),
        symmetric=False if getattr(args, "asymmetric", False) else None,
        kv_cache=getattr(args, "kv_cache", None),
    )


def sampler_for(args, model) -> Sampler:
    """Flags first, then generation_config.json's defaults (when it asks for sampling)."""
    defaults = model.generation_config
    sampled = defaults.do_sample

    def pick(flag, default, neutral):
        if flag is not None:
            return flag
        return default if (sampled and default is not None) else neutral

    settings = SamplingSettings(
        temperature=pick(args.temp, defaults.temperature if defaults.temperature is not None else 1.0, 0.0),
        top_k=pick(args.top_k, defaults.top_k, 0) or None,
        top_p=pick(args.top_p, defaults.top_p, 1.0),
        min_p=pick(args.min_p, defaults.min_p, 0.0),
        # a logits processor in transformers, so it applies to greedy decoding too
        repetition_penalty=args.repeat_penalty if args.repeat_penalty is not None else (defaults.repetition_penalty or 1.0),
    )
    allowed = min(model.tokenizer.vocab_size, model.config.vocab_size)
    return Sampler(settings, seed=args.seed, allowed_ids=allowed)


def stop_ids(model) -> set[int]:
    """generation_config.json's ids plus the tokenizer's own end-of-sequence token."""
    ids = set(model.generation_config.eos_token_ids)
    eos = model.tokenizer.special.get("eos_token")
    if eos and model.tokenizer.token_id(eos) is not None:
        ids.add(model.tokenizer.token_id(eos))
    return ids


def prompt_ids(model, prompt: str, system: str | None, use_template: bool) -> list[int]:
    tokenizer = model.tokenizer
    if not use_template or not tokenizer.chat_template:
        if system:
            warn("--system needs a chat template; ignoring it")
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.render_chat(messages)
    if system and system not in text:
        warn("this model's chat template drops system messages; --system has no effect")
    return tokenizer.encode(text, add_bos=False)


def run_generate(args) -> int:
    prompt = read_prompt(args)
    if args.save_experts and not Path(args.save_experts).resolve().parent.is_dir():
        raise MinislmError(f"--save-experts: the folder of {args.save_experts} does not exist")
    model = load_model(args)
    trace = routing_recorder() if args.show_experts or args.save_experts else None
    if trace is not None:
        check_has_experts(model, "--show-experts" if args.show_experts else "--save-experts")
    ids = prompt_ids(model, prompt, args.system, use_template=not args.no_chat_template)
    stats = GenerationStats()
    generated = []
    tokens = generate_tokens(
        model, ids, args.max_tokens, sampler_for(args, model), stop_ids(model), stats=stats, trace=trace
    )
    for piece in generate_text(model.tokenizer, recording(tokens, generated), args.stop, stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if trace is not None:
        routing = routing_per_token(trace, generated)
        if args.show_experts:
            print_expert_trace(routing, model)
        if args.save_experts:
            save_expert_trace(args.save_experts, routing, model)
    print_stats(stats, model)
    return 0


def routing_recorder() -> Recorder:
    """A recorder that keeps only what --show-experts / --save-experts print."""
    return Recorder(names=("experts", "expert_weights"))


def recording(tokens, into: list):
    """Pass `tokens` through, appending each to `into` (the ids behind the text)."""
    for token in tokens:
        into.append(token)
        yield token


def check_has_experts(model, flag: str) -> None:
    if model.config.model_type != "phimoe":
        raise MinislmError(f"{flag}: {model.path} is a {model.config.model_type} model, which has no experts (PhiMoE only)")


# Layers per line of --show-experts output: 4 cells of ~20 characters fit 80 columns.
LAYERS_PER_LINE = 4


def print_expert_trace(routing, model, file=sys.stderr) -> None:
    """--show-experts: for each generated token, each layer's two experts with their weights.

        #3 '▁Paris' (id 3681)
           L0   5:1.00 12:1.00   L1   3:1.00  0:0.62   ...

    reads: the logits that gave token 3 came through experts 5 and 12 in layer 0
    (weight 1.00 each), experts 3 and 0 in layer 1, and so on; first choice first.
    """
    print(f"[experts: per generated token and layer, expert:weight, first choice first; "
          f"{model.config.num_local_experts} experts per layer]", file=file)
    for n, step in enumerate(routing, 1):
        print(f"#{n} {model.tokenizer.token_piece(step.token)!r} (id {step.token})", file=file)
        cells = [
            f"L{layer:<3}{a:>2}:{wa:.2f} {b:>2}:{wb:.2f}"
            for layer, ((a, b), (wa, wb)) in enumerate(zip(step.experts, step.weights))
        ]
        for start in range(0, len(cells), LAYERS_PER_LINE):
            print("   " + "   ".join(cells[start : start + LAYERS_PER_LINE]), file=file)


def save_expert_trace(path: str, routing, model) -> None:
    """--save-experts FILE: the same as JSON, for plotting and counting."""
    record = {
        "model": str(model.path),
        "num_local_experts": model.config.num_local_experts,
        "num_hidden_layers": model.config.num_hidden_layers,
        "tokens": [
            {
                "id": step.token,
                "piece": model.tokenizer.token_piece(step.token),
                "experts": step.experts.tolist(),  # [layer][choice]
                "weights": [[round(float(w), 6) for w in pair] for pair in step.weights],
            }
            for step in routing
        ],
    }
    try:
        Path(path).write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise MinislmError(f"--save-experts: cannot write {path} ({e.strerror})") from None


def run_chat(args) -> int:
    model = load_model(args)
    tokenizer = model.tokenizer
    if not tokenizer.chat_template:
        raise MinislmError(f"{model.path}: the tokenizer has no chat_template, so chat cannot format turns")
    if args.show_experts:
        check_has_experts(model, "--show-experts")
    capacity = min(args.ctx_size, model.config.max_position_embeddings)
    cache = model.new_cache(capacity)
    sampler = sampler_for(args, model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    tokenizer.encode_chat(system + [{"role": "user", "content": "hello"}])  # a template that cannot render: stop now
    # A line that is not UTF-8 must not end the session: read it with its bad bytes
    # kept as surrogates, and refuse that one line.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"minislm chat with {model.path}: /bye or Ctrl-D to quit, /clear to start over, "
          "Ctrl-C to stop a reply", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
            print()
            return 0
        command = line.strip()
        if command == "/bye":
            return 0
        if command == "/clear":
            turns = sum(1 for m in messages if m["role"] == "user")
            print(f"[cleared: {turns} turn{'s' * (turns != 1)} and {cache.length} cached tokens forgotten"
                  f"{'; the system message stays' if system else ''}]", file=sys.stderr)
            messages = list(system)
            cache.truncate(0)
            continue
        if not command:
            continue
        try:
            check_utf8(line, "that line")
        except MinislmError as e:
            print(f"[{e}; nothing was sent]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = tokenizer.encode_chat(messages)
        except MinislmError as e:  # the template refused this conversation: say so, keep the session
            messages.pop()
            print(f"[{e}; nothing was sent]", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C before the reply began
            messages.pop()
            print("[stopped; nothing was sent]", file=sys.stderr)
            continue
        if len(ids) >= capacity:
            messages.pop()
            print(f"[context full: {len(ids)} tokens, --ctx-size {capacity}; /clear to start over]", file=sys.stderr)
            continue
        reply, stats, keep, routing = chat_turn(model, cache, sampler, ids, args, capacity)
        messages.append({"role": "assistant", "content": reply})
        if routing is not None:
            print_expert_trace(routing, model)
        print_stats(stats, model, reused=keep)
        if stats.stop_reason == "interrupted":
            print("[reply stopped; Ctrl-C again or Ctrl-D to leave]", file=sys.stderr)
        elif len(ids) + stats.generated_tokens >= capacity:
            print(f"[context full: this conversation now fills all {capacity} tokens (--ctx-size); "
                  "/clear to start over]", file=sys.stderr)


def chat_turn(model, cache, sampler, ids: list[int], args, capacity: int):
    """One reply, streamed; Ctrl-C stops it and keeps what was said so far.

    The cache stays consistent when a forward is interrupted: its length moves only
    after a whole forward (KVCache.advance), so the next turn reuses what is complete.
    Returns the reply's text, its statistics, how many cached tokens were reused, and
    (with --show-experts) the routing of each generated token.
    """
    # Reuse the cache for the longest prefix it shares with the new conversation;
    # only the rest (the new user turn, mostly) goes through the model.
    keep = min(common_prefix(cache.tokens[: cache.length], ids), len(ids) - 1)
    cache.truncate(keep)
    stats = GenerationStats()
    max_new = min(args.max_tokens, capacity - len(ids))
    trace = routing_recorder() if args.show_experts else None
    reply, generated = [], []
    try:
        tokens = generate_tokens(
            model, ids[keep:], max_new, sampler, stop_ids(model), cache=cache, history=ids[:keep], stats=stats,
            trace=trace,
        )
        for piece in generate_text(model.tokenizer, recording(tokens, generated), (), stats):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
    if stats.stop_reason == "length" and max_new < args.max_tokens:
        stats.stop_reason = "context"  # cut short by the room left in --ctx-size, not by --max-tokens
    sys.stdout.write("\n")
    sys.stdout.flush()
    routing = routing_per_token(trace, generated) if trace is not None else None
    return "".join(reply), stats, keep, routing


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def peak_memory_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def print_stats(stats: GenerationStats, model, reused: int | None = None) -> None:
    parts = [f"prompt {stats.prompt_tokens} tokens, {stats.prefill_tokens_per_second:.1f} tok/s"]
    if reused:
        parts[0] += f" ({reused} reused from the cache)"
    parts.append(f"generated {stats.generated_tokens} tokens, {stats.decode_tokens_per_second:.2f} tok/s")
    parts.append(f"stop: {stats.stop_reason or 'none'}")
    parts.append(f"peak memory {peak_memory_bytes() / 2**30:.2f} GiB")
    print("[" + " | ".join(parts) + "]", file=sys.stderr)


def warn(message: str) -> None:
    print(f"minislm: warning: {message}", file=sys.stderr)
