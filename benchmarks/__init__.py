"""Benchmarks: speed, memory and accuracy measurements behind docs/benchmarks.md."""
