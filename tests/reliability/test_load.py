"""The real `shotcache serve` under concurrent load, and its backpressure, on loopback.

One server serves both tests (a start costs 12-20 s here). It runs with SHOTCACHE_QUEUE_SIZE=64 images:
the load test's 16 clients x 2 images can never fill it (so the load sees the default behaviour), and the
backpressure test's burst of 16 x 32 images overflows it eight times over.

The CI load run is short (SHOTCACHE_LOAD_SECONDS, default 10 s after a 32-request warm-up); the figures in
docs/reliability.md come from the 30 s run of `python -m tests.reliability.load`, the same code.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.server_process import Server, prepare_data_dir, request_failures

from .images import DatasetMissingError, dataset_root, image_paths, parts, shots
from .load import percentile, run_load

QUEUE_SIZE = 64
LOAD_SECONDS = float(os.environ.get("SHOTCACHE_LOAD_SECONDS", "10"))
WARMUP_REQUESTS = int(os.environ.get("SHOTCACHE_LOAD_WARMUP_REQUESTS", "32"))
# A leak of 1.5 MB per request shows as more than this over a 10 s run (~100 requests); the healthy server measured
# -45 to +10 MB (docs/reliability.md).
MAX_RSS_GROWTH_MB = 150.0


@pytest.fixture(scope="module")
def server(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    try:
        dataset_root()
    except DatasetMissingError as exc:
        pytest.skip(str(exc))
    work = tmp_path_factory.mktemp("load")
    prepare_data_dir(work / "data", model_data_dir)
    server = Server(work / "data", work / "server.log", env={"SHOTCACHE_QUEUE_SIZE": str(QUEUE_SIZE)})
    try:
        server.wait_ready()
        yield server
        assert server.process.poll() is None, server.log_tail()
        assert not request_failures(server.log_path.read_text()), server.log_tail(200)
    finally:
        server.kill()


@pytest.mark.slow
def test_mixed_load_has_no_errors_and_no_memory_growth(server: Server) -> None:
    report = run_load(server, clients=16, seconds=LOAD_SECONDS, warmup_requests=WARMUP_REQUESTS, seed=1)
    print("\n" + report.summary())
    run = report.run
    assert not run.errors, run.errors[:10]
    assert not report.warmup.errors, report.warmup.errors[:10]
    assert {status for _, status in run.statuses} <= {200, 201, 429}, run.statuses
    assert len(run.latencies["classify"]) >= 16, report.summary()  # it did run under load
    assert run.latencies["create"] or report.warmup.latencies["create"], report.summary()
    assert percentile(run.latencies["classify"], 99) < 30, report.summary()
    assert report.rss_growth < MAX_RSS_GROWTH_MB, report.summary()


def _rejected_total(client: httpx.Client) -> float:
    match = re.search(r"^shotcache_queue_rejected_total (\S+)$", client.get("/metrics").text, re.MULTILINE)
    assert match, "shotcache_queue_rejected_total missing from /metrics"
    return float(match.group(1))


@pytest.mark.slow
def test_a_burst_past_the_queue_gets_429_with_retry_after_and_nothing_else_fails(server: Server) -> None:
    images = [p for label in ("cat", "dog", "ship", "frog") for p in image_paths("test", label)[:8]]  # 32
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        items = shots("train", ("cat", "dog"), 2)
        response = client.post("/v1/tasks", files=parts(items), data={"labels": [label for _, label in items]})
        assert response.status_code == 201, response.text
        task_id = response.json()["id"]
        rejected_before = _rejected_total(client)

    burst = 16
    start = threading.Barrier(burst)
    first: list[httpx.Response | BaseException] = [ValueError("not sent")] * burst
    final: list[httpx.Response | BaseException] = [ValueError("not sent")] * burst
    attempts = [0] * burst

    def client_thread(i: int) -> None:
        try:
            with httpx.Client(base_url=server.base_url, timeout=120) as client:
                start.wait()
                deadline = time.monotonic() + 90
                while True:
                    attempts[i] += 1
                    response = client.post(f"/v1/tasks/{task_id}/classify", files=parts(images), data={"top_k": "2"})
                    if attempts[i] == 1:
                        first[i] = response
                    if response.status_code != 429 or time.monotonic() > deadline:
                        final[i] = response
                        return
                    time.sleep(float(response.headers["retry-after"]))  # as advised
        except BaseException as exc:
            first[i] = final[i] = exc

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)

    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in first]
    assert set(statuses) <= {200, 429}, statuses  # nothing else fails
    assert statuses.count(429) >= 1, statuses  # the burst did overflow the queue
    assert statuses.count(200) >= 1, statuses  # and what fitted was served
    busy: list[httpx.Response] = []
    for answer in first:
        assert isinstance(answer, httpx.Response)
        if answer.status_code == 429:
            busy.append(answer)
            assert answer.headers["retry-after"].isdigit(), answer.headers
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.headers["content-type"].startswith("application/json")
            assert answer.json() == {"error": {"code": "busy", "message": answer.json()["error"]["message"]}}
            assert "queue is full" in answer.json()["error"]["message"]
        else:
            assert len(answer.json()["results"]) == len(images)
    # Clients that waited as told were all served in the end.
    final_statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in final]
    assert final_statuses == [200] * burst, (final_statuses, attempts)
    for answer in final:
        assert isinstance(answer, httpx.Response)
        assert len(answer.json()["results"]) == len(images)

    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        # Every 429 is counted (the counter may include this test's retries' 429s as well).
        assert _rejected_total(client) - rejected_before == sum(attempts) - burst
        queue = client.get("/v1/info").json()["queue"]
        assert (queue["pending_images"], queue["capacity"]) == (0, QUEUE_SIZE), queue
        assert client.get("/readyz").status_code == 200
    print(
        f"\nburst of {burst} x {len(images)} images: first answers {statuses.count(200)} x 200, "
        f"{len(busy)} x 429 (Retry-After {sorted({r.headers['retry-after'] for r in busy})} s); "
        f"all served after {sum(attempts)} attempts"
    )
