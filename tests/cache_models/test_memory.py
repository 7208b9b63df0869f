"""tune on a large support scores a bounded subset of rows and never holds a rows x keys matrix."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cache_models import METHODS, get_method
from cache_models.proker import NYSTROM_LANDMARKS, TUNE_MAX_KEYS
from cache_models.tuning import MAX_SCORED_ROWS

from .conftest import make_task

# 500 classes x 16 shots = 8,000 keys: a dense [MAX_SCORED_ROWS, M] float32 affinity is 62.5 MB,
# an [M, N] float64 matrix 30.5 MB, an [M, M] one 512 MB.
LARGE = make_task(30, n_classes=500, shots=16, dim=16, n_queries=0)
DENSE_ROWS_BY_KEYS = MAX_SCORED_ROWS * LARGE.labels.size * 4
SMALL_GRIDS: dict[str, dict[str, list[float]] | None] = {
    "zero-shot": None,
    "tip-adapter": {"alpha": [1.0, 10.0], "beta": [1.0, 5.0]},
    "tip-x": {"alpha": [1.0], "gamma": [0.0, 0.1]},
    "ape": {"alpha": [1.0], "n_channels": [8, 16]},
    "gda": {"alpha": [1.0, 10.0]},
    "proker": {"beta": [1.0, 5.0], "lam": [0.1, 1.0]},
}
# ProKeR's working set is square by nature (cache_models/proker.py): leave-one-out eigendecomposes a
# [TUNE_MAX_KEYS]^2 kernel, the Nystrom fit solves a [NYSTROM_LANDMARKS]^2 system (float64 each, with
# LAPACK's copy and eigenvectors); neither grows with M.
PROKER_BOUND = 6 * 8 * max(TUNE_MAX_KEYS, NYSTROM_LANDMARKS) ** 2


@pytest.mark.parametrize("name", METHODS)
def test_tune_on_a_large_support_is_bounded(name: str) -> None:
    method = get_method(name)()
    tracemalloc.start()
    try:
        method.tune(LARGE.keys, LARGE.labels, LARGE.text, grid=SMALL_GRIDS[name])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    report = method.tune_report
    assert report is not None
    expected = TUNE_MAX_KEYS if name == "proker" else MAX_SCORED_ROWS  # a fixed subset of the 8,000 rows
    assert report.n_scored == expected
    assert np.unique(report.rows).size == expected
    # Row chunks and row blocks: the whole tune peaks below ONE dense rows x keys matrix.
    bound = PROKER_BOUND if name == "proker" else 0.9 * DENSE_ROWS_BY_KEYS
    assert peak < bound, f"peak {peak / 2**20:.1f} MB"


def test_scored_rows_are_the_same_subset_every_time() -> None:
    rows = [get_method("gda")().loo_logits(LARGE.keys, LARGE.labels, LARGE.text)[0] for _ in range(2)]
    np.testing.assert_array_equal(rows[0], rows[1])
