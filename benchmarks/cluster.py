"""`shotcache bench --only cluster`: what sharing tasks through PostgreSQL costs, on this machine.

Starts its own throw-away PostgreSQL (Debian's package, a temp cluster on 127.0.0.1 and a unix socket:
`benchmarks/postgres_server.py`, which the tests' fixtures use too) and real `shotcache serve --model
offline` replicas on loopback (`benchmarks/server_process.py`, the one helper every test uses), and stops
all of them by PID. It needs the `postgres` extra, not the tests package nor pytest.

- store: the live-version check every request of a replica makes (`PostgresStore.live_version`: the
  pool's connection check plus one indexed lookup), and saving / cold-loading a 100 x 16 and a 1000 x 16
  task (d = 1280: the shot features and class text that dominate a task's bytes; a load verifies every
  blob's sha256);
- update-to-visible: add one shot on replica A; from A's acknowledgement until a classify on B answers
  with the new version (B's requests reload the task when its version moved);
- classify throughput with the same closed-loop clients against 1 replica, then spread over 2;
- store round trips per classify request (PostgreSQL's transaction counter over many requests);
- resident memory (RSS) of each replica at the end.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from app.store import TaskSnapshot

from .common import BenchConfig, percentile, table

DIM = 1280
CLASSES = ("airplane", "automobile", "bird")
CLIENTS = 4


def task_snapshot(classes: int, shots: int, version: int = 1) -> TaskSnapshot:
    rng = np.random.default_rng(classes)
    n = classes * shots
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "shot_features": rng.standard_normal((n, DIM)).astype(np.float32),
        "shot_labels": np.repeat(np.arange(classes), shots).astype(np.int64),
        "shot_seeds": np.arange(n, dtype=np.int64),
        "text": rng.standard_normal((classes, DIM)).astype(np.float32),
    }
    meta = {"classes": [{"name": f"class {i}", "prompts": []} for i in range(classes)], "version": version}
    return TaskSnapshot("bench", f"t{classes}x{shots}", version, meta, arrays)


def stats_ms(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_ms": 1000 * statistics.median(seconds),
        "p99_ms": 1000 * percentile(seconds, 99),
        "n": len(seconds),
    }


def _timed(call: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def bench_store(url: str, quick: bool) -> dict[str, Any]:
    from app.store.postgres import PostgresStore

    store = PostgresStore(url)
    try:
        small = task_snapshot(100, 16)
        store.save(small)
        store.live_version("bench", small.task_id)  # warm the pool
        checks = 200 if quick else 2000
        results: dict[str, Any] = {
            "version_check": stats_ms(_timed(lambda: store.live_version("bench", small.task_id), checks))
        }
        for classes, repeats in ((100, 2 if quick else 10), (1000, 1 if quick else 3)):
            snapshot = task_snapshot(classes, 16)
            if classes != 100:
                store.save(snapshot)
            versions = itertools.count(2)

            def save(snapshot: TaskSnapshot = snapshot, versions: Iterator[int] = versions) -> None:
                store.save(TaskSnapshot("bench", snapshot.task_id, next(versions), snapshot.meta, snapshot.arrays))

            saves = _timed(save, repeats)
            loads = _timed(lambda snapshot=snapshot: store.load("bench", snapshot.task_id), repeats)
            results[f"{classes}x16"] = {
                "raw_mb": sum(a.nbytes for a in snapshot.arrays.values()) / 2**20,
                "save": stats_ms(saves),
                "cold_load": stats_ms(loads),
            }
        return results
    finally:
        store.close()


def _images(config: BenchConfig, split: str) -> dict[str, list[Path]]:
    root = config.datasets / "cifar10-mini" / split
    return {name: sorted((root / name).glob("*.jpg")) for name in CLASSES}


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]


def update_to_visible(a: Any, b: Any, task_id: str, extra: list[tuple[Path, str]], probe: bytes) -> list[float]:
    """Seconds from A acknowledging an added shot to B's first classify that answers with the new version."""
    delays = []
    with a.client() as on_a, b.client() as on_b:
        for path, label in extra:
            added = on_a.post(f"/v1/tasks/{task_id}/shots", files=_files([path]), data={"labels": [label]})
            acknowledged = time.perf_counter()
            added.raise_for_status()
            version = added.json()["version"]
            while True:
                answer = on_b.post(f"/v1/tasks/{task_id}/classify", files=[("images", ("p.jpg", probe, "image/jpeg"))])
                answer.raise_for_status()
                if answer.json()["task_version"] >= version:
                    delays.append(time.perf_counter() - acknowledged)
                    break
    return delays


def throughput(replicas: list[Any], task_id: str, probe: bytes, seconds: float) -> dict[str, float]:
    """Closed-loop clients (CLIENTS of them) classifying one image per request, spread over `replicas`."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        nonlocal errors
        replica = replicas[number % len(replicas)]
        with replica.client(timeout=60) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = http.post(
                    f"/v1/tasks/{task_id}/classify", files=[("images", ("p.jpg", probe, "image/jpeg"))]
                )
                took = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(took)
                    else:
                        errors += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.monotonic() - started
    return {
        "replicas": len(replicas),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * percentile(latencies, 99),
        "errors": errors,
    }


def count_statements(server: Any) -> None:
    """Load pg_stat_statements into the throw-away server (a restart, before any replica connects)."""
    import psycopg

    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    server.pause()
    server.resume()
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def store_round_trips(b: Any, url: str, task_id: str, probe: bytes, requests: int) -> dict[str, Any]:
    """Statements B sends the database per classify request (pg_stat_statements), by statement."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT public.pg_stat_statements_reset()")
        with b.client() as http:
            for _ in range(requests):
                http.post(f"/v1/tasks/{task_id}/classify", files=[("images", ("p.jpg", probe, "image/jpeg"))])
        rows = conn.execute(
            "SELECT query, calls FROM public.pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%'"
            " ORDER BY calls DESC"
        ).fetchall()
    statements = {" ".join(str(query).split())[:120]: int(calls) / requests for query, calls in rows}
    return {"per_request": sum(statements.values()), "statements": statements, "requests": requests}


