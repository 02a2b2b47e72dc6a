"""What `generate`, `chat` and `quantize` do once their flags are parsed and checked."""

import argparse
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .beam import BeamStats
from .errors import MinislmError
from .generate import GenerationStats, generate_text
from .load import bundled_model, load
from .media_commands import ChatMedia, apply_lora_flags, check_reads_audio, encode_multimodal_prompt, process_audios
from .moe import routing_per_token
from .quantize import save_quantized
from .reasoning import THINK_CLOSE, ReasoningStream, prompt_opens_thinking
from .logprobs import Logprobs, token_text
from .runtime import (
    beam_search, generate_ids, json_grammar, make_drafter, make_sampler, reuse_cached_prefix, sampling_settings,
)
from .sampling import Sampler
from .text_input import check_utf8, read_prompt
from .tokenizer import PHI3_SMALL_RANK_FILE, load_tokenizer
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

    set_threads(args.threads)
    source = model_argument(args)
    flags = dict(
        quant=getattr(args, "quant", None),
        group_size=getattr(args, "group_size", None),
        symmetric=False if getattr(args, "asymmetric", False) else None,
        kv_cache=getattr(args, "kv_cache", None),
        encoder_activations=getattr(args, "encoder_activations", None),
        decoder_activations=getattr(args, "decoder_activations", None),
    )
    if Path(source).expanduser().is_file():  # a GGUF file carries its own tokenizer
        model = load(source, **flags)
        if model.tokenizer is None:
            raise MinislmError(f"{source}: this GGUF file has no tokenizer (no tokenizer.ggml.* metadata)")
        return apply_lora_flags(model, args)
    model_dir = resolve_model_dir(source, args.revision)
    if (model_dir / "config.json").is_file() and load_tokenizer(model_dir) is None:  # before loading gigabytes
        raise MinislmError(f"{model_dir}: no tokenizer.json (nor Phi-3-small's {PHI3_SMALL_RANK_FILE}) in the model folder")
    return apply_lora_flags(load(model_dir, **flags), args)  # --lora DIR: an adapter on the decoder


def sampler_for(args, model) -> Sampler:
    """The sampler the --temp/--top-k/--top-p/--min-p/--repeat-penalty/--seed flags ask for."""
    settings = sampling_settings(
        model, temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
    )
    return make_sampler(model, settings, seed=args.seed)


def load_draft_model(args, model):
    """--draft-model DIR, loaded with the target's --quant and --kv-cache flags; None without it."""
    if getattr(args, "draft_model", None) is None:
        return None
    if model.config.vision is not None:
        raise MinislmError("--draft-model: a draft model cannot see the prompt's images; use --speculate lookup")
    draft_args = argparse.Namespace(**{**vars(args), "model": args.draft_model, "threads": None})
    try:
        return load_model(draft_args)
    except MinislmError as e:
        raise MinislmError(f"--draft-model: {e}") from None


def drafter_for(args, model, sampler: Sampler, capacity: int, draft_model=None, extra=()):
    """The guesser --speculate / --draft-model ask for, or None."""
    try:
        return make_drafter(model, sampler, capacity, getattr(args, "speculate", None), draft_model, extra=extra)
    except MinislmError as e:
        raise MinislmError(f"--draft-model: {e}") from None


