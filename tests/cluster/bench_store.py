"""Store costs a replica pays, against a real throw-away PostgreSQL (unix socket, this machine):
the live-version check made on every request, and saving / cold-loading a 100 x 16 and a 1000 x 16
task (stand-in d = 1280: the shot features and class text that dominate a task's bytes).

    python -m tests.cluster.bench_store [--json out.json]

Prints a markdown table; docs/benchmarks.md quotes it with the machine load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from app.store import TaskSnapshot
from app.store.postgres import PostgresStore
from tests.stores import postgres_server

DIM = 1280


def task_snapshot(classes: int, shots: int, version: int = 1) -> TaskSnapshot:
    rng = np.random.default_rng(classes)
    n = classes * shots
    arrays = {
        "shot_features": rng.standard_normal((n, DIM)).astype(np.float32),
        "shot_labels": np.repeat(np.arange(classes), shots).astype(np.int64),
        "shot_seeds": np.arange(n, dtype=np.int64),
        "text": rng.standard_normal((classes, DIM)).astype(np.float32),
    }
    meta = {"classes": [{"name": f"class {i}", "prompts": []} for i in range(classes)], "version": version}
    return TaskSnapshot("bench", f"t{classes}x{shots}", version, meta, arrays)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "n": len(ordered),
    }


def timed(call: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def run() -> dict[str, Any]:
    server = postgres_server.acquire()
    try:
        url = postgres_server.new_schema_url(server, "bench")
        store = PostgresStore(url)
        try:
            results: dict[str, Any] = {"load_average": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
            small = task_snapshot(100, 16)
            store.save(small)
            store.live_version("bench", small.task_id)  # warm the pool and the prepared statement
            results["version_check"] = percentiles(timed(lambda: store.live_version("bench", small.task_id), 2000))
            for classes, repeats in ((100, 10), (1000, 3)):
                snapshot = task_snapshot(classes, 16)
                raw_mb = sum(a.nbytes for a in snapshot.arrays.values()) / 2**20

                versions = itertools.count(2)

                def save(snapshot: TaskSnapshot = snapshot, versions: Iterator[int] = versions) -> None:
                    store.save(TaskSnapshot("bench", snapshot.task_id, next(versions), snapshot.meta, snapshot.arrays))

                save_times = timed(save, repeats)
                load_times = timed(lambda snapshot=snapshot: store.load("bench", snapshot.task_id), repeats)
                results[f"{classes}x16"] = {
                    "raw_mb": raw_mb,
                    "save": percentiles(save_times),
                    "cold_load": percentiles(load_times),
                }
            return results
        finally:
            store.close()
    finally:
        postgres_server.release()


def table(results: dict[str, Any]) -> str:
    check = results["version_check"]
    lines = [
        f"load average {results['load_average']}",
        "",
        "| what | p50 | p99 | runs |",
        "|---|---|---|---|",
        f"| live-version check (one indexed lookup) | {check['p50_ms']:.3f} ms | {check['p99_ms']:.3f} ms"
        f" | {check['n']} |",
    ]
    for key in ("100x16", "1000x16"):
        row = results[key]
        for what in ("save", "cold_load"):
            stats = row[what]
            label = f"{what.replace('_', ' ')} of a {key.replace('x', ' x ')} task ({row['raw_mb']:.0f} MB)"
            lines.append(f"| {label} | {stats['p50_ms']:.0f} ms | {stats['p99_ms']:.0f} ms | {stats['n']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    measured = run()
    print(table(measured))
    if args.json:
        args.json.write_text(json.dumps(measured, indent=2))
