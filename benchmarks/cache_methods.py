"""Micro-benchmark of the cache methods (numpy + faiss only, no model): predict cost per query and
tune (leave-one-out search) time and memory, on random unit vectors clustered by class.

    .venv/bin/python -m benchmarks.cache_methods               # prints a markdown table

Not a test: numbers depend on the machine. Fit and tune run in one process, with FAISS and BLAS
limited to the 2 threads of the reference machine.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Sequence

import faiss
import numpy as np
import numpy.typing as npt

from cache_models import METHODS, get_method

F32 = npt.NDArray[np.float32]
PREDICT_REPEATS = 5
TOP_K = 64


def _unit(x: npt.NDArray[np.float64]) -> F32:
    out: F32 = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def clustered_task(
    n_classes: int, shots: int, dim: int, queries: int, seed: int
) -> tuple[F32, npt.NDArray[np.int64], F32, F32]:
    """(keys [N*K, d], labels, text [N, d], queries [Q, d]) around correlated class centres.

    Centres share a common direction (like CLIP features, which live in a narrow cone); text rows
    and keys scatter around them enough that zero-shot is weak and the cache matters.
    """
    rng = np.random.default_rng(seed)
    spread = 0.35
    shared = _unit(rng.standard_normal((1, dim)))
    centres = _unit(shared + spread * _unit(rng.standard_normal((n_classes, dim))))
    text = _unit(centres + 3 * spread * _unit(rng.standard_normal((n_classes, dim))))
    labels = np.repeat(np.arange(n_classes), shots).astype(np.int64)
    keys = _unit(centres[labels] + 3 * spread * _unit(rng.standard_normal((labels.size, dim))))
    query_labels = rng.integers(0, n_classes, queries)
    query_rows = _unit(centres[query_labels] + 3 * spread * _unit(rng.standard_normal((queries, dim))))
    return keys, labels, text, query_rows


def _seconds(action: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - start


def _row(method: str, what: str, value: float, unit: str) -> dict[str, object]:
    return {"method": method, "what": what, "value": round(value, 4), "unit": unit}


def bench_cache_methods(
    *,
    n_classes: int = 1000,
    shots: int = 16,
    dim: int = 512,
    queries: int = 256,
    tune_classes: Sequence[int] = (10, 100, 1000),
    seed: int = 0,
    measure_memory: bool = True,
) -> list[dict[str, object]]:
    """Rows {method, what, value, unit}: fit time and predict ms/query (exact and top_k=64, best of
    PREDICT_REPEATS batches) at N = n_classes; tune seconds (default grids, one run) at each N in
    tune_classes; tune peak memory (tracemalloc, in a separate run so it does not slow the timed
    one) at the largest N."""
    faiss.omp_set_num_threads(2)
    rows: list[dict[str, object]] = []
    keys, labels, text, query_rows = clustered_task(n_classes, shots, dim, queries, seed)
    size = f"N={n_classes} K={shots} d={dim}"
    for name in METHODS:
        method = get_method(name)()
        rows.append(_row(name, f"fit, {size}", _seconds(method.fit, keys, labels, text), "s"))
        for top_k, label in ((None, "exact"), (TOP_K, f"top_k={TOP_K}")):
            method.predict(query_rows, top_k=top_k)  # warm-up
            times = [_seconds(method.predict, query_rows, top_k=top_k) for _ in range(PREDICT_REPEATS)]
            per_query_ms = 1e3 * min(times) / queries  # best of N: the machine may be shared
            rows.append(_row(name, f"predict {label}, {size}, batch {queries}", per_query_ms, "ms/query"))
    for n in tune_classes:
        keys, labels, text, _ = clustered_task(n, shots, dim, 0, seed)
        for name in METHODS:
            method = get_method(name)()
            elapsed = _seconds(method.tune, keys, labels, text)
            report = method.tune_report
            evaluated = report.n_evaluated if report is not None else 0
            rows.append(_row(name, f"tune, N={n} K={shots} d={dim} ({evaluated} grid points)", elapsed, "s"))
    if measure_memory and tune_classes:
        n = max(tune_classes)
        keys, labels, text, _ = clustered_task(n, shots, dim, 0, seed)
        for name in METHODS:
            gc.collect()
            tracemalloc.start()
            try:
                get_method(name)().tune(keys, labels, text)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            rows.append(_row(name, f"tune peak extra memory, N={n} K={shots} d={dim}", peak / 2**20, "MB"))
    return rows


def to_markdown(rows: Sequence[dict[str, object]]) -> str:
    lines = ["| method | what | value | unit |", "|---|---|---:|---|"]
    lines += [f"| {r['method']} | {r['what']} | {r['value']} | {r['unit']} |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(to_markdown(bench_cache_methods()))