def read_json_schema(path: str | None):
    """--json-schema FILE: the schema as a dict, read before the model loads (a bad
    file fails at once); compiled against the vocabulary later (`grammar_for`)."""
    if path is None:
        return None
    from .grammar import read_schema

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MinislmError(f"--json-schema {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        return read_schema(text)
    except MinislmError as e:
        raise MinislmError(f"--json-schema {path}: {e}") from None


def grammar_for(args, model, schema):
    if schema is None:
        return None
    try:
        return json_grammar(model, schema)
    except MinislmError as e:
        raise MinislmError(f"--json-schema {args.json_schema}: {e}") from None


def prompt_ids(model, prompt: str, system: str | None, use_template: bool) -> tuple[list[int], str]:
    """The prompt's ids, and the text they encode: the chat template's output, or the
    prompt as it is."""
    tokenizer = model.tokenizer
    if not use_template or not tokenizer.chat_template:
        if system:
            warn("--system needs a chat template; ignoring it")
        return tokenizer.encode(prompt), prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.render_chat(messages)
    if system and system not in text:
        warn("this model's chat template drops system messages; --system has no effect")
    return tokenizer.encode(text, add_bos=False), text


def run_generate(args) -> int:
    prompt = read_prompt(args)
    if args.save_experts and not Path(args.save_experts).resolve().parent.is_dir():
        raise MinislmError(f"--save-experts: the folder of {args.save_experts} does not exist")
    pictures = open_images(args.image)  # before loading: a bad file fails at once
    audios = process_audios(args.audio)
    schema = read_json_schema(args.json_schema)
    model = load_model(args)
    draft_model = load_draft_model(args, model)
    trace = routing_recorder() if args.show_experts or args.save_experts else None
    if trace is not None:
        check_has_experts(model, "--show-experts" if args.show_experts else "--save-experts")
    features = None
    opened = False  # the prompt ends inside <think> (--hide-reasoning)
    if model.config.phi4mm is not None:  # Phi-4-multimodal: pictures, sound, and the adapter they ask for
        model, ids, features = encode_multimodal_prompt(model, prompt, pictures, audios, args)
    elif model.config.vision is not None:  # Phi-3-vision: tags, placeholders and encoded images
        check_reads_audio(model, audios)
        ids, features = encode_image_prompt(model, prompt, pictures, args)
    else:
        check_reads_images(model, pictures)
        check_reads_audio(model, audios)
        ids, text = prompt_ids(model, prompt, args.system, use_template=not args.no_chat_template)
        opened = prompt_opens_thinking(text)
    if args.num_beams > 1:
        if features is not None:
            raise MinislmError("--num-beams: beam search does not take images yet; use greedy or sampling with --image")
        return run_beam_search(args, model, ids, opened)
    stats = GenerationStats()
    generated = []
    sampler = sampler_for(args, model)
    capacity = min(model.config.max_position_embeddings, len(ids) + args.max_tokens)
    drafter = drafter_for(args, model, sampler, capacity, draft_model)
    logprobs = Logprobs(args.logprobs) if args.logprobs is not None else None
    tokens = generate_ids(model, ids, args.max_tokens, sampler, stats=stats, trace=trace, image_features=features,
                          grammar=grammar_for(args, model, schema), logprobs=logprobs, drafter=drafter,
                          num_draft=args.num_draft)
    pieces = generate_text(model.tokenizer, recording(tokens, generated), args.stop, stats)
    for piece in answer_only(pieces, opened) if args.hide_reasoning else pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if logprobs is not None:
        print_logprobs(logprobs, model.tokenizer)
    if trace is not None:
        routing = routing_per_token(trace, generated)
        if args.show_experts:
            print_expert_trace(routing, model)
        if args.save_experts:
            save_expert_trace(args.save_experts, routing, model)
    print_stats(stats, model)
    return 0


def open_images(paths) -> list:
    """--image files, decoded (each a one-line error if it is not a readable image)."""
    if not paths:
        return []
    from .vision.image import open_image

    return [open_image(path, mode=None) for path in paths]  # each model's processor makes them RGB its way


def check_reads_images(model, pictures) -> None:
    if pictures:
        raise MinislmError(
            f"--image: {model.path} is a {model.config.model_type} model, which cannot read images "
            "(Phi-3-vision, Phi-3.5-vision and Phi-4-multimodal can)"
        )


def encode_image_prompt(model, prompt: str, pictures: list, args):
    """Phi-3-vision's prompt: ids with image placeholders, and the encoded images."""
    start = time.perf_counter()
    image_prompt = model.image_prompt(prompt, pictures, args.num_crops, args.system, chat=not args.no_chat_template)
    seconds = time.perf_counter() - start
    for k, image in enumerate(image_prompt.images, 1):
        print(f"[image {k}: {image.describe()}]", file=sys.stderr)
    if image_prompt.images:
        print(f"[images encoded in {seconds:.2f} s]", file=sys.stderr)
    return image_prompt.ids, image_prompt.features


def run_beam_search(args, model, ids, opened: bool = False) -> int:
    """generate --num-beams: the search runs to its end, then the best hypotheses print
    (one: its text alone; several: each under a header with its score). With
    --hide-reasoning, each one's answer alone."""
    stats = BeamStats()
    try:
        hypotheses = beam_search(
            model, ids, args.max_tokens, args.num_beams, length_penalty=args.length_penalty,
            early_stopping=args.early_stopping, num_return_sequences=args.num_return_sequences,
            repetition_penalty=args.repeat_penalty, stats=stats,
        )
    except MinislmError:
        raise
    except ValueError as e:  # an argument beam_search refuses, e.g. more beams than the vocabulary allows
        raise MinislmError(f"--num-beams {args.num_beams}: {e}") from None
    for n, hypothesis in enumerate(hypotheses, 1):
        if len(hypotheses) > 1:
            print(f"=== {n} of {len(hypotheses)}, score {hypothesis.score:.4f} ===")
        text = model.tokenizer.decode(list(hypothesis.ids))
        if args.hide_reasoning:
            text = "".join(answer_only([text], opened))
        print(text, flush=True)
    best = hypotheses[0]
    steps_per_second = stats.forwards / stats.search_seconds if stats.search_seconds else 0.0
    parts = [
        f"prompt {stats.prompt_tokens} tokens, {stats.prompt_tokens / max(stats.prefill_seconds, 1e-9):.1f} tok/s",
        f"beam search: {args.num_beams} beams, {stats.steps} steps, {stats.forwards} forwards "
        f"({steps_per_second:.1f}/s), {stats.copied_positions} cache positions copied",
        f"best: {len(best.ids)} tokens, score {best.score:.4f}",
        f"stop: {stats.stop_reason}",
        f"peak memory {peak_memory_bytes() / 2**30:.2f} GiB",
    ]
    print("[" + " | ".join(parts) + "]", file=sys.stderr)
    return 0


def print_logprobs(logprobs: Logprobs, tokenizer, file=None) -> None:
    """--logprobs N: each generated token, its log-probability and probability under the
    distribution it was drawn from (the sampler's last stage), then the N most likely
    tokens of that distribution."""
    file = file or sys.stderr
    print(f"[logprobs: token, log-probability (probability); then the {logprobs.top} most likely tokens]", file=file)
    for n, entry in enumerate(logprobs.entries, 1):
        line = f"#{n} {token_text(tokenizer, entry.token)!r} {entry.logprob:.4f} ({np.exp(entry.logprob):.4f})"
        if entry.top:
            line += " | " + ", ".join(f"{token_text(tokenizer, t)!r} {lp:.4f}" for t, lp in entry.top)
        print(line, file=file)


def answer_only(pieces, opened: bool) -> Iterator[str]:
    """--hide-reasoning: the answer of a reply streamed in `pieces`, without the <think>
    section before it (minislm/reasoning.py). Once the thinking is over, one line on
    stderr says how much of it was hidden; a reply with no think section passes unchanged.
    `opened`: the prompt ended with <think>, so the reply starts inside it."""
    stream, hidden, told = ReasoningStream(opened), 0, False
    for piece in itertools.chain(pieces, [None]):  # None: the reply has ended
        reasoning, answer = stream.add(piece) if piece is not None else stream.flush()
        hidden += len(reasoning)
        if stream.thought and not told and (answer or piece is None):
            told = True
            unclosed = f"; the reply ended before {THINK_CLOSE}, so it has no answer" if stream.thinking else ""
            print(f"[reasoning hidden: {hidden} characters{unclosed}]", file=sys.stderr, flush=True)
        if answer:
            yield answer


def routing_recorder() -> Recorder:
    """A recorder that keeps only what --show-experts / --save-experts print."""
    return Recorder(names=("experts", "expert_weights"))


def recording(items, into: list):
    """Pass `items` through, appending each to `into` (the ids behind the text, the
    pieces of a reply)."""
    for item in items:
        into.append(item)
        yield item


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
    drafter = drafter_for(args, model, sampler, capacity, load_draft_model(args, model))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    images = ChatMedia(model, args) if model.config.phi4mm is not None else ChatImages(model, args.num_crops)
    tokenizer.encode_chat(system + [{"role": "user", "content": "hello"}])  # a template that cannot render: stop now
    # A line that is not UTF-8 must not end the session: read it with its bad bytes
    # kept as surrogates, and refuse that one line.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    help_images = ", /image PATH to show it a picture" if model.config.vision is not None else ""
    if model.config.phi4mm is not None:
        help_images = ", /image PATH or /audio PATH to show it a picture or play it a recording"
    print(f"minislm chat with {model.path}: /bye or Ctrl-D to quit, /clear to start over, "
          f"Ctrl-C to stop a reply{help_images}", file=sys.stderr)
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
            images.clear()
            cache.truncate(0)
            continue
        if command.split(maxsplit=1)[:1] in (["/image"], ["/audio"]):
            kind = command.split(maxsplit=1)[0][1:]
            images.attach(kind, command[len(kind) + 1 :].strip())
            continue
        if not command:
            continue
        try:
            check_utf8(line, "that line")
        except MinislmError as e:
            print(f"[{e}; nothing was sent]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": images.tags_for_next_turn() + line})
        try:
            ids, features = images.encode_chat(messages)
        except MinislmError as e:  # the template refused this conversation, or an <|image_k|> typed by hand
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
        images.sent()
        turn_model = images.model_for_turn(cache)  # Phi-4-multimodal: the conversation's adapter
        # --hide-reasoning: whether the template began the reply inside <think>. The whole
        # reply, thinking included, stays in the conversation (the cache holds its tokens).
        opened = args.hide_reasoning and prompt_opens_thinking(tokenizer.render_chat(messages))
        reply, stats, keep, routing = chat_turn(turn_model, cache, sampler, ids, features, args, capacity, drafter,
                                                opened)
        messages.append({"role": "assistant", "content": reply})
        if routing is not None:
            print_expert_trace(routing, model)
        print_stats(stats, model, reused=keep)
        if stats.stop_reason == "interrupted":
            print("[reply stopped; Ctrl-C again or Ctrl-D to leave]", file=sys.stderr)
        elif len(ids) + stats.generated_tokens >= capacity:
            print(f"[context full: this conversation now fills all {capacity} tokens (--ctx-size); "
                  "/clear to start over]", file=sys.stderr)


