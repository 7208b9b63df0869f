"""`shotcache bench`: speed, memory and accuracy benchmarks, written to docs/benchmarks.md.

Sections (all by default, in this order; `--only` picks some):
- encoder:  img/s per backend at batch 1, 8, 32 (and texts/s) for the stand-in and ViT-B-32 (random init);
- decode:   decode + preprocess ms/image for 32x32 .. 1920x1080 JPEGs, beside the encoder's ms/image;
- cache:    predict ms/query of every method on a 1000-class x 16-shot cache of each model's dimension;
- served:   `shotcache serve` over HTTP: task build, throughput and p50/p99 at 1 and 8 clients, share of the
            request outside the encoder, peak RSS;
- accuracy: every backend's 16-shot accuracy with the stand-in on ../shared/datasets, int8 vs fp32;
- methods:  the cache-method micro-benchmark (cache_methods.py);
- memory:   resident memory per restored task (100 and 1000 classes x 16 shots, d=1280) as a multiple of
            its raw key + text bytes, and the restore time of the stored tasks (memory.py);
- cluster:  (only with `--only cluster`) the PostgreSQL store and two replicas on it: version check,
            save / cold load, update-to-visible, 1 vs 2 replicas, round trips, RSS (cluster.py).

The full run takes about 10 minutes on 2 cores (plus the one-time ONNX exports); `--quick` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from typing import Any

from app.encoder.factory import configure_threads
from app.encoder.standin import ensure_standin
from app.settings import Settings

from .common import BenchConfig, load_average, machine, versions
from .options import DEFAULT_SECTIONS, SECTIONS

log = logging.getLogger(__name__)


def config_from(args: argparse.Namespace, settings: Settings) -> BenchConfig:
    config = BenchConfig(
        data_dir=settings.data_dir.resolve(),
        threads=args.threads or settings.threads,
        quick=args.quick,
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        command=_command(args),
    )
    if args.quick:
        config.batches = (1, 8)
        config.min_seconds = 0.2
        config.min_calls = 1
        config.serve_seconds = 2.0
        config.probes = 8
    return config


def _command(args: argparse.Namespace) -> str:
    """The command line as typed (from `bench` on), or rebuilt from the options when called in-process."""
    if "bench" in sys.argv[1:]:
        return shlex.join(["shotcache", *sys.argv[sys.argv.index("bench", 1) :]])
    out = ["shotcache", "bench"] + (["--quick"] if args.quick else [])
    for section in args.only or []:
        out += ["--only", section]
    return shlex.join(out + (["--write", str(args.write)] if args.write else []))


def run_sections(config: BenchConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    from .accuracy import bench_accuracy, bench_cache_cost, model_dims
    from .cache_methods import bench_cache_methods
    from .cluster import bench_cluster
    from .encoders import bench_decode, bench_encoders
    from .memory import bench_memory
    from .served import bench_served

    results: dict[str, Any] = {}
    for section in sections:
        started = time.perf_counter()
        log.info("bench: section %s (load average %s)", section, load_average())
        if section == "encoder":
            results["encoder"] = bench_encoders(config)
        elif section == "decode":
            results["decode"] = bench_decode(config)
        elif section == "cache":
            results["cache"] = bench_cache_cost(config, model_dims(config, results.get("encoder")))
        elif section == "served":
            results["served"] = bench_served(config, results.get("encoder"))
        elif section == "accuracy":
            results["accuracy"] = bench_accuracy(config)
        elif section == "methods":
            if config.quick:
                rows = bench_cache_methods(n_classes=50, queries=16, tune_classes=(10,), measure_memory=False)
            else:
                rows = bench_cache_methods()
            results["methods"] = rows
        elif section == "memory":
            results["memory"] = bench_memory(config.quick)
        elif section == "cluster":
            results["cluster"] = bench_cluster(config)
        log.info("bench: section %s took %.0f s", section, time.perf_counter() - started)
    return results


def run_benchmarks(args: argparse.Namespace) -> int:
    from .report import render, write_section

    overrides = {"data_dir": args.data_dir} if getattr(args, "data_dir", None) else {}
    settings = Settings(**overrides)
    config = config_from(args, settings)
    configure_threads(config.threads)
    ensure_standin(config.data_dir)
    sections = tuple(s for s in SECTIONS if s in args.only) if args.only else DEFAULT_SECTIONS
    meta: dict[str, Any] = {"machine": machine(), "versions": versions(), "command": config.command}
    nproc = meta["machine"]["nproc"] or 1
    meta["busy"] = (
        float(meta["machine"]["load"].split()[0]) > 0.5 * nproc if meta["machine"]["load"] != "n/a" else False
    )
    started = time.perf_counter()
    results = run_sections(config, sections)
    meta.update(seconds=time.perf_counter() - started, load_end=load_average(), batches=config.batches, note=args.note)
    section = render(meta, results)
    print(section)
    if args.write:
        write_section(args.write, section)
        print(f"wrote {args.write}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    return 0
