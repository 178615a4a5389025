"""Benchmarks: `make bench` (python -m bench.run). Not tests: they print ratios, assert nothing."""
