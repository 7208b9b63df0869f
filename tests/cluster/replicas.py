"""Real `shotcache serve` replicas on one PostgreSQL store: each its own process, port and data dir.

Started with `sys.executable -m app.cli serve` (this checkout's code, PYTHONPATH inherited), the offline
stand-in model linked into each data dir, one thread each (two replicas share two cores). Importable
without pytest so the cluster benchmark can use it too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
PORTS = range(18300, 18400)
READY_TIMEOUT_S = 300.0  # a cold start on a busy 2-core machine has taken 60 s


def free_port(taken: set[int] = set()) -> int:  # noqa: B006 (on purpose: ports handed out by this process)
    for port in PORTS:
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS}")


class Replica:
    """One `shotcache serve --model offline` process on `store_url`; its output goes to `log_path`."""

    def __init__(
        self, name: str, data_dir: Path, store_url: str, log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.data_dir = data_dir
        self.store_url = store_url
        self.log_path = log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOTCACHE_")}
        clean.update(
            {
                "PYTHONPATH": str(REPO),
                "SHOTCACHE_STORE": self.store_url,
                "SHOTCACHE_THREADS": "1",
                "SHOTCACHE_WORKERS": "2",
                **self.extra_env,
            }
        )
        command = [sys.executable, "-m", "app.cli", "serve", "--model", "offline"]
        command += ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=clean, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, like a node lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def start_replicas(
    names: Sequence[str], root: Path, store_url: str, model_data_dir: Path, env: Mapping[str, str] | None = None
) -> list[Replica]:
    """Start replicas side by side (their model loads overlap) and wait until all are ready."""
    from tests.conftest import link_model

    replicas = []
    for name in names:
        data_dir = root / name / "data"
        link_model(data_dir, model_data_dir)
        replicas.append(Replica(name, data_dir, store_url, root / f"{name}.log", env))
    try:
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.kill()
        raise
    return replicas


def multipart(shots: Sequence[tuple[Path, str]], **form: Any) -> dict[str, Any]:
    """httpx keyword arguments for an upload of (image, label) pairs plus form fields."""
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path, _ in shots]
    return {"files": files, "data": {"labels": [label for _, label in shots], **form}}


def images(paths: Sequence[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
