"""ProKeR: the closed-form leave-one-out, the large-support paths (class-subset tune, Nystrom fit)
and the few-shot rule."""

from __future__ import annotations

import numpy as np
import pytest

import cache_models.proker as proker
from cache_models import get_method
from cache_models.base import make_support
from cache_models.few_shot import RULE_MARGIN
from cache_models.tuning import fit_temperature

from . import reference
from .conftest import Task, make_task, unit
from .loo_reference import loo_logits

HP = {"beta": 3.0, "lam": 0.5, "scale": 10.0}


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def _duplicate_view_task() -> Task:
    """Class 0's shot A has three identical views, its other shot B is far away; class 1 sits near
    A in text. A held-out view of A that still sees its twins interpolates its own label."""
    e = np.eye(4, dtype=np.float32)
    shot_a = unit(e[0] + 0.2 * e[1])
    keys = np.stack([shot_a, shot_a, shot_a, unit(e[2] + 0.1 * e[0]), unit(e[1]), unit(e[1] + 0.3 * e[3])])
    labels = np.array([0, 0, 0, 0, 1, 1])
    groups = np.array([7, 7, 7, 8, 9, 10])
    text = unit(np.stack([e[2] + 0.1 * e[3], e[1] + 0.5 * e[0]]))
    return Task(keys, labels, text, groups, keys[:1])


def test_loo_holds_out_every_view_of_the_shot() -> None:
    t = _duplicate_view_task()
    rows, logits = get_method("proker")(**HP).loo_logits(t.keys, t.labels, t.text, t.groups)
    expected = loo_logits("proker", t, t.groups, rows, **HP)
    _close(logits, expected)
    leaky = loo_logits("proker", t, np.arange(t.labels.size), rows, **HP)  # only the scored row held out
    shot_a = np.isin(rows, [0, 1, 2])
    assert np.abs(leaky[shot_a] - expected[shot_a]).max() > 1.0
    assert np.all(leaky[shot_a].argmax(axis=1) == 0)  # the leak would make A look right...
    assert not np.any(expected[shot_a].argmax(axis=1) == 0)  # ...it is not, without its twins