def chat_turn(model, cache, sampler, ids: list[int], features, args, capacity: int, drafter=None,
              opened: bool = False):
    """One reply, streamed; Ctrl-C stops it and keeps what was said so far. With
    --hide-reasoning only its answer is printed (`opened`: the prompt ended with <think>).

    The cache stays consistent when a forward is interrupted: its length moves only
    after a whole forward (KVCache.advance), so the next turn reuses what is complete.
    `features`: the encoded images of the conversation's placeholders (Phi-3-vision), or None.
    Returns the reply's whole text, its statistics, how many cached tokens were reused, and
    (with --show-experts) the routing of each generated token.
    """
    # Reuse the cache for the longest prefix it shares with the new conversation (the
    # same ids and, at image placeholders, the same images); only the rest (the new
    # user turn, mostly) goes through the model.
    keep = reuse_cached_prefix(cache, ids, features)
    new_features = None if features is None else features[cache.placeholders(keep) :]
    stats = GenerationStats()
    max_new = min(args.max_tokens, capacity - len(ids))
    trace = routing_recorder() if args.show_experts else None
    reply, generated = [], []
    try:
        tokens = generate_ids(model, ids[keep:], max_new, sampler, cache=cache, history=ids[:keep], stats=stats,
                              trace=trace, image_features=new_features, drafter=drafter, num_draft=args.num_draft)
        pieces = recording(generate_text(model.tokenizer, recording(tokens, generated), (), stats), reply)
        for piece in answer_only(pieces, opened) if args.hide_reasoning else pieces:
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


