"""The real service over HTTP: `shotcache serve` in a subprocess, driven by client threads.

Per server (model x backend): task build time per shot, classify throughput and p50/p99 latency at
concurrency 1 and 8 (one image per request), the share of the server-side request time spent outside the
encoder (from /metrics), the mean encoder batch, and the server's peak RSS (VmHWM). The clients are the
load generator's (load_generator.py), on the same cores as the server.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.encoder.factory import create_encoder
from app.encoder.standin import standin_dir

from .common import VIT_NAME, BenchConfig, random_weights, sustained_per_second, table, time_calls
from .encoders import jpeg_bytes, raw_rate
from .load_generator import BODIES, drive
from .server_process import Server as ServerProcess

log = logging.getLogger(__name__)

READY_TIMEOUT = 600.0  # a first start may export the model


def torch_mapped(pid: int) -> bool:
    """Whether the process has libtorch mapped (a torch-free start never imports torch)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def peak_rss_mb(pid: int) -> dict[str, float]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class Server:
    """`shotcache serve` on a fresh data dir that links the bench data dir's model and export cache (the
    process itself is the one helper every test and benchmark starts: server_process.py)."""

    def __init__(
        self, config: BenchConfig, model: str, backend: str, extra_env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self.model = model
        self.backend = backend
        root = config.data_dir / "bench"
        root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="serve-", dir=root))
        data = self.folder / "data"
        data.mkdir()
        exports = (config.data_dir / "exports").resolve()
        exports.mkdir(parents=True, exist_ok=True)
        (data / "exports").symlink_to(exports, target_is_directory=True)
        env = {"SHOTCACHE_THREADS": str(config.threads), "SHOTCACHE_BACKEND": backend}
        env["SHOTCACHE_MAX_CREATE_FILES"] = "4096"
        env.update(extra_env or {})  # e.g. a setting an A/B compares (docs/scripts/fill_wait_ab.py)
        if model == "offline":
            link = standin_dir(data)
            link.parent.mkdir(parents=True)
            link.symlink_to(standin_dir(config.data_dir).resolve(), target_is_directory=True)
        else:
            env["SHOTCACHE_PRETRAINED"] = str(random_weights(model, config.data_dir).resolve())
        self.data = data
        self.pretrained = env.get("SHOTCACHE_PRETRAINED")
        self.log_path = self.folder / "server.log"
        self.server = ServerProcess(data, self.log_path, env, name=f"{model} server", model=model)
        self.process = self.server.process
        self.port = self.server.port
        self.base = self.server.base_url

    def wait_ready(self) -> float:
        return self.server.wait_ready(READY_TIMEOUT)

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def shots_and_probes(config: BenchConfig, shots: int) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """(label, JPEG) shots, `shots` per class of cifar10-mini train, and its test JPEGs as probes; synthetic
    coloured images in 10 classes when the dataset is absent."""
    train = config.datasets / "cifar10-mini" / "train"
    test = config.datasets / "cifar10-mini" / "test"
    if train.is_dir() and test.is_dir():
        pairs = [
            (folder.name, p.read_bytes())
            for folder in sorted(d for d in train.iterdir() if d.is_dir())
            for p in sorted(folder.glob("*.jpg"))[:shots]
        ]
        probes = [p.read_bytes() for p in sorted(test.glob("*/*.jpg"))[::10]]
        return pairs, probes
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (10, 3))
    pairs = []
    for label, colour in enumerate(colours):
        for _ in range(shots):
            pixels = np.clip(colour + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            pairs.append((f"class {label}", jpeg_bytes(_image(pixels))))
    return pairs, [data for _, data in pairs[::3]]


def _image(pixels: Any) -> Any:
    from PIL import Image

    return Image.fromarray(pixels)


def started_server(
    config: BenchConfig, model: str, backend: str, extra_env: Mapping[str, str] | None = None
) -> tuple[Server, dict[str, Any]]:
    """A ready server, started from a warm data dir where it can be: a start that loaded torch (the first
    of a model, which exports it and, for `auto`, measures the backends) is stopped and started again,
    torch-free. Its start: ready seconds, VmRSS right after the warm-up, whether torch is mapped, and the
    first start's ready seconds when it was redone."""
    server = Server(config, model, backend, extra_env)
    start: dict[str, Any] = {}
    try:
        start["ready_s"] = server.wait_ready()
        if backend != "torch" and torch_mapped(server.process.pid):
            start["first_start_ready_s"] = start["ready_s"]
            server.stop()
            server = Server(config, model, backend, extra_env)
            start["ready_s"] = server.wait_ready()
        start["rss_ready_mb"] = peak_rss_mb(server.process.pid).get("VmRSS", float("nan"))
        start["torch_mapped"] = torch_mapped(server.process.pid)
    except BaseException:
        server.stop()
        raise
    return server, start


class RawReference:
    """The server's own encoder (its data dir, the backend it runs, `create_encoder`), opened in this process and
    timed while the server idles, right after a served run: the host's speed drifts by 10-35% within an hour
    here, so only a raw rate measured next to a served one is a fair reference for it."""

    def __init__(self, server: Server, backend: str) -> None:
        weights = {"pretrained": server.pretrained} if server.pretrained else {}
        settings = server.config.settings(
            backend, model=server.model, data_dir=server.data, text_tower_idle_s=0, **weights
        )
        self.encoder, _ = create_encoder(settings)

    def rate(self, batch: int, seconds: float) -> float:
        """img/s at `batch`: the best of the sustained rounds of `seconds` of calls (random uint8 crops)."""
        size = self.encoder.input_size
        crops = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        times = time_calls(lambda: self.encoder.encode_crops(crops), min_seconds=seconds, min_calls=6)
        return sustained_per_second(batch, times)


def bench_server(config: BenchConfig, model: str, backend: str, encoder: dict[str, Any] | None) -> dict[str, Any]:
    shots_per_class = 4 if config.quick else 16
    server, start = started_server(config, model, backend)
    try:
        with httpx.Client(base_url=server.base, timeout=600) as client:
            info = client.get("/v1/info").json()["model"]
            shots, probes = shots_and_probes(config, shots_per_class)
            files = [("images", (f"shot{i}.jpg", data, "image/jpeg")) for i, (_, data) in enumerate(shots)]
            started = time.perf_counter()
            response = client.post("/v1/tasks", files=files, data={"labels": [label for label, _ in shots]})
            build_s = time.perf_counter() - started
            response.raise_for_status()
            task = response.json()
        bodies = BODIES[:1] if config.quick else BODIES
        reference = RawReference(server, info["backend"])
        runs = []
        for body in bodies:
            for clients in (1, 8):
                run = drive(server.base, task["id"], probes, clients, config.serve_seconds, body)
                if clients == 8:  # the raw encoder at batch 8 right after it, the server idle
                    run["raw_next_img_per_s"] = reference.rate(8, config.serve_seconds / 2)
                    run["served_vs_next"] = run["throughput"] / run["raw_next_img_per_s"]
                runs.append(run)
        del reference
        memory = peak_rss_mb(server.process.pid)
    finally:
        server.stop()
    label = "offline" if model == "offline" else VIT_NAME
    for run in runs:
        prefix = "offline-standin" if label == "offline" else label
        # Against the encoder section's row of the backend this server runs (what `auto` chose here): its
        # sustained rate (best round of calls), a throughput as the served one is, and its fastest call.
        batch = min(run["concurrency"], 32)
        fastest = raw_rate(encoder, prefix, info["backend"], batch)
        sustained = raw_rate(encoder, prefix, info["backend"], batch, sustained=True)
        run["raw_img_per_s"] = fastest
        run["served_vs_raw"] = run["throughput"] / fastest if fastest else None
        run["raw_sustained_img_per_s"] = sustained
        run["served_vs_sustained"] = run["throughput"] / sustained if sustained else None
    return {
        "model": info["name"] + (" (random init)" if "random-init" in str(info.get("pretrained")) else ""),
        "backend": backend,
        "used": info["backend"],
        **start,
        "shots": len(shots),
        "classes": len({label for label, _ in shots}),
        "build_s": build_s,
        "build_ms_per_shot": 1000 * build_s / len(shots),
        "method": task.get("method"),
        "runs": runs,
        "peak_rss_mb": memory.get("VmHWM", float("nan")),
    }


def bench_served(config: BenchConfig, encoder: dict[str, Any] | None) -> dict[str, Any]:
    # The stand-in on `auto`'s pick, on ONNX Runtime fp32 (the pick before OpenVINO ran it at fp32; the served
    # ratios depend on how fast the encoder is), and on the torch path.
    plan = [("offline", "auto"), ("offline", "onnx"), ("offline", "torch")]
    if VIT_NAME in config.models and not config.quick:
        plan.append((VIT_NAME, "auto"))
    if config.quick:
        plan = plan[:1]
    rows = []
    for model, backend in plan:
        log.info("bench: serving %s with backend %s", model, backend)
        rows.append(bench_server(config, model, backend, encoder))
    return {"rows": rows}


def served_markdown(result: dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        for run in r["runs"]:
            vs_raw = " / ".join(
                f"{100 * run[key]:.0f}%" if run.get(key) else "n/a"
                for key in ("served_vs_next", "served_vs_sustained", "served_vs_raw")
            )
            rows.append(
                [
                    r["model"],
                    f"{r['backend']} → {r['used']}",
                    run.get("body", "multipart"),
                    run["concurrency"],
                    f"{run['throughput']:.1f}",
                    vs_raw,
                    f"{run['p50_ms']:.1f}",
                    f"{run['p99_ms']:.1f}",
                    f"{run['server_request_ms']:.1f}",
                    f"{run['encode_call_ms']:.1f}",
                    f"{100 * run['outside_share']:.0f}%",
                    f"{run['mean_batch']:.1f}",
                    run["failures"],
                ]
            )
    served = table(
        [
            "model",
            "backend",
            "request body",
            "clients",
            "img/s",
            "of raw encoder: measured right after / best round / fastest call",
            "p50 ms",
            "p99 ms",
            "server ms/request",
            "encoder ms/call",
            "outside encoder",
            "images/encoder call",
            "errors",
        ],
        rows,
        "lll" + "r" * 10,
    )
    build_rows = [
        [
            r["model"],
            f"{r['backend']} → {r['used']}",
            f"{r['classes']} x {r['shots'] // max(r['classes'], 1)}",
            f"{r['build_s']:.2f}",
            f"{r['build_ms_per_shot']:.1f}",
            r["method"],
            f"{r['ready_s']:.1f}",
            f"{r['rss_ready_mb']:.0f}" if "rss_ready_mb" in r else "n/a",
            {True: "yes", False: "no"}.get(r.get("torch_mapped"), "n/a"),
            f"{r['peak_rss_mb']:.0f}",
        ]
        for r in result["rows"]
    ]
    builds = table(
        [
            "model",
            "backend",
            "classes x shots",
            "task build s",
            "build ms/shot",
            "method",
            "start s (warm data dir)",
            "RSS after warm-up MB",
            "torch mapped",
            "peak RSS MB",
        ],
        build_rows,
        "llrrrlrrlr",
    )
    return served + "\n\n" + builds