@pytest.mark.parametrize("beta", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("lam", [1e-3, 0.1, 10.0])
def test_closed_form_equals_refits_across_the_grid(beta: float, lam: float) -> None:
    t = make_task(40, n_classes=3, shots=4, views=2, dim=10)
    hp = {"beta": beta, "lam": lam, "scale": 20.0}
    rows, logits = get_method("proker")(**hp).loo_logits(t.keys, t.labels, t.text, t.groups)
    _close(logits, loo_logits("proker", t, t.groups, rows, **hp))


def test_nystrom_with_every_key_as_landmark_is_the_exact_ridge(monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_task(41, n_classes=4, shots=5, dim=12, n_queries=7)
    exact = get_method("proker")(**HP).fit(t.keys, t.labels, t.text).predict(t.queries)
    monkeypatch.setattr(proker, "EXACT_MAX_KEYS", 5)
    monkeypatch.setattr(proker, "NYSTROM_LANDMARKS", t.labels.size)
    nystrom = get_method("proker")(**HP).fit(t.keys, t.labels, t.text)
    _close(nystrom.predict(t.queries), exact)
    _close(exact, reference.proker(t.queries, t.keys, t.labels, t.text, **HP))


def test_nystrom_state_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_task(42, n_classes=4, shots=5, dim=12, n_queries=7)
    monkeypatch.setattr(proker, "EXACT_MAX_KEYS", 5)
    monkeypatch.setattr(proker, "NYSTROM_LANDMARKS", 8)
    fitted = get_method("proker")(**HP).fit(t.keys, t.labels, t.text)
    state = fitted.get_state()
    assert state["landmark_rows"].shape == (8,)
    restored = get_method("proker")(**HP).set_state(state)
    np.testing.assert_array_equal(restored.predict(t.queries), fitted.predict(t.queries))


def test_large_support_is_tuned_on_whole_classes_and_fitted_on_all(monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_task(43, n_classes=8, shots=3, dim=10)
    monkeypatch.setattr(proker, "TUNE_MAX_KEYS", 10)
    method = get_method("proker")()
    chosen = method.tune(t.keys, t.labels, t.text, grid={"beta": [1.0, 5.0], "lam": [0.1, 1.0]})
    report = method.tune_report
    assert report is not None
    scored_classes = np.unique(t.labels[report.rows])
    assert 2 <= scored_classes.size <= 3  # whole classes of 3 shots, at most 10 rows
    for c in scored_classes:  # every shot of a chosen class is scored: rows index the caller's arrays
        assert set(np.flatnonzero(t.labels == c)) <= set(report.rows.tolist())
    assert method.n_keys == t.labels.size
    np.testing.assert_array_equal(
        method.predict(t.queries), get_method("proker")(**chosen).fit(t.keys, t.labels, t.text).predict(t.queries)
    )


def test_the_shared_support_path_is_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service fits every method on one shared support (`tune_support`, not `tune`): the subset rule
    must hold there as well, or a 1000-class task would take the exact eigendecomposition at M = 16,000."""
    t = make_task(45, n_classes=8, shots=3, dim=10)
    monkeypatch.setattr(proker, "TUNE_MAX_KEYS", 10)
    method = get_method("proker")()
    method.tune_support(make_support(t.keys, t.labels, t.text, None), grid={"beta": [1.0, 5.0], "lam": [0.1, 1.0]})
    assert method.tune_report is not None
    assert method.tune_report.n_scored <= 10
    assert method.n_keys == t.labels.size


def _median_distance(keys: np.ndarray) -> float:
    """Median 1 - cos over every pair of distinct keys (one key per shot), by a plain double loop."""
    pairs = [
        1.0 - float(np.dot(keys[i].astype(np.float64), keys[j].astype(np.float64)))
        for i in range(len(keys))
        for j in range(i + 1, len(keys))
    ]
    return float(np.median(pairs))


def _rule_reference(t: Task) -> tuple[dict[str, float], float]:
    """The few-shot rule written out: beta by the median heuristic, lam from the temperature, capped."""
    temperature, _ = fit_temperature((100.0 * t.keys @ t.text.T).astype(np.float32), t.labels)
    uncapped = proker.FEW_SHOT_LAM_PER_TEMPERATURE * temperature / 100.0
    beta = proker.FEW_SHOT_BETA_PER_DISTANCE / _median_distance(t.keys)
    return {"beta": beta, "lam": min(uncapped, proker.FEW_SHOT_MAX_LAM)}, uncapped


def test_one_shot_per_class_uses_the_few_shot_rule() -> None:
    t = make_task(44, n_classes=4, shots=1, dim=8)
    method = get_method("proker")()
    chosen = method.tune(t.keys, t.labels, t.text)
    expected, _ = _rule_reference(t)
    assert chosen["beta"] == pytest.approx(expected["beta"], rel=1e-6)
    assert chosen["lam"] == pytest.approx(expected["lam"], rel=1e-6)
    assert method.tune_report is not None
    assert method.tune_report.fallback is not None
    assert "few-shot rule" in method.tune_report.fallback


@pytest.mark.parametrize("name", ["tip-adapter", "tip-x", "ape", "gda", "proker"])
def test_two_shots_keep_the_rule_unless_leave_one_out_clearly_beats_it(name: str) -> None:
    t = make_task(45, n_classes=4, shots=2, dim=8, text_noise=2.0)
    method = get_method(name)()
    method.tune(t.keys, t.labels, t.text)
    report = method.tune_report
    assert report is not None
    fresh = get_method(name)()
    temperature, _ = fit_temperature((100.0 * t.keys @ t.text.T).astype(np.float32), t.labels)
    rule = {
        **fresh.hyperparams,
        **(fresh.few_shot_rule(make_support(t.keys, t.labels, t.text, None), temperature) or {}),
    }
    rows, rule_logits = get_method(name)(**rule).loo_logits(t.keys, t.labels, t.text)
    _, rule_nll = fit_temperature(rule_logits, t.labels[rows], smoothing=0.01)
    assert report.nll is not None
    if report.fallback is None:  # leave-one-out's own pick stood: it must have won clearly
        assert report.nll < rule_nll - RULE_MARGIN
    else:
        assert "few-shot rule" in report.fallback
        assert method.hyperparams == pytest.approx(rule)
        assert report.nll == pytest.approx(rule_nll, abs=1e-5)


def _ranked_task(misleading: bool) -> Task:
    """Four orthogonal one-shot classes whose text leans slightly towards one shot each: its own (the text
    ranks every shot right with small margins, so the zero-shot temperature is small), or, misleading, the
    next class's (every shot ranked wrong: the fitted temperature flattens the text, a huge T)."""
    e = np.eye(5, dtype=np.float32)
    keys = unit(e[:4] + 0.05 * e[4])
    leaning = np.roll(e[:4], 1, axis=0) if misleading else e[:4]
    text = unit(np.tile(e[4], (4, 1)) + 0.1 * leaning)
    return Task(keys, np.arange(4, dtype=np.int64), text, np.arange(4, dtype=np.int64), keys)


@pytest.mark.parametrize("capped", [False, True])
def test_few_shot_lam_is_capped_exactly_when_the_rule_exceeds_the_cap(capped: bool) -> None:
    t = _ranked_task(misleading=capped)
    expected, uncapped = _rule_reference(t)
    assert (uncapped > proker.FEW_SHOT_MAX_LAM) == capped  # the case exercises the branch it names
    chosen = get_method("proker")().tune(t.keys, t.labels, t.text)
    assert chosen["lam"] == pytest.approx(proker.FEW_SHOT_MAX_LAM if capped else uncapped, rel=1e-6)
    assert chosen["beta"] == pytest.approx(expected["beta"], rel=1e-6)


def test_few_shot_beta_follows_the_shots_geometry() -> None:
    """The same shots pulled towards their centre (cosine distances about 10x smaller) get a kernel about
    10x sharper: beta is the median heuristic's, on each support."""
    t = make_task(47, n_classes=3, shots=2, dim=8)
    centre = unit(t.keys.mean(axis=0))
    near = unit(centre + 0.3 * (t.keys - centre))
    wide, close = Task(t.keys, t.labels, t.text, t.groups, t.queries), Task(near, t.labels, t.text, t.groups, t.queries)
    rules = []
    for task in (wide, close):
        method = get_method("proker")()
        rule = method.few_shot_rule(make_support(task.keys, task.labels, task.text, None), 1.0)
        assert rule["beta"] == pytest.approx(proker.FEW_SHOT_BETA_PER_DISTANCE / _median_distance(task.keys), rel=1e-6)
        rules.append(rule["beta"])
    assert rules[1] > 3 * rules[0]


def test_few_shot_beta_without_a_pair_of_shots_is_the_fixed_one() -> None:
    keys = unit(np.array([[1.0, 0.2, 0.0]]))
    support = make_support(keys, np.array([0]), unit(np.array([[1.0, 0.0, 0.0]])), None)
    assert get_method("proker")().few_shot_rule(support, 1.0)["beta"] == proker.FEW_SHOT_BETA
