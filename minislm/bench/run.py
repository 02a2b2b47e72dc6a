"""`python -m minislm bench`: prepare the model files once, then measure engine after engine.

    1. the random checkpoint (cached in --cache-dir; speed does not depend on
       the values) and, for llama.cpp, its GGUF F16 / Q8_0 / Q4_0 copies
    2. each engine in its own worker process, strictly one at a time, each right
       after a read-bandwidth probe (the roofline) in a worker of its own
    3. the context sweep: decode speed at growing contexts (sweep.py)
    4. one more probe; with --profile, where minislm's time goes, per layer part
    5. the tables on stdout, JSON and PNGs beside it
With --threads 2,4,16 all of it runs once per thread count (a count above the
machine's cores is "not measured"), then a scaling table and plot (report.py).

An engine that cannot run here (not installed, not merged yet, not enough
RAM) is a "skipped" row with its reason; one that crashes is a "failed" row;
neither stops the others.
"""

import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import MinislmError
from .engines import ENGINES, GiB, engine_named, llama_cpp_skip_reason, skip_reason, uses_gguf
from .measure import decode_bytes, experts_fraction
from .random_checkpoint import (
    PHI3_MINI_4K, PHI3_TINY, PHI35_MOE_2LAYERS, PHIMOE_TINY, checkpoint_shapes, write_random_checkpoint,
)
from .report import plot, plot_scaling, plot_sweep, scaling_summary, summary

# (--small, --moe) -> cache folder name and config.json
MODELS = {
    (False, False): ("phi3-mini-4k-f16", PHI3_MINI_4K),
    (True, False): ("phi3-tiny-f16", PHI3_TINY),
    (False, True): ("phi35-moe-2layers-f16", PHI35_MOE_2LAYERS),
    (True, True): ("phimoe-tiny-f16", PHIMOE_TINY),
}
WORKER_TIMEOUT_S = {True: 300, False: 3600}  # small, full


def run_bench(args, argv: list[str]) -> int:
    """One run per --threads count (2,4,16: a scaling sweep), each a complete bench; with
    several counts, the runs are written as one JSON with a scaling plot and table."""
    engines = selected_engines(args.engines)
    cache_dir = Path(args.cache_dir).expanduser()
    name, config = MODELS[(args.small, args.moe)]
    model = model_summary(name, config)
    cores = available_cores()
    counts = list(dict.fromkeys(args.threads))
    if len(counts) == 1 and counts[0] > cores:
        raise MinislmError(f"--threads {counts[0]}: this machine has {cores} cores; more threads than cores "
                           "measures the scheduler, not the engines")
    checkpoint = ensure_checkpoint(cache_dir / name, config)
    runs = []
    for threads in counts:
        if threads > cores:
            progress(f"{threads} threads: not measured, this machine has {cores} cores")
            runs.append({"settings": {"threads": threads}, "status": "not measured",
                         "reason": f"this machine has {cores} cores"})
            continue
        progress(f"--- {threads} threads ---")
        runs.append(run_at(args, argv, engines, checkpoint, cache_dir, model, threads))
    json_path = Path(args.json) if args.json else cache_dir / f"bench-{name}.json"
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    if len(counts) == 1:
        write_outputs(runs[0], json_path, plot_path)
    else:
        write_sweep_outputs(runs, args, argv, model, json_path, plot_path)
    return 0


