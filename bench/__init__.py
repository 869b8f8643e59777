"""Benchmarks for strongroom (run with ``python -m bench.run``)."""
