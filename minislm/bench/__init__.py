"""Benchmarks: `python -m minislm bench` and the pieces it is built from.

    run.py               the orchestration: prepare files, one worker per engine, report
    cli.py               the command's flags
    random_checkpoint.py random-weight checkpoints with real shapes (Phi-3-mini, Phi-3.5-MoE,
                         Phi-3-vision), and the hashed one the phi3_v test fixture rebuilds
    gguf_export.py       the same weights as GGUF for llama.cpp, then its own quantizer
    bandwidth.py         the memory-read roofline (Numba streaming sum)
    worker.py            one measurement in a fresh process, one JSON line out
    engines.py           the compared engines: can each run here, and how to drive it
    measure.py           the one timing procedure every engine goes through
    profile.py           where minislm's forward spends its time, per layer part
    report.py            the Markdown table, the goals, the plot

The runtime never imports this package.
"""