def bench_cluster(config: BenchConfig) -> dict[str, Any]:
    from . import postgres_server
    from .server_process import load_average, start_replicas

    server = postgres_server.acquire()
    replicas: list[Any] = []
    root: Path | None = None
    try:
        count_statements(server)
        results: dict[str, Any] = {"load_start": load_average()}
        results["store"] = bench_store(postgres_server.new_schema_url(server, "bench_store"), config.quick)
        url = postgres_server.new_schema_url(server, "bench_cluster")
        root = Path(tempfile.mkdtemp(prefix="shotcache-bench-cluster-"))
        started = time.monotonic()
        replicas = start_replicas(["a", "b"], root, url, config.data_dir)
        results["replicas_ready_s"] = time.monotonic() - started
        a, b = replicas
        train, test = _images(config, "train"), _images(config, "test")
        shots = [(path, name) for name in CLASSES for path in train[name][:3]]
        with a.client() as http:
            created = http.post(
                "/v1/tasks", files=_files([p for p, _ in shots]), data={"labels": [n for _, n in shots]}
            )
        created.raise_for_status()
        task_id = created.json()["id"]
        probe = test[CLASSES[0]][0].read_bytes()
        rounds = 3 if config.quick else 20
        extra = [(train[CLASSES[i % 3]][3 + i // 3], CLASSES[i % 3]) for i in range(rounds)]
        results["update_to_visible"] = stats_ms(update_to_visible(a, b, task_id, extra, probe))
        seconds = 2.0 if config.quick else 15.0
        throughput([a, b], task_id, probe, 1.0)  # warm both replicas' caches and connections
        results["throughput"] = [throughput(group, task_id, probe, seconds) for group in ([a], [a, b])]
        results["round_trips_per_request"] = store_round_trips(b, url, task_id, probe, 20 if config.quick else 200)
        results["rss_mb"] = {replica.name: replica.rss_mb() for replica in replicas}
        results["load_end"] = load_average()
        return results
    finally:
        for replica in replicas:
            replica.stop()
        postgres_server.release()
        if root is not None:  # the replicas' data dirs and logs
            shutil.rmtree(root, ignore_errors=True)


def cluster_markdown(result: dict[str, Any]) -> str:
    store = result["store"]
    check = store["version_check"]
    rows: list[list[object]] = [
        [
            "live-version check (per request; pool check + one indexed lookup)",
            f"{check['p50_ms']:.3f} ms",
            f"{check['p99_ms']:.3f} ms",
            check["n"],
        ]
    ]
    for key in ("100x16", "1000x16"):
        row = store[key]
        for what in ("save", "cold_load"):
            measured = row[what]
            label = f"{what.replace('_', ' ')} of a {key.replace('x', ' x ')} task ({row['raw_mb']:.0f} MB)"
            rows.append([label, f"{measured['p50_ms']:.0f} ms", f"{measured['p99_ms']:.0f} ms", measured["n"]])
    visible = result["update_to_visible"]
    rows.append(
        [
            "update-to-visible: add-shots acknowledged on A -> B's classify answers the new version",
            f"{visible['p50_ms']:.0f} ms",
            f"{visible['p99_ms']:.0f} ms",
            visible["n"],
        ]
    )
    one, two = result["throughput"]
    served = table(
        ["replicas", "classify req/s", "p50", "p99", "errors"],
        [
            [r["replicas"], f"{r['requests_per_s']:.1f}", f"{r['p50_ms']:.0f} ms", f"{r['p99_ms']:.0f} ms", r["errors"]]
            for r in (one, two)
        ],
    )
    ratio = two["requests_per_s"] / one["requests_per_s"] if one["requests_per_s"] else float("nan")
    trips = result["round_trips_per_request"]
    statements = "; ".join(f"{calls:.2f} x `{query}`" for query, calls in trips["statements"].items()) or "none"
    rss = ", ".join(f"{name} {mb:.0f} MB" for name, mb in result["rss_mb"].items())
    return "\n".join(
        [
            table(["what", "p50", "p99", "runs"], rows, "lrrr"),
            "",
            served,
            "",
            f"2 replicas / 1 replica = {ratio:.2f}x with {CLIENTS} closed-loop clients, one image per request. "
            "On 2 cores shared by both replicas, PostgreSQL and the load generator, a second replica adds no "
            "CPU: the ratio shows what it costs (or gains by overlapping one replica's I/O with the other's "
            "compute), not the scaling of a replica per machine.",
            "",
            f"Store statements per classify request on B: {trips['per_request']:.2f} over {trips['requests']} "
            f"requests ({statements}; pg_stat_statements; the pool's connection check before each use is a "
            f"further empty-query round trip it does not count). RSS per replica at the end: {rss}. "
            f"Load average {result['load_start']} at start, "
            f"{result['load_end']} at end.",
        ]
    )
