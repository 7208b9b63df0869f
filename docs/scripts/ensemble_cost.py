"""The classify math of auto's ensemble against one method (docs/benchmarks.md, "`auto` blends").

`Task.classify`'s cache math: `calibrated_probabilities` over the fitted methods' logits, best of 50 calls,
on synthetic unit features (d = 1280, K = 16 shots per class). Run from the repository root:
`.venv/bin/python docs/scripts/ensemble_cost.py 100` (then 1000).
"""

import sys
import time
from collections.abc import Callable

import numpy as np

from app.fewshot import build_method
from cache_models.selection import calibrated_probabilities

N, K, D = int(sys.argv[1]), 16, 1280
rng = np.random.default_rng(0)
centres = rng.normal(size=(N, D))
centres /= np.linalg.norm(centres, axis=1, keepdims=True)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sample(per_class: int) -> np.ndarray:
    return unit(np.repeat(centres, per_class, axis=0) + 3.6 * rng.normal(size=(N * per_class, D)) / np.sqrt(D))


feats, labels = sample(K), np.repeat(np.arange(N), K)
text = unit(centres + 2.0 * rng.normal(size=centres.shape) / np.sqrt(D))
fitted = {m: build_method(m, feats, labels, text, 1, scale=100.0) for m in ("ape", "proker", "gda", "tip-adapter")}
temperatures = {m: f.tune_report.temperature for m, f in fitted.items() if f.tune_report is not None}


def best_ms(call: Callable[[], object], repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


for batch in (1, 32):
    queries = sample(1)[:batch]
    for combo in (("ape",), ("proker",), ("ape", "proker"), ("gda",), ("tip-adapter",), ("gda", "tip-adapter")):
        ms = best_ms(
            lambda c=combo, q=queries: calibrated_probabilities(
                [fitted[m].predict(q) for m in c], [temperatures[m] for m in c]
            )
        )
        print(f"N={N} batch {batch:2d} {'+'.join(combo):16s} {ms:.3f} ms")
