"""Real `python -m app.cli serve` processes for the client, CLI and browser tests (one open, one with
API keys), on fresh data dirs with the built stand-in linked in, and the cifar10-mini images they use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, dataset_dir, link_model

READY_TIMEOUT = 240.0  # a cold start on the busy shared 2-core machine has taken a minute
ALICE_KEY = "alice-web-key-01"
# Three classes the stand-in tells apart well from a few shots (cifar10-mini).
CLASSES = ("airplane", "automobile", "frog")
SHOTS = 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(data_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOTCACHE_")}
    clean.update({"SHOTCACHE_THREADS": "2", "PYTHONPATH": str(REPO), **(env or {})})
    command = [sys.executable, "-m", "app.cli", "serve", "--model", "offline"]
    command += ["--data-dir", str(data_dir), "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=clean, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"not ready after {READY_TIMEOUT} s:\n{server.log()}")
        time.sleep(0.3)


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=30)
    assert "Traceback" not in server.log(), server.log()


def _serve(tmp: Path, model_data_dir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    data_dir = tmp / "data"
    link_model(data_dir, model_data_dir)
    server = start_server(data_dir, tmp / "server.log", env)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def open_server(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("web-open"), model_data_dir)


@pytest.fixture(scope="session")
def keyed_server(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(
        tmp_path_factory.mktemp("web-keyed"), model_data_dir, {"SHOTCACHE_API_KEYS": f"alice:{ALICE_KEY}"}
    )


def images(split: str, per_class: int, *, skip: int = 0, classes: tuple[str, ...] = CLASSES) -> dict[str, list[Path]]:
    root = dataset_dir("cifar10-mini") / split
    out = {}
    for name in classes:
        paths = sorted((root / name).glob("*.jpg"))[skip : skip + per_class]
        assert len(paths) == per_class, f"cifar10-mini {split}/{name} has too few images"
        out[name] = paths
    return out


@pytest.fixture(scope="session")
def shots() -> dict[str, list[Path]]:
    return images("train", SHOTS)


@pytest.fixture(scope="session")
def shot_folder(shots: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shots as a folder with one sub-folder per class (what `--from-folder` and the page take)."""
    root = tmp_path_factory.mktemp("shots") / "pets"
    for name, paths in shots.items():
        (root / name).mkdir(parents=True)
        for path in paths:
            (root / name / path.name).write_bytes(path.read_bytes())
    return root
