"""Benchmarks: `python -m minislm bench` and the pieces it is built from."""