class ChatImages:
    """The pictures of a chat (`/image PATH`), each encoded once when it is attached.

    Phi-3-vision numbers the images of a whole conversation 1..n; a picture attached
    now is tagged <|image_k|> at the start of the next user turn. Every turn the
    whole conversation is tokenized again, placeholders and all, and the features of
    every image so far go with it (the cache keeps only what it can reuse).
    """

    def __init__(self, model, num_crops: int | None):
        self.model, self.num_crops = model, num_crops
        self.images, self.features = [], []  # ProcessedImage, (tokens, D) per image
        self.pending = 0  # attached since the last user turn

    def attach(self, kind: str, path: str) -> None:
        from .vision.embedding import encode_image
        from .vision.image import open_image, process_image

        vision = self.model.config.vision
        try:
            if kind == "audio":
                raise MinislmError(f"/audio: {self.model.path} is a {self.model.config.model_type} model, which cannot "
                                   "hear (Phi-4-multimodal can)")
            if vision is None:
                raise MinislmError(f"/image: {self.model.path} is a {self.model.config.model_type} model, which cannot read images")
            if not path:
                raise MinislmError("/image needs a file: /image PATH")
            start = time.perf_counter()
            image = process_image(open_image(path), self.num_crops or vision.num_crops)
            self.features.append(encode_image(vision, self.model.weights, image))
        except MinislmError as e:  # the chat goes on
            print(f"minislm: error: {e}", file=sys.stderr)
            return
        self.images.append(image)
        self.pending += 1
        seconds = time.perf_counter() - start
        print(f"[image {len(self.images)}: {image.describe()}; encoded in {seconds:.2f} s]", file=sys.stderr)

    def tags_for_next_turn(self) -> str:
        first = len(self.images) - self.pending + 1
        return "".join(f"<|image_{k}|>\n" for k in range(first, len(self.images) + 1))

    def sent(self) -> None:
        self.pending = 0

    def model_for_turn(self, cache):
        return self.model

    def clear(self) -> None:
        self.images, self.features, self.pending = [], [], 0

    def encode_chat(self, messages):
        """(ids, image features or None) of the whole conversation."""
        tokenizer = self.model.tokenizer
        if self.model.config.vision is None:
            return tokenizer.encode_chat(messages), None
        from .vision.prompt import tokenize_with_images

        ids = tokenize_with_images(tokenizer, tokenizer.render_chat(messages), [i.num_tokens for i in self.images])
        D = self.model.config.hidden_size
        return ids, np.concatenate(self.features) if self.features else np.zeros((0, D), np.float32)