def run_at(args, argv, engines, checkpoint: Path, cache_dir: Path, model: dict, threads: int) -> dict:
    """The whole bench at one thread count: every engine in its own worker, each beside
    a read-bandwidth probe of its own; the context sweep; the profile."""
    config = model["config"]
    loadavg_before = os.getloadavg()
    busy_before = busy_elsewhere(threads)
    worker = Worker(threads, WORKER_TIMEOUT_S[args.small])
    reasons = prepare_ggufs(engines, checkpoint, cache_dir, worker, args.offline)  # made once, then reused
    quantized, quantize_run = prepare_quantized(engines, checkpoint, cache_dir, worker)
    reasons.update(quantize_run.pop("reasons", {}))
    probes = Probes(worker, 0.25 if args.small else 1.0)
    rows = []
    for i, engine in enumerate(engines, 1):
        progress(f"[{i}/{len(engines)}] {engine.name}")
        reason = reasons.get(engine.name) or skip_reason(engine, config, model["params"], mem_available())
        if reason:
            rows.append({"engine": engine.name, "status": "skipped", "reason": reason})
        else:
            beside = probes.run(engine.name)
            rows.append({**run_engine(worker, engine, quantized if engine.prequantized else checkpoint, args),
                         "bandwidth_beside_gbs": beside.get("gbs")})
        progress(f"    {describe(rows[-1])}")
    sweeps = sweep_engines(worker, args, engines, rows, checkpoint, probes)
    probes.run("after the engines")
    profiles = profile_engines(worker, rows, checkpoint, args) if args.profile else []
    return {
        "command": "python -m minislm " + shlex.join(argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**machine(loadavg_before), "other_load_at_start": busy_before},
        "model": model,
        "settings": {"threads": threads, "prompt_lengths": args.prompt_lengths, "new_tokens": args.new_tokens,
                     "contexts": args.contexts, "sweep_tokens": args.sweep_tokens},
        "bandwidth": probes.summary(),
        "engines": rows,
        "quantize": quantize_run,
        "sweeps": sweeps,
        "profiles": profiles,
    }


class Probes:
    """The read-bandwidth probe (bandwidth.py), run in its own worker beside each
    measured row, so every row has the machine's bandwidth of its own moment.

    The roofline the goals use is the highest probe of the run: the most this
    machine has been seen to read at this thread count. Judging every row against
    the highest keeps a goal from being met because the host was slow while its
    row ran (a lower probe would flatter the row), and an engine streaming faster
    than it (the check in report.py) means the probe failed, not the engine won.
    """

    def __init__(self, worker, gib: float):
        self.worker, self.gib, self.done = worker, gib, []

    def run(self, beside: str) -> dict:
        probe = {"beside": beside, **self.worker.run("bandwidth", "--gib", str(self.gib))}
        self.done.append(probe)
        return probe

    def summary(self) -> dict:
        ok = [p for p in self.done if p.get("gbs")]
        best = max(ok, key=lambda p: p["gbs"], default=None)
        return {
            "roofline_gbs": best["gbs"] if best else None,
            "roofline_from": {k: best[k] for k in ("beside", "method", "method_threads")} if best else None,
            "spread_gbs": [min(p["gbs"] for p in ok), best["gbs"]] if ok else None,
            "probes": self.done,
        }


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


DEFAULT_SWEEP = ["minislm-int4-g128", "llama.cpp-Q4_0", "transformers-bf16"]


def sweep_engines(worker, args, engines, rows, checkpoint: Path, probes=None) -> list[dict]:
    """The context sweep of each chosen engine that ran in the table (one worker each)."""
    if args.sweep_engines == "none":
        return []
    names = [e.name for e in selected_engines(args.sweep_engines)] if args.sweep_engines else \
        [name for name in DEFAULT_SWEEP if name in {e.name for e in engines}]
    ran = {row["engine"]: row for row in rows}
    results = []
    for name in names:
        engine = engine_named(name)
        if ran.get(name, {}).get("status") != "ok":
            why = ran[name].get("reason", ran[name]["status"]) if name in ran else "not in --engines"
            results.append({"engine": name, "status": "skipped", "reason": why})
            continue
        progress(f"context sweep {name}: {', '.join(map(str, args.contexts))}")
        extra = model_file_args(engine, checkpoint)
        beside = probes.run(f"sweep {name}") if probes else {}
        results.append({"engine": name, "bandwidth_beside_gbs": beside.get("gbs"), **worker.run(
            "sweep", "--engine", name, "--checkpoint", str(checkpoint), *extra,
            "--contexts", ",".join(map(str, args.contexts)), "--new-tokens", str(args.sweep_tokens))})
        progress(f"    {describe_sweep(results[-1])}")
    return results


