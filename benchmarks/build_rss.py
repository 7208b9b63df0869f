"""Resident memory of one `shotcache serve` per phase: ready, a 160-shot task build, classify load.

    PYTHONPATH=$PWD python -m benchmarks.build_rss --data-dir DIR [--model ViT-B-32|offline]

The server is the served section's (benchmarks/served.py: a fresh data dir linking DIR's exports, backend
`auto`); the task is 16 cifar10-mini train shots per class, as there. A thread samples VmRSS every 10 ms, so
each phase's peak is its own (VmHWM alone only gives the peak of the whole run); RssAnon / RssFile split
the resident set into heap and mapped files (an OpenVINO IR's weights are a mapped file).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import httpx

from .common import VIT_NAME, BenchConfig
from .load_generator import drive
from .served import Server, shots_and_probes

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def memory_mb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name = line.split(":")[0]
        if name in FIELDS:
            out[name] = int(line.split()[1]) // 1024
    return out


class Sampler:
    """VmRSS of `pid` every 10 ms, so a phase's peak can be read afterwards."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.samples.append((time.monotonic(), memory_mb(self.pid)["VmRSS"]))
            except (OSError, KeyError):
                return

    def peak_since(self, started: float) -> int:
        return max((rss for at, rss in self.samples if at >= started), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the bench data dir (its exports are reused)")
    parser.add_argument("--model", default=VIT_NAME, help=f"offline or {VIT_NAME} (random init)")
    parser.add_argument("--seconds", type=float, default=6.0, help="classify load per body and concurrency")
    args = parser.parse_args()
    config = BenchConfig(data_dir=args.data_dir, threads=int(os.environ.get("SHOTCACHE_THREADS", "2")))
    server = Server(config, args.model, "auto")
    sampler = Sampler(server.process.pid)
    pid = server.process.pid
    try:
        ready_s = server.wait_ready()
        print(f"ready in {ready_s:.1f} s: {memory_mb(pid)}", flush=True)
        shots, probes = shots_and_probes(config, 16)
        files = [("images", (f"shot{i}.jpg", data, "image/jpeg")) for i, (_, data) in enumerate(shots)]
        with httpx.Client(base_url=server.base, timeout=600) as client:
            started = time.monotonic()
            response = client.post("/v1/tasks", files=files, data={"labels": [label for label, _ in shots]})
            response.raise_for_status()
        task = response.json()
        print(
            f"{len(shots)}-shot build: peak {sampler.peak_since(started)} MB, then {memory_mb(pid)};"
            f" method {task['method']}, loo_accuracy {task['loo_accuracy']}, hyperparams {task['hyperparams']}",
            flush=True,
        )
        started = time.monotonic()
        for body in ("multipart", "raw"):
            for clients in (1, 8):
                drive(server.base, task["id"], probes, clients, args.seconds, body)
        print(f"classify load: peak {sampler.peak_since(started)} MB, then {memory_mb(pid)}", flush=True)
    finally:
        sampler.stop()
        server.stop()


if __name__ == "__main__":
    main()
