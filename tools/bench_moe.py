"""Weight bytes read per decoded token on a PhiMoE checkpoint, and its decode speed.

    python tools/bench_moe.py                          # Phi-3.5-MoE layers, 2 of them: 11.6 GB on disk
    python tools/bench_moe.py --layers 1 --experts 8   # smaller

Writes (once, under bench-cache/) a random-weight checkpoint with Phi-3.5-MoE's
shapes — hidden 4096, ffn 6400, 32 query / 8 kv heads, 16 experts, vocab 32064 —
cut to --layers layers, in float32, so that minislm memory-maps it without a
copy and only the pages a forward touches are read. It then prefills a short
prompt and decodes --tokens tokens greedily, recording the weights each decode step
looks up (`minislm.bench.weight_reads`), and prints:

* parameters: total, and active per token (dense part + 2 of E experts per layer);
* weight bytes: total, and read per decoded token (measured from the lookups);
* decode tokens/s (median step). On a shared machine this number moves with the
  load of other processes: compare ratios, not absolutes.

The same parameter counts for the full 32-layer Phi-3.5-MoE follow from its shapes.
"""

import argparse
import time
from pathlib import Path

import numpy as np

import minislm
from minislm.bench.random_checkpoint import PHI35_MOE, write_random_checkpoint
from minislm.bench.weight_reads import decode_reads, total_bytes
from minislm.config import parse_config
from minislm.weights import expected_shapes

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def parameter_counts(config) -> tuple[int, int]:
    """(total, active per token): every tensor, versus all but the experts plus 2 per layer."""
    shapes = expected_shapes(config)
    total = sum(int(np.prod(s)) for s in shapes.values())
    experts = sum(int(np.prod(s)) for name, s in shapes.items() if ".experts." in name)
    return total, total - experts + experts * config.num_experts_per_tok // config.num_local_experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="decode steps to measure")
    parser.add_argument("--folder", type=Path, help="checkpoint folder (default: bench-cache/phimoe-<layers>x<experts>-f32)")
    args = parser.parse_args()

    full = parse_config(PHI35_MOE)
    total, active = parameter_counts(full)
    print(f"Phi-3.5-MoE (32 layers): {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active per token")
    print(f"  weights read per token: bf16 {2 * active / GB:.1f} GB of {2 * total / GB:.1f} GB")

    raw = dict(PHI35_MOE, num_hidden_layers=args.layers, num_local_experts=args.experts)
    folder = args.folder or ROOT / "bench-cache" / f"phimoe-{args.layers}x{args.experts}-f32"
    if not (folder / "model.safetensors").is_file():
        print(f"writing {folder} ...")
        write_random_checkpoint(folder, raw, dtype_tag="F32")
    model = minislm.load(folder)
    config = model.config
    total, active = parameter_counts(config)
    print(f"\ncheckpoint {folder.name}: {config.num_hidden_layers} layers, {config.num_local_experts} experts, float32")
    print(f"  parameters: {total / 1e9:.3f}B total, {active / 1e9:.3f}B active per token")

    prompt = np.arange(100, 108)
    start = time.perf_counter()
    reads = decode_reads(model, prompt, args.tokens)
    elapsed = time.perf_counter() - start
    # the same steps again, now that every page they touch is in memory: the timing run
    times = []
    cache = model.new_cache(len(prompt) + len(reads) + 1)
    model.forward(prompt, cache)
    for step in reads:
        t0 = time.perf_counter()
        model.lm_head(model.forward(np.array([step.token]), cache))
        times.append(time.perf_counter() - t0)

    everything = total_bytes(model.weights)
    per_token = np.mean([r.bytes_read for r in reads])
    experts_used = {(layer, int(e)) for r in reads for layer, pair in enumerate(r.experts) for e in pair}
    print(f"  weight bytes: {everything / GB:.2f} GB in all; read per decoded token {per_token / GB:.3f} GB "
          f"({100 * per_token / everything:.1f}%), measured over {len(reads)} steps")
    embedding = config.vocab_size * config.hidden_size  # active, but a decode step reads 1 row of it
    expected = 4 * (active - embedding + config.hidden_size)
    print(f"  expected from the active parameters (float32, one embedding row): {expected / GB:.3f} GB")
    print(f"  experts touched over the run: {len(experts_used)} of {config.num_hidden_layers * config.num_local_experts}")
    print(f"  decode: {1 / np.median(times):.2f} tok/s (median step {1000 * np.median(times):.0f} ms; "
          f"first, cold pass {elapsed:.1f} s incl. prefill)")


if __name__ == "__main__":
    main()
