"""Bounded load on loopback against the real `shotcache serve`: concurrent clients classifying and, now
and then, creating a small task; latencies, errors and the server's memory over the run.

    .venv/bin/python -m tests.reliability.load --clients 16 --seconds 30

Each client loops: with probability 1/10 it creates a task (2 classes x 2 shots, 4 images), otherwise it
classifies 2 images against a random task (the 2 made at the start or any created since) and checks the
answer (2 results, each with up to 3 classes in decreasing probability, summing to at most 1, the label
being the first). Any other answer than a well-formed
200/201 or a 429 counts as an error, and so does a dropped connection. A client that gets 429 waits
`Retry-After` seconds. At the deadline clients stop sending and the requests in flight are awaited
("drain"): every request sent gets its answer checked.

Memory: the server's RSS is read from /proc/<pid>/status every 0.5 s. A warm-up phase (the same mix, by
default 300 requests) comes first: the encoder's per-batch-size buffers and the allocators' arenas fill
up during the first few hundred requests (measured: RSS flat from then on, over 150 s and 1,567
requests). Growth = median RSS over the last fifth of the measured phase minus the median over its first
fifth (medians, so the buffers of the requests in flight at one sample do not count); the least-squares
slope over the phase is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.server_process import Server, load_average, prepare_data_dir, request_failures, rss_mb

from .images import CLASSES, image_paths, parts, shots

CREATE_EVERY = 10  # 1 request in 10 creates a task
PER_CLASSIFY = 2  # images per classify request
TOP_K = 3


@dataclass
class Phase:
    seconds: float  # how long clients kept sending
    drain: float = 0.0  # how long the requests in flight at the deadline took to answer
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"classify": [], "create": []})
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the phase, MB)
    retry_after: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _check_answer(kind: str, body: dict[str, Any]) -> str | None:
    if kind == "create":
        return None if isinstance(body.get("id"), str) and body.get("version") == 1 else f"bad create answer {body}"
    results = body.get("results", [])
    if len(results) != PER_CLASSIFY:
        return f"{len(results)} results for {PER_CLASSIFY} images"
    for result in results:
        top = result["top_k"]
        probabilities = [e["probability"] for e in top]
        if not 1 <= len(top) <= TOP_K or sorted(probabilities, reverse=True) != probabilities:
            return f"bad top_k {top}"
        if not all(0 <= p <= 1 for p in probabilities) or sum(probabilities) > 1 + 1e-5:
            return f"bad probabilities {top}"
        if result["label"] != top[0]["label"]:
            return f"label {result['label']} is not the top class {top[0]['label']}"
    return None


async def _client(
    base_url: str,
    tasks: list[str],
    phase: Phase,
    deadline: float,
    rng: random.Random,
    until_requests: int | None,
) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        while time.monotonic() < deadline and (until_requests is None or phase.requests < until_requests):
            create = rng.randrange(CREATE_EVERY) == 0
            data: dict[str, Any]
            if create:
                labels = rng.sample(CLASSES, 2)
                items = shots("train", labels, 2, skip=rng.randrange(32))
                url, files, data = "/v1/tasks", parts(items), {"labels": [label for _, label in items]}
            else:
                probes = [image_paths("test", rng.choice(CLASSES))[rng.randrange(50)] for _ in range(PER_CLASSIFY)]
                url, files, data = f"/v1/tasks/{rng.choice(tasks)}/classify", parts(probes), {"top_k": str(TOP_K)}
            kind = "create" if create else "classify"
            started = time.perf_counter()
            try:
                response = await client.post(url, files=files, data=data)
            except httpx.HTTPError as exc:
                phase.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - started
            phase.statuses[(kind, response.status_code)] += 1
            if response.status_code in (200, 201):
                problem = _check_answer(kind, response.json())
                if problem:
                    phase.errors.append(f"{kind}: {problem}")
                    continue
                phase.latencies[kind].append(elapsed)
                if create:
                    tasks.append(response.json()["id"])
            elif response.status_code == 429:
                phase.retry_after.append(response.headers.get("retry-after", ""))
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            else:
                phase.errors.append(f"{kind}: {response.status_code} {response.text[:300]}")


async def _sample_rss(pid: int, phase: Phase, started: float, done: asyncio.Event) -> None:
    while not done.is_set():
        phase.rss.append((time.monotonic() - started, rss_mb(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=0.5)
    phase.rss.append((time.monotonic() - started, rss_mb(pid)))


async def run_phase(
    server: Server,
    tasks: list[str],
    *,
    clients: int,
    seconds: float,
    seed: int,
    until_requests: int | None = None,
) -> Phase:
    """`clients` clients for `seconds` (or until `until_requests` requests were answered, if sooner)."""
    phase = Phase(seconds)
    started = time.monotonic()
    deadline = started + seconds
    rngs = [random.Random(seed * 1000 + i) for i in range(clients)]
    done = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(server.pid, phase, started, done))
    await asyncio.gather(*(_client(server.base_url, tasks, phase, deadline, rng, until_requests) for rng in rngs))
    done.set()
    await sampler
    phase.seconds = min(seconds, time.monotonic() - started)
    phase.drain = max(0.0, time.monotonic() - deadline)
    return phase


@dataclass
class LoadReport:
    clients: int
    warmup: Phase
    run: Phase
    load_before: str
    load_after: str
    tasks_at_end: int

    def _rss_median(self, *, first: bool) -> float:
        """Median RSS over the first (or last) fifth of the time clients were sending."""
        points = [(t, mb) for t, mb in self.run.rss if t <= self.run.seconds] or self.run.rss
        fifth = self.run.seconds / 5
        if first:
            chosen = [mb for t, mb in points if t <= fifth]
        else:
            chosen = [mb for t, mb in points if t >= self.run.seconds - fifth]
        return statistics.median(chosen)

    @property
    def rss_start(self) -> float:
        return self._rss_median(first=True)

    @property
    def rss_end(self) -> float:
        return self._rss_median(first=False)

    @property
    def rss_growth(self) -> float:
        return self.rss_end - self.rss_start

    def rss_slope_mb_per_min(self) -> float:
        """Least-squares slope of RSS while clients were sending."""
        points = [(t, mb) for t, mb in self.run.rss if t <= self.run.seconds]
        mean_t = statistics.fmean(t for t, _ in points)
        mean_v = statistics.fmean(v for _, v in points)
        var = sum((t - mean_t) ** 2 for t, _ in points)
        return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0

    def summary(self) -> str:
        run = self.run
        lines = [
            f"{self.clients} clients for {run.seconds:.0f} s (+{run.drain:.1f} s to drain the requests in flight), "
            f"after a warm-up of {self.warmup.requests} requests ({self.warmup.seconds:.0f} s); "
            f"load average {self.load_before} -> {self.load_after}",
            f"requests: {run.requests} ({run.requests / run.seconds:.1f}/s); "
            + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(run.statuses.items()))
            + f"; errors: {len(run.errors)}; tasks at the end: {self.tasks_at_end}",
        ]
        for kind, values in run.latencies.items():
            if values:
                lines.append(
                    f"{kind}: p50 {percentile(values, 50) * 1000:.0f} ms, p99 {percentile(values, 99) * 1000:.0f} ms, "
                    f"max {max(values) * 1000:.0f} ms ({len(values)} answers)"
                )
        rss = [v for _, v in run.rss]
        lines.append(
            f"server RSS: {self.rss_start:.0f} -> {self.rss_end:.0f} MB (medians of the first / last fifth), "
            f"growth {self.rss_growth:+.1f} MB; samples {min(rss):.0f}-{max(rss):.0f} MB; slope "
            f"{self.rss_slope_mb_per_min():+.1f} MB/min; {self.warmup.rss[0][1]:.0f} MB before the warm-up"
        )
        return "\n".join(lines)


def setup_tasks(server: Server) -> list[str]:
    tasks = []
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        for labels in (("airplane", "automobile", "bird", "cat"), ("deer", "dog", "frog", "horse")):
            items = shots("train", labels, 4)
            response = client.post("/v1/tasks", files=parts(items), data={"labels": [label for _, label in items]})
            assert response.status_code == 201, response.text
            tasks.append(response.json()["id"])
    return tasks


def run_load(server: Server, *, clients: int, seconds: float, warmup_requests: int, seed: int) -> LoadReport:
    """Load a ready server (tasks are made first); the server is left running."""
    tasks = setup_tasks(server)
    load_before = load_average()
    warm = asyncio.run(
        run_phase(server, tasks, clients=clients, seconds=300, seed=seed, until_requests=warmup_requests)
    )
    measured = asyncio.run(run_phase(server, tasks, clients=clients, seconds=seconds, seed=seed + 1))
    return LoadReport(clients, warm, measured, load_before, load_average(), len(tasks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--warmup-requests", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-log", type=Path, help="copy the server log here")
    args = parser.parse_args(argv)
    from app.encoder.standin import ensure_standin
    from tests.conftest import MODEL_DATA_DIR

    ensure_standin(MODEL_DATA_DIR)
    work = Path(tempfile.mkdtemp(prefix="shotcache-load-"))
    print(f"{os.cpu_count()} CPUs; load average {load_average()}", flush=True)
    prepare_data_dir(work / "data", MODEL_DATA_DIR)
    server = Server(work / "data", work / "server.log")
    try:
        print(f"server ready in {server.wait_ready():.1f} s", flush=True)
        report = run_load(
            server, clients=args.clients, seconds=args.seconds, warmup_requests=args.warmup_requests, seed=args.seed
        )
        alive = server.process.poll() is None
    finally:
        server.kill()
        log = server.log_path.read_text(errors="replace")
        if args.keep_log:
            args.keep_log.write_text(log)
        shutil.rmtree(work, ignore_errors=True)
    print(report.summary())
    for error in report.run.errors[:10]:
        print("ERROR", error)
    errors = len(report.run.errors) + len(report.warmup.errors)
    trace = [round(mb) for t, mb in report.run.rss if t <= report.run.seconds][::10]  # every ~5 s
    print(json.dumps({"errors": errors, "rss_growth_mb": round(report.rss_growth, 1), "alive": alive, "rss": trace}))
    failures = request_failures(log)
    for line in failures[:10]:
        print("SERVER", line)
    return 0 if errors == 0 and alive and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
