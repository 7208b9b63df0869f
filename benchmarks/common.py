"""What every benchmark section shares: the machine description, timing, the models under test, tables."""

from __future__ import annotations

import datetime as dt
import gc
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.encoder.encoder import Encoder
from app.encoder.factory import encoder_for
from app.encoder.load import LoadedModel, ModelSource, load_model
from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("SHOTCACHE_BENCH_DATASETS", REPO.parent / "shared" / "datasets"))
BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8")  # those not installed fall back
DATASET_NAMES = ("cifar10-mini", "textile-defects")
VIT_NAME = "ViT-B-32"
VIT_WEIGHTS = "ViT-B-32-random-init.pt"  # the file name is the identity's `pretrained` label


@dataclass
class BenchConfig:
    data_dir: Path
    threads: int
    quick: bool = False
    models: tuple[str, ...] = ("offline", VIT_NAME)
    batches: tuple[int, ...] = (1, 8, 32)
    min_seconds: float = 3.0  # per timed cell; at least `min_calls` calls
    min_calls: int = 3
    serve_seconds: float = 12.0  # per concurrency level
    probes: int = 32  # real images for the cosine between backends
    datasets: Path = DATASETS
    command: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    def settings(self, backend: str, **overrides: Any) -> Settings:
        return Settings(
            **{"model": "offline", "backend": backend, "data_dir": self.data_dir, "threads": self.threads, **overrides}
        )


def machine() -> dict[str, Any]:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "isa": isa,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": load_average(),
    }


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def time_calls(action: Callable[[], object], *, min_seconds: float, min_calls: int) -> list[float]:
    """Seconds per call: one warm-up call, then calls until both `min_seconds` and `min_calls` are reached."""
    action()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        action()
        times.append(time.perf_counter() - t0)
    return times


def per_second(items: int, times: Sequence[float]) -> float:
    """Items per second of the fastest call: on a shared machine the other calls measure the neighbours'
    load (thread wake-ups of a busy 2-core box cost whole scheduler ticks), on a quiet one they agree."""
    return items / min(times)


SUSTAINED_ROUNDS = 6  # consecutive rounds a timed cell's calls are split into for its sustained rate


def sustained_per_second(items: int, times: Sequence[float], rounds: int = SUSTAINED_ROUNDS) -> float:
    """Items per second of the best of `rounds` consecutive rounds of calls (each round's calls over their
    summed time; fewer rounds when there are fewer calls): a throughput, which is what a served rate is, as
    against `per_second`'s fastest single call. Issue 15 measured its raw encoder figures this way (the
    fastest of 6 rounds)."""
    if not times:
        raise ValueError("no timed calls")
    chunks = np.array_split(np.asarray(times, dtype=np.float64), min(rounds, len(times)))
    return max(items * chunk.size / float(chunk.sum()) for chunk in chunks)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ---- the models under test ----------------------------------------------------------------------
def load_bench_model(name: str, config: BenchConfig) -> LoadedModel:
    """The stand-in (`offline`) or a named open_clip model with random weights (same FLOPs as the real one).

    Random weights are drawn once with a fixed seed and kept in `<data_dir>/bench/`, so the identity (and the
    export cache keyed by it) is the same on every run and in the served benchmark's server process."""
    if name == "offline":
        return load_model(ModelSource.parse("offline", None), config.data_dir)
    return load_model(ModelSource("named", name, str(random_weights(name, config.data_dir))), config.data_dir)


def random_weights(name: str, data_dir: Path) -> Path:
    import open_clip
    import torch

    path = data_dir / "bench" / (VIT_WEIGHTS if name == VIT_NAME else f"{name}-random-init.pt")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model(name)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return path


def make_encoder(loaded: LoadedModel, backend: str, config: BenchConfig) -> Encoder:
    return encoder_for(loaded, backend, config.settings(backend, max_batch=max(config.batches)))


def backend_encoders(
    loaded: LoadedModel, backends: Sequence[str], config: BenchConfig
) -> Iterator[tuple[str, Encoder, float]]:
    """(backend, its encoder, seconds to prepare it) for each backend in turn. The caller ends its loop body
    with `del encoder`; the previous encoder is then collected before the next is made, so two backends'
    sessions are never in memory at once."""
    for backend in backends:
        gc.collect()
        started = time.perf_counter()
        encoder = make_encoder(loaded, backend, config)
        yield backend, encoder, time.perf_counter() - started
        del encoder
    gc.collect()


def model_label(loaded: LoadedModel) -> str:
    identity = loaded.identity
    if identity.pretrained and "random-init" in identity.pretrained:
        return f"{identity.name} (random init)"
    return identity.name


# ---- markdown -----------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A markdown table; `align` is one char per column, `l` or `r` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
