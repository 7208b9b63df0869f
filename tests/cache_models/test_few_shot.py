"""The few-shot rules' inputs: the shots' typical distance (cache_models.few_shot.typical_distance)."""

from __future__ import annotations

import numpy as np
import pytest

import cache_models.few_shot as few_shot
from cache_models.base import make_support

from .conftest import make_task


def _brute_force(keys: np.ndarray, groups: np.ndarray) -> float:
    pairs = [
        1.0 - float(np.dot(keys[i].astype(np.float64), keys[j].astype(np.float64)))
        for i in range(len(keys))
        for j in range(i + 1, len(keys))
        if groups[i] != groups[j]
    ]
    return float(np.median(pairs))


def test_typical_distance_is_the_median_over_pairs_of_different_shots() -> None:
    """Views of one shot are near-duplicates: their pairs must not pull the median towards 0."""
    t = make_task(60, n_classes=3, shots=2, views=3, dim=8)
    support = make_support(t.keys, t.labels, t.text, t.groups)
    got = few_shot.typical_distance(support)
    assert got == pytest.approx(_brute_force(t.keys, t.groups), rel=1e-9)
    all_pairs = _brute_force(t.keys, np.arange(t.keys.shape[0]))
    assert got != pytest.approx(all_pairs, rel=1e-3)


def test_typical_distance_without_two_shots_is_none() -> None:
    t = make_task(61, n_classes=1, shots=1, views=3, dim=8)
    assert few_shot.typical_distance(make_support(t.keys, t.labels, t.text, t.groups)) is None


def test_typical_distance_of_a_large_support_uses_a_fixed_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_task(62, n_classes=6, shots=4, dim=8)
    support = make_support(t.keys, t.labels, t.text, t.groups)
    monkeypatch.setattr(few_shot, "DISTANCE_MAX_ROWS", 10)
    rows = np.sort(np.random.default_rng(0).choice(support.n_rows, 10, replace=False))
    got = few_shot.typical_distance(support)
    assert got == pytest.approx(_brute_force(support.keys[rows], support.groups[rows]), rel=1e-9)
    assert got == few_shot.typical_distance(support)  # deterministic
