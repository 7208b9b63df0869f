"""Shared data for the cache_models tests: small random supports of unit vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

F32 = npt.NDArray[np.float32]


def unit(x: npt.ArrayLike) -> F32:
    a = np.asarray(x, dtype=np.float64)
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Task:
    keys: F32
    labels: npt.NDArray[np.int64]
    text: F32
    groups: npt.NDArray[np.int64]
    queries: F32

    @property
    def n_classes(self) -> int:
        return int(self.text.shape[0])


def make_task(
    seed: int = 0,
    *,
    n_classes: int = 4,
    shots: int = 3,
    views: int = 1,
    dim: int = 8,
    n_queries: int = 5,
    noise: float = 0.8,
    text_noise: float | None = None,
) -> Task:
    """Keys clustered around per-class centres (so caches are meaningful), shuffled row order.

    With views > 1 each shot contributes `views` rows sharing one group id.
    """
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((n_classes, dim)))
    text_noise = noise if text_noise is None else text_noise
    text = unit(centres + text_noise * unit(rng.standard_normal((n_classes, dim))))
    shot_labels = np.repeat(np.arange(n_classes), shots)
    shot_centres = centres[shot_labels] + noise * unit(rng.standard_normal((shot_labels.size, dim)))
    labels = np.repeat(shot_labels, views)
    groups = np.repeat(np.arange(shot_labels.size), views)
    keys = unit(shot_centres[groups] + 0.3 * noise * unit(rng.standard_normal((groups.size, dim))))
    order = rng.permutation(labels.size)
    query_labels = rng.integers(0, n_classes, n_queries)
    queries = unit(centres[query_labels] + noise * unit(rng.standard_normal((n_queries, dim))))
    return Task(keys[order], labels[order].astype(np.int64), text, groups[order].astype(np.int64), queries)


@pytest.fixture
def task() -> Task:
    return make_task()


# Non-default hyper-parameters per method, so every term of every formula is exercised.
HYPERPARAMS: dict[str, dict[str, float | int]] = {
    "zero-shot": {"scale": 50.0},
    "tip-adapter": {"alpha": 3.0, "beta": 4.0, "scale": 50.0},
    "tip-x": {"alpha": 3.0, "beta": 4.0, "gamma": 2.0, "tau": 0.7, "scale": 50.0},
    "ape": {"alpha": 3.0, "beta": 4.0, "gamma": 0.4, "n_channels": 5, "lambda1": 0.6, "lambda2": 0.5, "scale": 50.0},
    "gda": {"alpha": 0.3, "scale": 50.0},
    "proker": {"beta": 2.5, "lam": 0.3, "scale": 50.0},
}
