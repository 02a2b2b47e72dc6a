"""Training throughput of one model shape under different settings, on random tokens.

    python tools/train_speed.py --seconds 30 "" "bf16=False" "attn='eager'" "context=256,batch=32"

Each argument is a set of overrides for one measurement. The figure is the
median tokens/s over full steps (forward, loss, backward, AdamW), after two
warm-up steps. On a shared machine throughput drifts by 2x and more from
minute to minute: compare settings measured in one run, and repeat.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import Phi3ForCausalLM

from tiny_phi3 import count_parameters, make_config

DEFAULTS = dict(hidden=256, layers=6, heads=8, kv_heads=2, ffn=704, n_tokens=4101,
                context=512, batch=16, bf16=True, attn="sdpa", compile=False, tie=True)


def measure(seconds: float, **overrides) -> str:
    s = {**DEFAULTS, **overrides}
    config = make_config(n_tokens=s["n_tokens"], hidden=s["hidden"], layers=s["layers"],
                         heads=s["heads"], kv_heads=s["kv_heads"], ffn=s["ffn"],
                         context=s["context"], dropout=0.1, tie=s["tie"], bos_id=1, eos_id=2)
    config._attn_implementation = s["attn"]
    model = Phi3ForCausalLM(config)
    forward = torch.compile(model) if s["compile"] else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    tokens = torch.randint(0, s["n_tokens"], (s["batch"], s["context"]))
    times, start = [], time.time()
    while len(times) < 4 or time.time() - start < seconds:
        tick = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s["bf16"]):
            logits = forward(input_ids=tokens).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.time() - tick)
    step = statistics.median(times[2:])
    return (f"{overrides or 'defaults'}: {count_parameters(model):,} params, "
            f"{tokens.numel() / step:,.0f} tokens/s ({step:.2f} s/step, first step {times[0]:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="+", help='overrides, e.g. "bf16=False,context=256"')
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for setting in args.settings:
        overrides = eval(f"dict({setting})")  # a measuring script's own command line
        print(measure(args.seconds, **overrides), flush=True)


if __name__ == "__main__":
    main()
