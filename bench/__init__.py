"""Benchmarks: python -m bench.run (see docs/benchmarks.md)."""