def run_quantize(args) -> int:
    """`python -m minislm quantize`: load with --quant int4, write the folder that
    later loads without quantizing again (minislm/quantize.py's `save_quantized`)."""
    out_dir = Path(args.out)
    if out_dir.exists():  # refuse before spending minutes on quantization
        raise MinislmError(f"--out {out_dir}: already exists; choose a new folder")
    if not out_dir.parent.is_dir():
        raise MinislmError(f"--out {out_dir}: the folder {out_dir.parent} does not exist")
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise MinislmError(f"--out {out_dir}: cannot write in {out_dir.parent} (permission denied)")
    set_threads(args.threads)
    start = time.perf_counter()
    model = load(
        model_argument(args), revision=args.revision, quant="int4",
        group_size=args.group_size, symmetric=False if args.asymmetric else None,
    )
    quant = model.packing
    if model.config.vision is not None:
        raise MinislmError(f"quantize: {model.path} is a phi3_v model; saving those as int4 is not supported yet (use --quant int4 when loading)")
    if Path(model.path).is_file():  # a GGUF file: its metadata becomes config.json and the tokenizer files
        import tempfile

        from .formats.gguf import write_hub_files

        with tempfile.TemporaryDirectory() as source:
            write_hub_files(Path(model.path), Path(source))
            save_quantized(Path(source), out_dir, model.weights, quant)
    else:
        save_quantized(model.path, out_dir, model.weights, quant, model.adapters)  # Phi-4-multimodal's adapters too
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"{out_dir}: {quant.describe()}, {size / 1e6:.1f} MB, in {time.perf_counter() - start:.1f} s")
    return 0


def peak_memory_bytes() -> int:
    """This process's own peak resident memory.

    Linux: `VmHWM` of /proc/self/status, the high-water mark of this process's
    own address space. Not `ru_maxrss`: exec() folds the replaced address space's
    peak into it, and a child started by fork or vfork inherits its parent's
    that way (a worker of a parent that once held 7 GB reports 7 GB)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def print_stats(stats: GenerationStats, model, reused: int | None = None) -> None:
    parts = [f"prompt {token_count(stats.prompt_tokens)}"]
    if stats.prefill_seconds:  # none with -n 0: nothing ran
        parts[0] += f", {stats.prefill_tokens_per_second:.1f} tok/s"
    if reused:
        parts[0] += f" ({reused} reused from the cache)"
    parts.append(f"generated {token_count(stats.generated_tokens)}{decode_rate(stats)}")
    if stats.drafted_tokens:
        parts.append(speculation_summary(stats))
    parts.append(f"stop: {stats.stop_reason or 'none'}")
    parts.append(f"weights {model.weights_format.describe()}")
    parts.append(f"peak memory {peak_memory_bytes() / 2**30:.2f} GiB")
    print("[" + " | ".join(parts) + "]", file=sys.stderr)


def speculation_summary(stats: GenerationStats) -> str:
    """'drafted 40, accepted 31 (78 %)': the guesses of speculative decoding and how many
    the target kept."""
    share = 100 * stats.accepted_tokens / stats.drafted_tokens
    return f"drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens} ({share:.0f} %)"


def token_count(n: int) -> str:
    return f"{n} token" + "s" * (n != 1)


def decode_rate(stats: GenerationStats) -> str:
    """", N tok/s" over the decode steps. The first token comes from the prefill's
    logits, so with one token (or none) there is no decode step and no rate to give."""
    if stats.generated_tokens == 1:
        return ", decode rate n/a (the one token came from the prefill)"
    if stats.generated_tokens == 0:
        return ""
    return f", {stats.decode_tokens_per_second:.2f} tok/s"


def warn(message: str) -> None:
    print(f"minislm: warning: {message}", file=sys.stderr)
