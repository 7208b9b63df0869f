"""The real `shotcache serve` process for the reliability tests: start on a data dir, wait until ready,
SIGKILL, read its memory. Shared by the crash loop and the load and backpressure tests.

Importable without pytest, so `python -m tests.reliability.crash_loop` and `... .load` can use it too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
SHOTCACHE = Path(sys.executable).parent / "shotcache"
READY_TIMEOUT = 240.0  # a cold start on a busy 2-core machine has taken 60 s; the usual is 12-20 s


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_data_dir(data_dir: Path, model_data_dir: Path) -> None:
    """A fresh data dir with the built stand-in model and its exports linked in (not rebuilt per server)."""
    from tests.conftest import link_model

    link_model(data_dir, model_data_dir)


class Server:
    """One `shotcache serve --model offline` process; `log_path` collects its output."""

    def __init__(self, data_dir: Path, log_path: Path, env: Mapping[str, str] | None = None) -> None:
        assert SHOTCACHE.exists(), f"{SHOTCACHE} missing: is the project installed in this virtualenv?"
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOTCACHE_")}
        clean.update({"SHOTCACHE_THREADS": "2", **(env or {})})
        self.started_at = time.monotonic()
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(SHOTCACHE),
                    "serve",
                    "--model",
                    "offline",
                    "--data-dir",
                    str(data_dir),
                    "--port",
                    str(self.port),
                ],
                cwd=REPO,
                env=clean,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.ready_after: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Block until /readyz answers 200; returns the seconds since start."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    return self.ready_after
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a power cut to the process."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# What the server logs when a request fails unexpectedly: the service's own 500 handler, and uvicorn's.
REQUEST_FAILURE_MARKERS = ("unhandled error on", "Exception in ASGI application")


def request_failures(log: str) -> list[str]:
    """Log lines of requests that failed with an unexpected exception (answered 500 or dropped)."""
    return [line for line in log.splitlines() if any(marker in line for marker in REQUEST_FAILURE_MARKERS)]
