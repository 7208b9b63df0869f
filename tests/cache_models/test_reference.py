"""Every method equals the dense float64 transcription of methods.md on random inputs.

Tolerance: float32 logits, so relative 1e-5 of the logits' magnitude.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from cache_models import METHODS, get_method

from . import reference
from .conftest import HYPERPARAMS, make_task

CACHE_METHODS = ("tip-adapter", "tip-x", "ape")


def assert_logits_close(got: npt.NDArray[np.float32], expected: npt.NDArray[np.float64]) -> None:
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_predict_matches_dense_reference(name: str, views: int, seed: int) -> None:
    t = make_task(seed, n_classes=4, shots=3, views=views, dim=8, n_queries=6)
    hp = HYPERPARAMS[name]
    groups = t.groups if views > 1 else None
    m = get_method(name)(**hp).fit(t.keys, t.labels, t.text, groups)
    expected = reference.predict(name, t.queries, t.keys, t.labels, t.text, **hp)
    assert_logits_close(m.predict(t.queries), expected)


@pytest.mark.parametrize("name", METHODS)
def test_default_hyperparameters_match_reference(name: str) -> None:
    t = make_task(2, dim=12)
    m = get_method(name)().fit(t.keys, t.labels, t.text)
    expected = reference.predict(name, t.queries, t.keys, t.labels, t.text, **m.hyperparams)
    assert_logits_close(m.predict(t.queries), expected)


def test_ape_selects_the_reference_channels() -> None:
    t = make_task(3, n_classes=5, shots=4, dim=16)
    m = get_method("ape")(n_channels=7, lambda1=0.9, lambda2=2.0).fit(t.keys, t.labels, t.text)
    expected = reference.ape_channels(t.keys, t.labels, t.text, n_channels=7, lambda1=0.9, lambda2=2.0)
    np.testing.assert_array_equal(m.channels, expected)


def test_tip_x_psi_constants_match_reference() -> None:
    t = make_task(4, n_classes=5, shots=4, dim=16)
    m = get_method("tip-x")(tau=0.3).fit(t.keys, t.labels, t.text)
    expected = reference.tip_x_psi_constants(t.keys, t.text, tau=0.3)
    np.testing.assert_allclose(m.psi_range.as_array(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CACHE_METHODS)
@pytest.mark.parametrize("top_k", [1, 4, 7])
def test_top_k_equals_reference_restricted_to_nearest_keys(name: str, top_k: int) -> None:
    t = make_task(5, n_classes=4, shots=3, dim=8, n_queries=6)
    hp = HYPERPARAMS[name]
    m = get_method(name)(**hp).fit(t.keys, t.labels, t.text)
    expected = reference.predict(name, t.queries, t.keys, t.labels, t.text, top_k=top_k, **hp)
    assert_logits_close(m.predict(t.queries, top_k=top_k), expected)


@pytest.mark.parametrize("name", METHODS)
def test_top_k_at_least_m_is_exact(name: str) -> None:
    t = make_task(6)
    m = get_method(name)(**HYPERPARAMS[name]).fit(t.keys, t.labels, t.text)
    exact = m.predict(t.queries)
    for k in (t.keys.shape[0], t.keys.shape[0] + 5):
        np.testing.assert_array_equal(m.predict(t.queries, top_k=k), exact)


def test_top_k_changes_the_logits_when_it_drops_keys() -> None:
    # Guards the test above: with k < M the approximation really is different.
    t = make_task(7)
    m = get_method("tip-adapter")(alpha=5.0).fit(t.keys, t.labels, t.text)
    assert not np.allclose(m.predict(t.queries, top_k=2), m.predict(t.queries))


def test_predict_is_chunked_without_changing_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import cache_models.base as base

    t = make_task(8, n_queries=11)
    m = get_method("tip-x")(**HYPERPARAMS["tip-x"]).fit(t.keys, t.labels, t.text)
    whole = m.predict(t.queries)
    monkeypatch.setattr(base, "PREDICT_CHUNK", 3)
    # Equal up to float32 rounding, not bit for bit: BLAS may round a 3-row product differently from an 11-row
    # one (seen on an AMD EPYC: 4 of 44 logits off by <= 9.5e-7). A chunk scored against the wrong rows or
    # keys would be off by whole units.
    np.testing.assert_allclose(m.predict(t.queries), whole, rtol=1e-5, atol=1e-5)
    assert m.predict(t.queries[:0]).shape == (0, t.n_classes)