def describe_sweep(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason', '')}"
    return ", ".join(f"{p['measured_at']}: {p['decode_tok_s']:.2f} tok/s" for p in row["points"])


def profile_engines(worker, rows, checkpoint: Path, args) -> list[dict]:
    """--profile: the per-part profile of every minislm engine that ran (decode over <= 16 tokens)."""
    profiles = []
    for row in rows:
        if row["engine"].startswith("minislm") and row["status"] == "ok":
            progress(f"profile {row['engine']}")
            profiles.append(worker.run("profile", "--engine", row["engine"], "--checkpoint", str(checkpoint),
                                       "--prompt-lengths", str(args.prompt_lengths[0]),
                                       "--new-tokens", str(min(args.new_tokens, 16))))
    return profiles


def write_outputs(results: dict, json_path: Path, plot_path: Path) -> None:
    """The plot, the JSON (which says where the plot is), then the table on stdout."""
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    why_no_plot = plot(results, plot_path)
    results["plot"] = None if why_no_plot else str(plot_path)
    sweep_path = plot_path.with_name(plot_path.stem + "-sweep" + plot_path.suffix)
    why_no_sweep_plot = plot_sweep(results, sweep_path)
    results["sweep_plot"] = None if why_no_sweep_plot else str(sweep_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"\nJSON: {json_path}\n" + (f"plot: {plot_path}" if not why_no_plot else f"plot skipped: {why_no_plot}"))
    if results.get("sweeps"):
        print(f"sweep plot: {sweep_path}" if not why_no_sweep_plot else f"sweep plot skipped: {why_no_sweep_plot}")


def write_sweep_outputs(runs: list[dict], args, argv, model: dict, json_path: Path, plot_path: Path) -> None:
    """Several thread counts: each run's plots beside the JSON (`-t4` in their names),
    the scaling plot (tok/s against threads), one JSON, then every table."""
    for run in runs:
        if run.get("status") == "not measured":
            continue
        stem = plot_path.with_name(f"{plot_path.stem}-t{run['settings']['threads']}{plot_path.suffix}")
        run["plot"] = None if plot(run, stem) else str(stem)
        sweep_path = stem.with_name(stem.stem + "-sweep" + stem.suffix)
        run["sweep_plot"] = None if plot_sweep(run, sweep_path) else str(sweep_path)
    results = {
        "command": "python -m minislm " + shlex.join(argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": model,
        "thread_counts": [run["settings"]["threads"] for run in runs],
        "runs": runs,
    }
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    why_no_plot = plot_scaling(results, plot_path)
    results["scaling_plot"] = None if why_no_plot else str(plot_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    for run in runs:
        if run.get("status") == "not measured":
            print(f"## {run['settings']['threads']} threads: not measured ({run['reason']})\n")
        else:
            print(summary(run) + "\n")
    print(scaling_summary(results))
    print(f"\nJSON: {json_path}\n" + (f"scaling plot: {plot_path}" if not why_no_plot else f"scaling plot skipped: {why_no_plot}"))


def busy_elsewhere(threads: int, seconds: float = 1.0) -> float | None:
    """Cores other processes use right now; warn when our threads will have to share.

    Threads that meet at a barrier after every matmul (OpenBLAS, OpenMP in
    llama.cpp and Numba) wait a whole scheduler time slice for a thread that
    lost its core: on a 2-core machine with one other busy process, a 2-thread
    run measures the scheduler, many times slower than the engine.
    """
    watch = OtherLoad()
    time.sleep(seconds)
    cores = watch.cores()
    free = (os.cpu_count() or 1) - (cores or 0)
    if cores is not None and free < threads - 0.25:
        progress(f"warning: other processes keep {cores:.2f} cores busy; with {threads} threads "
                 "the figures will measure that contention (see the 'other load' column)")
    return cores


def selected_engines(names: str | None):
    if not names:
        return list(ENGINES)
    chosen = []
    for name in names.split(","):
        try:
            chosen.append(engine_named(name.strip()))
        except KeyError:
            known = ", ".join(e.name for e in ENGINES)
            raise MinislmError(f"--engines: unknown engine {name.strip()!r} (known: {known})") from None
    return chosen


def model_summary(name: str, config: dict) -> dict:
    """Parameter counts from the checkpoint's shapes; active = what one decoded token reads."""
    counts = {tensor: int_product(shape) for tensor, shape in checkpoint_shapes(config).items()}
    return {
        "name": name,
        "config": config,
        "params": sum(counts.values()),
        "active_params": decode_bytes(counts, config["vocab_size"], experts_fraction(config)),
    }


def int_product(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def ensure_checkpoint(folder: Path, config: dict) -> Path:
    """The cached random checkpoint for `config`, written (once) if missing or different."""
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    if weights.is_file() and config_file.is_file() and json.loads(config_file.read_text()) == config:
        return folder
    size = sum(int_product(s) for s in checkpoint_shapes(config).values()) * 2
    folder.mkdir(parents=True, exist_ok=True)
    check_disk(folder, size, "the random checkpoint")
    progress(f"writing a random {folder.name} checkpoint ({size / 1e9:.2f} GB) to {folder}")
    return write_random_checkpoint(folder, config, dtype_tag="F16")


def check_disk(folder: Path, nbytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < nbytes + GiB:
        raise MinislmError(f"{folder}: {what} needs {nbytes / 1e9:.1f} GB, only {free / 1e9:.1f} GB free on that disk")


def prepare_ggufs(engines, checkpoint: Path, cache_dir: Path, worker, offline: bool = False) -> dict:
    """Make the GGUF files the llama.cpp rows need; {engine name: why it cannot run}."""
    from .gguf_export import fetch_vocab, find_vocab, gguf_path, vocab_hint, write_gguf

    wanted = [e for e in engines if uses_gguf(e)]
    if not wanted:
        return {}
    missing = llama_cpp_skip_reason(wanted[0], {})
    if missing:  # llama.cpp's rows are skipped as not installed; minislm's GGUF rows lack their file
        return {e.name: f"its GGUF is made by llama.cpp's quantizer: {missing}" for e in wanted if e.family == "minislm"}
    vocab = find_vocab(cache_dir)
    if vocab is None and offline:
        return {e.name: f"--offline: no vocabulary to fetch; {vocab_hint(cache_dir)}" for e in wanted}
    if vocab is None:
        progress("fetching llama.cpp's Phi-3 vocabulary (the llama-cpp-python source package, with pip)")
        try:
            vocab = fetch_vocab(cache_dir)
        except MinislmError as e:
            return {e_.name: str(e) for e_ in wanted}
    source = checkpoint / "model.safetensors"
    f16 = gguf_path(checkpoint, "F16")
    if is_stale(f16, source):
        check_disk(checkpoint, source.stat().st_size, "the F16 GGUF")
        progress(f"writing {f16.name} from {source}")
        write_gguf(checkpoint, vocab)
    reasons = {}
    for engine in wanted:
        target = gguf_path(checkpoint, engine.weights)
        if engine.weights == "F16" or not is_stale(target, f16):
            continue
        check_disk(checkpoint, int(f16.stat().st_size * engine.bytes_per_param / 2), f"the {engine.weights} GGUF")
        progress(f"quantizing {f16.name} to {engine.weights} with llama.cpp")
        done = worker.run("quantize", "--model-file", str(f16), "--output", str(target), "--type", engine.weights)
        if done.get("status") == "failed":
            reasons[engine.name] = f"quantizing to {engine.weights} failed: {done['reason']}"
    return reasons


QUANTIZE_GROUP = 128  # the folder the prequantized row loads: int4 g128, symmetric


def prepare_quantized(engines, checkpoint: Path, cache_dir: Path, worker) -> tuple[Path, dict]:
    """`minislm quantize` of the checkpoint, timed in a worker (goal 4: <= 10 s, peak RSS
    <= 2x the output), into a fresh folder the prequantized rows then load."""
    folder = cache_dir / f"{checkpoint.name}-int4-g{QUANTIZE_GROUP}"
    wanted = [e for e in engines if e.prequantized]
    if not wanted:
        return folder, {}
    shutil.rmtree(folder, ignore_errors=True)
    check_disk(cache_dir, (checkpoint / "model.safetensors").stat().st_size // 3, "the int4 folder")
    progress(f"minislm quantize --group-size {QUANTIZE_GROUP} -> {folder}")
    done = worker.run("minislm-quantize", "--checkpoint", str(checkpoint), "--output", str(folder),
                      "--group-size", str(QUANTIZE_GROUP))
    if done.get("status") == "failed":
        done["reasons"] = {e.name: f"minislm quantize failed: {done['reason']}" for e in wanted}
    else:
        progress(f"    {done['seconds']:.1f} s, {done['output_bytes'] / 1e9:.2f} GB, "
                 f"peak RSS {done['peak_rss_bytes'] / 1e9:.2f} GB")
    return folder, done


def is_stale(target: Path, source: Path) -> bool:
    return not target.is_file() or target.stat().st_mtime < source.stat().st_mtime


def model_file_args(engine, checkpoint: Path) -> list[str]:
    """The worker's --model-file for an engine that runs a GGUF the bench made."""
    from .gguf_export import gguf_path

    return ["--model-file", str(gguf_path(checkpoint, engine.weights))] if uses_gguf(engine) else []


def run_engine(worker, engine, checkpoint: Path, args) -> dict:
    extra = model_file_args(engine, checkpoint)
    n_ctx = max(args.prompt_lengths) + args.new_tokens + 16
    row = worker.run(
        "engine", "--engine", engine.name, "--checkpoint", str(checkpoint), *extra,
        "--prompt-lengths", ",".join(map(str, args.prompt_lengths)), "--new-tokens", str(args.new_tokens),
        "--n-ctx", str(n_ctx),
    )
    return {"engine": engine.name, **row}


class Worker:
    """Runs `python -m minislm.bench.worker` jobs, one at a time, with the bench's threads."""

    def __init__(self, threads: int, timeout: int):
        self.threads, self.timeout = threads, timeout
        n = str(threads)
        # Every library's own thread pool gets the same count; engines also set it in code.
        self.env = dict(os.environ, OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n,
                        NUMBA_NUM_THREADS=n, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def run(self, job: str, *args: str) -> dict:
        command = [sys.executable, "-m", "minislm.bench.worker", job, "--threads", str(self.threads), *args]
        watch = OtherLoad()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"no result within {self.timeout} s"}
        lines = done.stdout.strip().splitlines()
        if lines:
            try:
                return {**json.loads(lines[-1]), "other_load": watch.cores()}
            except json.JSONDecodeError:
                pass
        last = (done.stderr.strip().splitlines() or [""])[-1]
        if done.returncode < 0:
            why = f"worker killed by signal {-done.returncode}" + (" (out of memory?)" if done.returncode == -9 else "")
        else:
            why = f"worker exited with status {done.returncode}"
        return {"status": "failed", "reason": f"{why}: {last}"[:300]}


class OtherLoad:
    """How many cores something other than our worker kept busy while it ran.

    All CPUs' busy time from /proc/stat (including `steal`, time the hypervisor
    gave to other machines) minus the CPU time of our finished child, over the
    wall time. ~0 on a quiet machine; 1.0 means one of the cores was taken all
    along, and then the figures of that row are not the machine's.
    """

    def __init__(self):
        self.busy, self.ours, self.start = cpu_busy_seconds(), children_cpu_seconds(), time.monotonic()

    def cores(self) -> float | None:
        busy = cpu_busy_seconds()
        wall = time.monotonic() - self.start
        if busy is None or self.busy is None or wall <= 0:
            return None
        others = (busy - self.busy) - (children_cpu_seconds() - self.ours)
        return round(max(others, 0.0) / wall, 2)


def cpu_busy_seconds() -> float | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def describe(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('reason', '')}"
    prefill = ", ".join(f"{v:.1f}" for v in row["prefill_tok_s"].values())
    return (f"load {row['load_s']:.1f} s, prefill {prefill} tok/s, decode {row.get('decode_tok_s', 0):.2f} tok/s, "
            f"other processes kept {row.get('other_load')} cores busy")


def mem_available() -> int:
    """MemAvailable from /proc/meminfo (free + reclaimable page cache), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine(loadavg_before) -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {}
    for package in ("numpy", "numba", "torch", "transformers", "llama-cpp-python", "gguf"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB,
        "simd": sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "fma")),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
    }


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
