"""`shotcache serve` as a real process on a real socket: ready, create, classify, refuse a big body,
then a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import accuracy, assert_error, cifar_images, files_of, labels_of, link_standin

REPO = Path(__file__).resolve().parents[2]
SHOTCACHE = Path(sys.executable).parent / "shotcache"
READY_TIMEOUT = 120.0
EXIT_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(model_data_dir: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    assert SHOTCACHE.exists(), f"{SHOTCACHE} missing: is the project installed in this virtualenv?"
    data_dir = tmp_path / "data"
    link_standin(data_dir, model_data_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOTCACHE_")}
    env.update(SHOTCACHE_THREADS="2", SHOTCACHE_MAX_REQUEST_MB="1")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(SHOTCACHE), "serve", "--model", "offline", "--data-dir", str(data_dir), "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT} s:\n{log_path.read_text()}"
            time.sleep(0.5)
        yield base, process, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=EXIT_TIMEOUT)


def test_serve_over_a_socket(server: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    base, process, log_path = server
    shots = cifar_images("train", ("automobile", "frog"), 3)
    probes = cifar_images("test", ("automobile", "frog"), 3)
    with httpx.Client(base_url=base, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        info = client.get("/v1/info").json()
        assert info["model"]["standin"] is True

        response = client.post("/v1/tasks", files=files_of(shots), data={"labels": labels_of(shots)})
        assert response.status_code == 201, response.text
        task = response.json()
        assert task["model"] == info["model"]["model_id"]
        response = client.post(f"/v1/tasks/{task['id']}/classify", files=files_of(probes), data={"top_k": 2})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert len(answer["results"]) == len(probes)
        assert all(len(r["top_k"]) == 2 for r in answer["results"])
        # Two very different classes from 3 shots each: measured 6/6 with the stand-in; chance is 1/2.
        assert accuracy(answer, probes) >= 4 / 6

        # A body over the limit (1 MB here) is refused, declared or streamed, and the server stays up.
        big = [("images", ("big.jpg", b"\xff\xd8\xff" + bytes(1_200_000), "image/jpeg"))]
        too_big = client.post(f"/v1/tasks/{task['id']}/classify", files=big)
        assert_error(too_big, 413, "request_too_large")
        request = client.build_request("POST", f"/v1/tasks/{task['id']}/classify", files=big)
        body = request.read()
        streamed = client.post(
            f"/v1/tasks/{task['id']}/classify",
            content=(body[i : i + 65536] for i in range(0, len(body), 65536)),  # chunked: no Content-Length
            headers={"content-type": request.headers["content-type"]},
        )
        assert_error(streamed, 413, "request_too_large")
        assert client.get(f"/v1/tasks/{task['id']}").status_code == 200

    process.send_signal(signal.SIGTERM)
    # Uvicorn shuts down gracefully, then re-raises the signal: the exit status is 0 or "terminated by
    # SIGTERM" (both a clean stop to systemd and docker); the log shows the lifespan finished.
    assert process.wait(timeout=EXIT_TIMEOUT) in (0, -signal.SIGTERM), log_path.read_text()
    log = log_path.read_text()
    assert "Application shutdown complete" in log, log
    assert "Finished server process" in log, log
    assert "offline-standin" in log  # says it serves the stand-in
    assert "Traceback" not in log, log
