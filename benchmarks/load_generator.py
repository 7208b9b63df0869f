"""The bench's load generator: client threads POSTing one-image classify requests to a running server, and
what the server's /metrics say about them (encoder calls, request time, batch sizes).

Each client thread keeps one HTTP/1.1 connection of the standard library's `http.client` open (about 0.4 ms of
CPU per request here, against about 1 ms for httpx, which the bench used before: docs/benchmarks.md, request
path). It runs on the same cores as the server, so its CPU is taken from the server's; real clients run on
other machines, and what is left of its cost is still part of the numbers.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from .common import percentile

CLASSIFY_ROUTE = "/v1/tasks/{task_id}/classify"
# Label values may hold braces (route="/v1/tasks/{task_id}/classify"): the label set ends at the last "}".
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")


def scrape(client: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics, keyed `name{labels}`."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        match = _METRIC.match(line)
        if match and not line.startswith("#"):
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def _sample(metrics: dict[str, float], name: str, route: str | None = None) -> float:
    total = 0.0
    for key, value in metrics.items():
        if key == name or (key.startswith(name + "{") and (route is None or f'route="{route}"' in key)):
            total += value
    return total


BODIES = ("multipart", "raw")  # a one-image multipart form; the image as the body (Content-Type: image/jpeg)
_BOUNDARY = "shotcache-bench-boundary"


def multipart_image(data: bytes, filename: str = "probe.jpg") -> bytes:
    """A form with one `images` file part (what `curl -F images=@probe.jpg` sends)."""
    head = (
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{filename}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    return b"".join((head.encode(), data, f"\r\n--{_BOUNDARY}--\r\n".encode()))


def connect(base: str, timeout: float = 120) -> http.client.HTTPConnection:
    """One keep-alive connection to `base` (http://host:port)."""
    parts = urlsplit(base)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)


def post_probe(connection: http.client.HTTPConnection, path: str, probe: bytes, body: str) -> int:
    """POST one image (`body`: one of BODIES) on `connection`, read the whole answer; its status."""
    if body == "raw":
        payload, content_type = probe, "image/jpeg"
    else:
        payload, content_type = multipart_image(probe), f"multipart/form-data; boundary={_BOUNDARY}"
    connection.request("POST", path, body=payload, headers={"Content-Type": content_type})
    response = connection.getresponse()
    response.read()
    return response.status


def drive(
    base: str, task_id: str, probes: list[bytes], concurrency: int, seconds: float, body: str = "multipart"
) -> dict[str, Any]:
    """`concurrency` threads, each on its own keep-alive connection, POSTing one-image classify requests
    (`body`: one of BODIES) back to back for `seconds`."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    deadline = [0.0]
    start_barrier = threading.Barrier(concurrency + 1)

    def worker(offset: int) -> None:
        connection = connect(base)
        try:
            path = f"/v1/tasks/{task_id}/classify"
            i = offset
            for _ in range(2):  # warm-up: connection and the first batch
                post_probe(connection, path, probes[i % len(probes)], body)
            start_barrier.wait()
            while time.perf_counter() < deadline[0]:
                i += concurrency
                t0 = time.perf_counter()
                status = post_probe(connection, path, probes[i % len(probes)], body)
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed) if status == 200 else failures.append(status)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=base, timeout=30) as client:
        deadline[0] = time.perf_counter() + 3600  # set for real once every worker is warm
        start_barrier.wait()
        before = scrape(client)
        started = time.perf_counter()
        deadline[0] = started + seconds
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        after = scrape(client)
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    encode_sum = _sample(delta, "shotcache_encode_seconds_sum")
    encode_calls = _sample(delta, "shotcache_encode_seconds_count")
    request_sum = _sample(delta, "shotcache_http_request_seconds_sum", CLASSIFY_ROUTE)
    request_count = _sample(delta, "shotcache_http_request_seconds_count", CLASSIFY_ROUTE)
    batch_images = _sample(delta, "shotcache_encode_batch_images_sum")
    return {
        "concurrency": concurrency,
        "body": body,
        "requests": len(latencies),
        "failures": len(failures),
        "throughput": len(latencies) / wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_ms": 1000 * float(np.mean(latencies)) if latencies else float("nan"),
        "server_request_ms": 1000 * request_sum / max(request_count, 1),
        "encode_call_ms": 1000 * encode_sum / max(encode_calls, 1),
        "mean_batch": batch_images / max(encode_calls, 1),
        # Share of the server's request time not spent in an encoder call (the warm-up excluded).
        "outside_share": 1 - encode_sum / request_sum if request_sum > 0 else float("nan"),
    }
