"""`shotcache bench`: speed, memory and accuracy benchmarks, written to docs/benchmarks.md."""

from __future__ import annotations

import argparse

from .cache_methods import bench_cache_methods, to_markdown


def run_benchmarks(args: argparse.Namespace) -> int:
    rows = bench_cache_methods()
    print(to_markdown(rows))
    return 0
