"""Resident memory of loaded tasks and their restore time, through the service's own code paths.

One task per size is built as the service builds one (`make_supports`, then every method fitted on the shared
support: tuned by leave-one-out with `fit_methods` as a default build does, or, where that search takes too
long for a bench (1000 classes: many minutes on 2 cores), fitted with its default hyper-parameters by the same
`fit_method` the service uses when a client gives them; the stored and restored state has the same arrays
either way, less the tuning report's per-shot labels), stored `copies` times through `to_snapshot` +
`LocalDirStore.save`, then a fresh process (spawned, so no freed build memory is reused) restores them with
`TaskRegistry.restore` (the service's startup: `load_all` + `from_snapshot`, which fits each task's own method
only). Reported: the RSS growth per restored task as a multiple of its raw key + text bytes (float32 keys
[N*K, d] and text [N, d]), and the wall time of the whole restore; then the same once every method of every
task has been used (each fitted on its first use, `Task.model`), with the time those first uses took, and
what the registry counts against its budget (`cached_bytes`) beside the RSS.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM = 1280  # a ViT-H-sized feature, the stand-in d
# (classes, shots, stored copies restored at once, tuned by leave-one-out)
SIZES = ((100, 16, 100, True), (1000, 16, 10, False))
QUICK_SIZES = ((10, 4, 5, True),)
WARM_UP = (10, 4, 1, False)  # restored first in the child, so first-use imports are not counted
STANDIN_CONFIG = "offline-standin"  # app/encoder/configs/models.json: whose default method the tasks serve


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def _unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def store_tasks(
    root: Path, classes: int, shots: int, copies: int, tuned: bool, dim: int, seed: int = 0
) -> tuple[int, str]:
    """Build one task as the service does, save it `copies` times under `root`; return its raw key+text bytes
    and the method it serves (the one a restore fits)."""
    from app.encoder import ClassPrompts
    from app.encoder.factory import ModelDefaults
    from app.fewshot import fit_method, make_supports
    from app.service.build import fit_methods, task_fits
    from app.service.persist import to_snapshot
    from app.service.task import Task
    from app.store import LocalDirStore
    from cache_models import METHODS

    rng = np.random.default_rng(seed)
    keys, text = _unit(rng, classes * shots, dim), _unit(rng, classes, dim)
    labels = np.repeat(np.arange(classes, dtype=np.int64), shots)
    supports = make_supports(keys, labels, text, 1)
    if tuned:
        methods = fit_methods(supports, scale=100.0)
    else:
        methods = {m: fit_method(m, supports, scale=100.0, hyperparams={}) for m in METHODS}
    # Served as a build without a `method` serves it: the model's default method (the stand-in's: APE).
    default = ModelDefaults.for_key(STANDIN_CONFIG).default_method
    chosen, fits, _ = task_fits(default, methods, default)
    task = Task(
        tenant="bench",
        task_id="t0",
        name=None,
        version=1,
        created_at=0.0,
        updated_at=0.0,
        model_id="bench",
        backend="bench",
        views=1,
        templates=("a photo of a {}.",),
        classes=tuple(ClassPrompts(f"class {i}", (), True) for i in range(classes)),
        supports=supports,
        shot_seeds=np.zeros(classes * shots, np.int64),
        fits=fits,
        method=chosen,
        method_requested="default",
    )
    snapshot = to_snapshot(task)
    store = LocalDirStore(root)
    for i in range(copies):
        store.save(dataclasses.replace(snapshot, task_id=f"t{i}"))
    return int(keys.nbytes + text.nbytes), chosen


def _restore(root: str, warm_root: str, out: Any) -> None:
    """In a fresh process: the service's startup restore; sends (rss growth, seconds, tasks restored)."""
    from app.service.persist import from_snapshot, to_snapshot
    from app.service.registry import TaskRegistry
    from app.store import LocalDirStore
    from cache_models import METHODS

    warm = TaskRegistry(LocalDirStore(Path(warm_root)), from_snapshot, to_snapshot, model_id="bench")
    warm.restore()
    registry = TaskRegistry(LocalDirStore(Path(root)), from_snapshot, to_snapshot, model_id="bench")
    gc.collect()
    before = _rss()
    started = time.perf_counter()
    registry.restore()
    seconds = time.perf_counter() - started
    gc.collect()
    restored = _rss() - before, seconds, registry.cached_bytes
    started = time.perf_counter()
    for task in registry.list("bench"):
        for name in METHODS:
            task.model(name)
    all_seconds = time.perf_counter() - started
    gc.collect()
    every = _rss() - before, all_seconds, registry.cached_bytes
    out.send((restored, every, len(registry), len(registry.damaged)))
    out.close()


def bench_memory(quick: bool = False, dim: int = DIM) -> dict[str, Any]:
    rows = []
    for classes, shots, copies, tuned in QUICK_SIZES if quick else SIZES:
        with (
            tempfile.TemporaryDirectory(prefix="shotcache-bench-memory-") as root,
            tempfile.TemporaryDirectory(prefix="shotcache-bench-warm-") as warm_root,
        ):
            store_tasks(Path(warm_root), *WARM_UP, dim)
            raw, served = store_tasks(Path(root), classes, shots, copies, tuned, dim)
            disk = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
            context = multiprocessing.get_context("spawn")
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_restore, args=(root, warm_root, send))
            child.start()
            send.close()
            (grown, seconds, counted), (grown_all, all_seconds, counted_all), restored, damaged = receive.recv()
            child.join()
        if restored != copies or damaged:
            raise RuntimeError(f"memory bench: restored {restored} of {copies} tasks ({damaged} damaged)")
        rows.append(
            {
                "classes": classes,
                "shots": shots,
                "dim": dim,
                "tasks": copies,
                "tuned": tuned,
                "method": served,
                "raw_mb": raw / 2**20,
                "rss_per_task_mb": grown / copies / 2**20,
                "rss_x_raw": grown / copies / raw,
                "disk_x_raw": disk / copies / raw,
                "restore_s": seconds,
                "restore_ms_per_task": 1e3 * seconds / copies,
                "counted_x_raw": counted / copies / raw,
                "all_methods_rss_x_raw": grown_all / copies / raw,
                "all_methods_counted_x_raw": counted_all / copies / raw,
                "all_methods_first_use_s": all_seconds,
            }
        )
    return {"rows": rows}


def memory_markdown(result: dict[str, Any]) -> str:
    from .common import table

    header = [
        "task (N x K, d)",
        "tasks",
        "raw key+text MB",
        "RSS MB/task",
        "RSS / raw (budget counts)",
        "disk / raw",
        "restore s",
        "every method used: RSS / raw (budget counts)",
        "their first uses s",
    ]
    body = [
        [
            f"{r['classes']} x {r['shots']}, d={r['dim']}, serves {r.get('method', '?')}"
            + ("" if r["tuned"] else " (default hyper-parameters)"),
            r["tasks"],
            r["raw_mb"],
            r["rss_per_task_mb"],
            f"{r['rss_x_raw']:.2f}x ({r['counted_x_raw']:.2f}x)",
            f"{r['disk_x_raw']:.2f}x",
            f"{r['restore_s']:.2f} ({r['restore_ms_per_task']:.0f} ms/task)",
            f"{r['all_methods_rss_x_raw']:.2f}x ({r['all_methods_counted_x_raw']:.2f}x)",
            f"{r['all_methods_first_use_s']:.1f}",
        ]
        for r in result["rows"]
    ]
    return table(header, body, "lrrrrrrrr")
