"""The real `shotcache serve` process for every test and benchmark that needs one: start on a data dir
(optionally on a shared store), wait until ready, SIGKILL or stop, restart on the same port, read its
memory and its log; replicas on one PostgreSQL store. Used by the reliability tests (crash loop, load,
backpressure), the web tests, the cluster tests and `shotcache bench` (served, cluster). Needs neither
pytest nor the tests package.

Started as `sys.executable -m app.cli serve --model <model>` (default: offline) with PYTHONPATH at this
checkout, so the server runs this worktree's code; every inherited SHOTCACHE_ variable is dropped and only `env` is set.
Ports: `SHOTCACHE_TEST_PORTS=LOW-HIGH` confines them to a range (several checkouts testing side by side
on one machine); else the kernel picks a free one.
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

import httpx

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 300.0  # a cold start on a busy 2-core machine has taken 60 s; the usual is 12-20 s


def free_port(taken: set[int] = set()) -> int:  # noqa: B006 (on purpose: ports handed out by this process)
    """A free loopback port, in SHOTCACHE_TEST_PORTS if set; never one this process handed out before."""
    bounds = os.environ.get("SHOTCACHE_TEST_PORTS")
    if not bounds:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    low, _, high = bounds.partition("-")
    for port in range(int(low), int(high or low) + 1):
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port in SHOTCACHE_TEST_PORTS={bounds}")


def link_model(data_dir: Path, model_data_dir: Path) -> None:
    """Link the built stand-in and its ONNX exports into a fresh data dir, so a server started on it
    (in-process or a subprocess) neither rebuilds the model nor re-exports it."""
    from app.encoder.standin import standin_dir

    link = standin_dir(data_dir)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(standin_dir(model_data_dir.resolve()), target_is_directory=True)
    exports = model_data_dir.resolve() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "exports").is_symlink():
        (data_dir / "exports").symlink_to(exports, target_is_directory=True)


prepare_data_dir = link_model  # what a server's data dir needs before its first start


class Server:
    """One `shotcache serve --model <model>` process on 127.0.0.1; its output is appended to `log_path`."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        name: str = "server",
        model: str = "offline",
    ) -> None:
        self.name = name
        self.model = model
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = {"SHOTCACHE_THREADS": "2", **(env or {})}
        self.port = free_port()
        self.base_url = self.url = f"http://127.0.0.1:{self.port}"
        self.ready_after: float | None = None
        self.start()

    def start(self) -> None:
        """Start the process (again, after a kill: same port, data dir and settings)."""
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SHOTCACHE_")}
        clean.update({"PYTHONPATH": str(REPO), **self.env})
        command = [sys.executable, "-m", "app.cli", "serve", "--model", self.model]
        command += ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=clean, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Block until /readyz answers 200; returns the seconds since start."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    return self.ready_after
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like a power cut to the process (or a node lost)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), SIGKILL if it has not exited after 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"


def replica(
    name: str, root: Path, store_url: str, model_data_dir: Path, env: Mapping[str, str] | None = None
) -> Server:
    """Start (not wait for) replica `name` of a cluster on `store_url`, its data dir and log under `root`:
    the offline stand-in linked in, one thread (two replicas share two cores)."""
    data_dir = root / name / "data"
    prepare_data_dir(data_dir, model_data_dir)
    settings = {"SHOTCACHE_STORE": store_url, "SHOTCACHE_THREADS": "1", "SHOTCACHE_WORKERS": "2", **(env or {})}
    return Server(data_dir, root / f"{name}.log", settings, name=name)


def start_replicas(
    names: Sequence[str], root: Path, store_url: str, model_data_dir: Path, env: Mapping[str, str] | None = None
) -> list[Server]:
    """Start replicas side by side (their model loads overlap) and wait until all are ready."""
    replicas = [replica(name, root, store_url, model_data_dir, env) for name in names]
    try:
        for started in replicas:
            started.wait_ready()
    except BaseException:
        for started in replicas:
            started.kill()
        raise
    return replicas


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
