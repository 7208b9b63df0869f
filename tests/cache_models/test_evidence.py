"""Nearest-shot evidence and the leave-one-out confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest

from cache_models import METHODS, get_method
from cache_models.evidence import nearest_shots

from .conftest import make_task, unit


def test_nearest_shots_are_the_most_similar_in_order() -> None:
    rng = np.random.default_rng(3)
    shots = unit(rng.standard_normal((40, 16)))
    queries = unit(rng.standard_normal((7, 16)))
    index, cosine = nearest_shots(queries, shots, 5)
    assert index.shape == cosine.shape == (7, 5)
    for q in range(7):
        sims = shots @ queries[q]
        assert list(index[q]) == list(np.argsort(-sims)[:5])
        np.testing.assert_allclose(cosine[q], sims[index[q]], rtol=1e-6)
        assert all(np.diff(cosine[q]) <= 0)


def test_nearest_shots_ties_and_small_supports() -> None:
    shots = unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    index, cosine = nearest_shots(unit(np.array([[1.0, 0.1]])), shots, 10)
    assert index.tolist() == [[0, 1, 2]]  # k beyond the support: all of it; the tie keeps index order
    assert cosine[0, 0] == pytest.approx(cosine[0, 1])
    with pytest.raises(ValueError, match="k must be"):
        nearest_shots(shots, shots, 0)


@pytest.mark.parametrize("name", METHODS)
def test_loo_confusion_matches_the_report(name: str) -> None:
    t = make_task(5, n_classes=4, shots=4, views=2 if name == "gda" else 1, noise=1.0)
    method = get_method(name)()
    method.tune(t.keys, t.labels, t.text, t.groups)
    report = method.tune_report
    assert report is not None
    confusion = report.confusion(t.n_classes)
    assert confusion.shape == (4, 4)
    assert confusion.sum() == report.n_scored
    assert np.trace(confusion) == int(report.correct.sum())
    assert report.accuracy == pytest.approx(np.trace(confusion) / confusion.sum())
    assert confusion.sum(axis=1).tolist() == np.bincount(t.labels[report.rows], minlength=4).tolist()
    # The rows' true labels are the caller's, and each prediction is what correctness was judged by.
    assert np.array_equal(report.labels, t.labels[report.rows])
    assert np.array_equal(report.predicted == report.labels, report.correct)


def test_no_confusion_without_leave_one_out() -> None:
    t = make_task(1, shots=1)
    method = get_method("tip-adapter")()
    method.tune(t.keys, t.labels, t.text, t.groups)
    assert method.tune_report is not None
    assert method.tune_report.confusion(t.n_classes).sum() == 0
