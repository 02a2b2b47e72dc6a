"""One measurement in a fresh process: `python -m minislm.bench.worker JOB ...`.

The orchestrator starts one worker per engine, one at a time, so each engine
gets its own memory (peak RSS is the worker's own `VmHWM`, not `ru_maxrss`,
which exec() hands down from the parent: commands.peak_memory_bytes), its own
libraries and thread pools, and nothing of the previous engine in its heap.
The worker prints exactly one JSON line on stdout; everything the engines
print goes to stderr.

Page cache: before the load clock starts, the worker reads the model file once
from front to back. Load time therefore measures parsing and converting the
weights from memory, the same for every engine whatever ran before it (or
whether the disk is fast), not the first read from disk.

Jobs:
    engine     load one engine and time it (measure.py)
    sweep      decode speed of one engine at growing contexts (sweep.py)
    profile    per-part time of a minislm engine's forward (profile.py)
    bandwidth  the read-bandwidth probe (bandwidth.py), run beside every row
    quantize   F16 GGUF -> Q8_0 / Q4_0 with llama.cpp's quantizer
    minislm-quantize   `python -m minislm quantize` of the checkpoint, timed
"""

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

CHUNK = 64 << 20


def read_once(paths) -> None:
    """Read files through the page cache into one reused buffer (RSS stays small)."""
    buffer = bytearray(CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def model_files(checkpoint: Path, model_file: Path | None) -> list[Path]:
    if model_file is not None:
        return [model_file]
    return sorted(checkpoint.glob("*.safetensors"))


def run_engine(args) -> dict:
    from ..commands import peak_memory_bytes
    from .engines import engine_named, load_engine
    from .measure import decode_bytes, experts_fraction, measure

    engine = engine_named(args.engine)
    config = json.loads((args.checkpoint / "config.json").read_text())
    experts_read = experts_fraction(config)
    read_once(model_files(args.checkpoint, args.model_file))
    start = time.perf_counter()
    loaded = load_engine(engine, args.checkpoint, args.model_file, args.threads, n_ctx=args.n_ctx)
    load_s = time.perf_counter() - start
    result = measure(loaded.generate, args.prompt_lengths, args.new_tokens, config["vocab_size"])
    return {
        "engine": engine.name,
        "status": "ok",
        "load_s": load_s,
        "first_token_s": load_s + result["warmup_first_token_s"],  # load, then an 8-token prompt
        **result,
        "weight_bytes": sum(loaded.tensor_bytes.values()),
        "decode_bytes_per_token": decode_bytes(loaded.tensor_bytes, config["vocab_size"], experts_read),
        "peak_rss_bytes": peak_memory_bytes(),  # this worker's own VmHWM
        "info": loaded.info,
    }


def run_sweep(args) -> dict:
    from .engines import engine_named, load_engine
    from .measure import decode_bytes, experts_fraction
    from .sweep import sweep

    engine = engine_named(args.engine)
    config = json.loads((args.checkpoint / "config.json").read_text())
    read_once(model_files(args.checkpoint, args.model_file))
    positions = config["max_position_embeddings"]
    loaded = load_engine(engine, args.checkpoint, args.model_file, args.threads, n_ctx=positions)
    points = sweep(loaded.decoder, args.contexts, args.new_tokens, config["vocab_size"], positions)
    return {
        "engine": engine.name,
        "status": "ok",
        "points": points,
        "decode_bytes_per_token": decode_bytes(loaded.tensor_bytes, config["vocab_size"], experts_fraction(config)),
        "info": loaded.info,
    }


def run_profile(args) -> dict:
    from .engines import engine_named
    from .measure import experts_fraction
    from .profile import profile_minislm

    engine = engine_named(args.engine)
    config = json.loads((args.checkpoint / "config.json").read_text())
    return profile_minislm(engine, args.checkpoint, args.threads, args.prompt_lengths[0], args.new_tokens,
                           experts_fraction(config))



def run_bandwidth(args) -> dict:
    from .bandwidth import measure_bandwidth

    return measure_bandwidth(gib=args.gib, threads=args.threads)


def run_minislm_quantize(args) -> dict:
    """`python -m minislm quantize` as a user runs it, timed from a warm page cache."""
    from ..cli import main as cli_main
    from ..commands import peak_memory_bytes

    read_once(model_files(args.checkpoint, None))
    start = time.perf_counter()
    status = cli_main(["quantize", "--model", str(args.checkpoint), "--group-size", str(args.group_size),
                       "--out", str(args.output), "--threads", str(args.threads)])
    seconds = time.perf_counter() - start
    if status != 0:
        return {"status": "failed", "reason": f"minislm quantize exited with status {status}"}
    return {"status": "ok", "seconds": seconds, "group_size": args.group_size,
            "output_bytes": sum(p.stat().st_size for p in args.output.iterdir()),
            "input_bytes": sum(p.stat().st_size for p in model_files(args.checkpoint, None)),
            "peak_rss_bytes": peak_memory_bytes()}


def run_quantize(args) -> dict:
    from .gguf_export import quantize

    start = time.perf_counter()
    quantize(args.model_file, args.output, args.type, args.threads)
    return {"seconds": time.perf_counter() - start}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m minislm.bench.worker")
    p.add_argument("job", choices=["engine", "sweep", "profile", "bandwidth", "quantize", "minislm-quantize"])
    p.add_argument("--engine")
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--model-file", type=Path, help="the engine's own file (a GGUF) when not the checkpoint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--n-ctx", type=int, default=1024)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[128, 1024, 2048, 4096])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--output", type=Path)
    p.add_argument("--type")
    p.add_argument("--group-size", type=int, default=128)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Engines print (llama.cpp, transformers' warnings): keep stdout for our one line.
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    jobs = {"engine": run_engine, "sweep": run_sweep, "profile": run_profile, "bandwidth": run_bandwidth,
            "quantize": run_quantize, "minislm-quantize": run_minislm_quantize}
    try:
        result, status = jobs[args.job](args), 0
    except Exception as e:  # reported as this engine's row, the bench goes on
        traceback.print_exc(file=sys.stderr)
        message = " ".join(f"{type(e).__name__}: {e}".split())
        result, status = {"status": "failed", "reason": message[:300]}, 1
    stdout.write(json.dumps(result) + "\n")
    stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
