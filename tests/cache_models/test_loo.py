"""Leave-one-out: the held-out shot (all its views) is really out of its own cache, and tune picks
what a brute-force search over refits picks."""

from __future__ import annotations

import numpy as np
import pytest

import cache_models.ape as ape
from cache_models import METHODS, fit_temperature, get_method
from cache_models.key_cache import SINGLE_SHOT_ALPHA_PER_TEMPERATURE, SINGLE_SHOT_BETA

from .conftest import HYPERPARAMS, Task, make_task, unit
from .loo_reference import calibrated_nll, loo_logits


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("views", [1, 3])
def test_loo_logits_equal_a_refit_without_the_shot(name: str, views: int) -> None:
    t = make_task(10, n_classes=4, shots=3, views=views, dim=8)
    hp = HYPERPARAMS[name]
    groups = t.groups if views > 1 else np.arange(t.labels.size)
    rows, logits = get_method(name)(**hp).loo_logits(t.keys, t.labels, t.text, groups if views > 1 else None)
    assert sorted(rows.tolist()) == list(range(t.labels.size))  # every class has >= 2 shots
    _close(logits, loo_logits(name, t, groups, rows, **hp))


def test_tip_adapter_loo_equals_public_refit_and_predict() -> None:
    t = make_task(11, views=2)
    hp = HYPERPARAMS["tip-adapter"]
    rows, logits = get_method("tip-adapter")(**hp).loo_logits(t.keys, t.labels, t.text, t.groups)
    for row, row_logits in zip(rows, logits, strict=True):
        keep = t.groups != t.groups[row]
        refit = get_method("tip-adapter")(**hp).fit(t.keys[keep], t.labels[keep], t.text)
        expected = refit.predict(t.keys[row : row + 1])
        # count correction: the own class's cache sum scaled by R_c / (R_c - g)
        own = t.labels[row]
        zero = refit.zero_shot_logits(t.keys[row : row + 1])
        factor = np.sum(t.labels == own) / np.sum(t.labels[keep] == own)
        expected[:, own] = zero[:, own] + factor * (expected[:, own] - zero[:, own])
        _close(row_logits[None], expected)


def _duplicate_view_task() -> Task:
    """Class 0's shot A has three identical views; its only other shot B is far away. The text
    prefers class 1 for A. So A is classified correctly only if its own views leak into its cache
    (with a sharp cache, beta = 5: the count correction multiplies B's vote by 4, still too weak)."""
    e = np.eye(4, dtype=np.float32)
    shot_a = unit(e[0] + 0.2 * e[1])
    keys = np.stack([shot_a, shot_a, shot_a, unit(e[2] + 0.1 * e[0]), unit(e[1]), unit(e[1] + 0.3 * e[3])])
    labels = np.array([0, 0, 0, 0, 1, 1])
    groups = np.array([7, 7, 7, 8, 9, 10])
    text = unit(np.stack([e[2] + 0.1 * e[3], e[1] + 0.5 * e[0]]))
    return Task(keys, labels, text, groups, keys[:1])


@pytest.mark.parametrize("name", ["tip-adapter", "tip-x", "ape", "gda"])
def test_loo_masks_every_view_of_the_held_out_shot(name: str) -> None:
    t = _duplicate_view_task()
    hp = {"alpha": 50.0, "scale": 10.0, **({"n_channels": 4} if name == "ape" else {})}
    if name != "gda":
        hp["beta"] = 5.0
    method = get_method(name)(**hp)
    rows, logits = method.loo_logits(t.keys, t.labels, t.text, t.groups)
    expected = loo_logits(name, t, t.groups, rows, **hp)
    _close(logits, expected)
    # Masking only the scored row (not its group) would let the two other copies vote: different logits.
    leaky = loo_logits(name, t, np.arange(t.labels.size), rows, **hp)
    shot_a = np.isin(rows, [0, 1, 2])
    assert np.abs(leaky[shot_a] - expected[shot_a]).max() > 1.0
    method.tune(t.keys, t.labels, t.text, t.groups, grid={"alpha": [50.0]})
    report = method.tune_report
    assert report is not None
    np.testing.assert_array_equal(report.rows, rows)
    assert report.accuracy == pytest.approx(np.mean(expected.argmax(axis=1) == t.labels[rows]))
    if name != "gda":  # for the key caches the leak would also flip LOO accuracy: A is right only with its views
        assert not np.any(expected[shot_a].argmax(axis=1) == 0)
        assert np.all(leaky[shot_a].argmax(axis=1) == 0)
        assert not np.any(report.correct[shot_a])


def test_loo_is_independent_of_the_row_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import cache_models.tip_x as tip_x_module
    import cache_models.tuning as tuning

    t = make_task(12, n_classes=5, shots=4, views=2, dim=8)
    for name in ("tip-adapter", "tip-x", "ape"):
        method = get_method(name)(**HYPERPARAMS[name])
        whole = method.loo_logits(t.keys, t.labels, t.text, t.groups)[1]
        psi = method.fit(t.keys, t.labels, t.text).psi_range.as_array() if name == "tip-x" else None
        with monkeypatch.context() as patch:
            patch.setattr(tuning, "ROW_CHUNK", 7)
            patch.setattr(tip_x_module, "ROW_CHUNK", 7)
            _close(method.loo_logits(t.keys, t.labels, t.text, t.groups)[1], whole)
            if psi is not None:
                refit = get_method(name)(**HYPERPARAMS[name]).fit(t.keys, t.labels, t.text)
                np.testing.assert_allclose(refit.psi_range.as_array(), psi, rtol=1e-6)


def test_fit_temperature_minimises_the_calibrated_cross_entropy() -> None:
    rng = np.random.default_rng(0)
    for spread, margin in ((3.0, 6.0), (0.1, 0.05), (30.0, 40.0)):
        logits = (rng.standard_normal((300, 20)) * spread).astype(np.float32)
        labels = rng.integers(0, 20, 300)
        logits[np.arange(300), labels] += margin
        temperature, nll = fit_temperature(logits, labels)
        assert nll == pytest.approx(calibrated_nll(logits, labels), abs=1e-7)
        assert temperature > 0
        for start in (1e-3, 1e3):  # the result does not depend on where the fit starts
            again = fit_temperature(logits, labels, initial_temperature=start)
            assert again[1] == pytest.approx(nll, abs=1e-7)
            assert again[0] == pytest.approx(temperature, rel=1e-4)


def _brute_force_choice(name: str, t: Task, grid: dict[str, list[float]], fixed: dict[str, float]) -> dict[str, float]:
    """Score every grid point by refitting per held-out shot; lowest calibrated NLL (1e-6), then
    highest accuracy, then grid order."""
    import itertools

    names = list(grid)
    best: tuple[float, float, int] | None = None
    choice: dict[str, float] = {}
    rows = np.arange(t.labels.size)
    for i, values in enumerate(itertools.product(*(grid[n] for n in names))):
        params = {**fixed, **dict(zip(names, values, strict=True))}
        logits = loo_logits(name, t, t.groups, rows, **params)
        rank = (
            round(calibrated_nll(logits, t.labels), 6),
            -float(np.mean(logits.argmax(axis=1) == t.labels)),
            i,
        )
        if best is None or rank < best:
            best, choice = rank, params
    return choice


@pytest.mark.parametrize(
    ("name", "grid"),
    [
        ("tip-adapter", {"alpha": [0.1, 1.0, 10.0, 100.0, 1000.0], "beta": [1.0, 5.0, 20.0]}),
        ("tip-x", {"alpha": [1.0, 10.0, 100.0, 1000.0], "gamma": [0.0, 1.0, 10.0]}),
        ("ape", {"alpha": [1.0, 10.0, 100.0], "gamma": [0.0, 0.5], "n_channels": [3, 6]}),
        ("gda", {"alpha": [0.1, 1.0, 10.0, 100.0, 1000.0]}),
    ],
)
def test_tune_picks_the_brute_force_grid_point(name: str, grid: dict[str, list[float]]) -> None:
    # A weak text prior (text_noise) so the cache matters: the optimum is inside the alpha grid.
    t = make_task(15, n_classes=4, shots=3, views=2, dim=6, noise=0.6, text_noise=3.0)
    fixed = {"scale": 20.0}
    method = get_method(name)(**fixed)
    chosen = method.tune(t.keys, t.labels, t.text, t.groups, grid=grid)
    expected = _brute_force_choice(name, t, grid, fixed)
    assert {k: chosen[k] for k in grid} == pytest.approx({k: expected[k] for k in grid})
    report = method.tune_report
    assert report is not None
    assert report.fallback is None
    assert report.n_scored == t.labels.size
    assert report.n_evaluated == int(np.prod([len(v) for v in grid.values()]))
    # The chosen point is then fitted: predict uses it.
    assert method.hyperparams == chosen


def test_tune_report_is_consistent() -> None:
    t = make_task(14, n_classes=5, shots=4, dim=8)
    method = get_method("tip-adapter")()
    method.tune(t.keys, t.labels, t.text)
    r = method.tune_report
    assert r is not None
    assert r.accuracy == pytest.approx(float(np.mean(r.correct)))
    assert r.confidence.shape == r.correct.shape == r.rows.shape == (r.n_scored,)
    assert np.all((r.confidence > 0) & (r.confidence <= 1))
    rows, logits = get_method("tip-adapter")(**method.hyperparams).loo_logits(t.keys, t.labels, t.text)
    temperature, nll = fit_temperature(logits, t.labels[rows])
    # The loss is flat at its minimum: the temperature is determined to ~sqrt(1e-10), the loss to 1e-10.
    assert r.temperature == pytest.approx(temperature, rel=1e-4)
    assert r.nll == pytest.approx(nll, abs=1e-8)
    assert set(r.to_dict()) >= {"hyperparams", "loo_accuracy", "loo_nll", "temperature", "n_scored", "fallback"}


@pytest.mark.parametrize("name", METHODS)
def test_default_search_ends_on_the_documented_grid(name: str) -> None:
    t = make_task(15, n_classes=5, shots=3, dim=8)
    method = get_method(name)()
    chosen = method.tune(t.keys, t.labels, t.text)
    grid = method._default_grid(method._require_fitted())
    for key, values in grid.items():
        assert any(np.isclose(chosen[key], v) for v in values), (key, chosen[key])
    assert method.tune_report is not None
    assert method.tune_report.fallback is None


@pytest.mark.parametrize("name", METHODS)
def test_tune_falls_back_when_every_class_has_one_shot(name: str) -> None:
    t = make_task(16, n_classes=4, shots=1, views=2, dim=6)
    method = get_method(name)()
    chosen = method.tune(t.keys, t.labels, t.text, t.groups)
    report = method.tune_report
    assert report is not None
    if name == "zero-shot":  # no cache to leave out: every row is still scored
        assert report.fallback is None
        assert report.n_scored == t.labels.size
        return
    assert report.fallback is not None
    assert report.accuracy is None
    assert report.n_scored == 0
    if name == "gda":  # nothing to rescale: the starting values are kept
        assert "two or more shots" in report.fallback
        assert chosen == get_method(name)().hyperparams
    elif name == "proker":  # its few-shot rule (tests/cache_models/test_proker.py)
        assert "few-shot rule" in report.fallback
    else:  # the single-shot rule: alpha follows the zero-shot temperature fitted on the shots
        zero_shot = (100.0 * t.keys @ t.text.T).astype(np.float32)
        temperature, _ = fit_temperature(zero_shot, t.labels)
        assert "single-shot rule" in report.fallback
        assert chosen["alpha"] == pytest.approx(SINGLE_SHOT_ALPHA_PER_TEMPERATURE * temperature)
        assert chosen["beta"] == SINGLE_SHOT_BETA
        assert report.temperature == pytest.approx(temperature)
        if name == "tip-x":
            assert chosen["gamma"] == 0.0
        if name == "ape":  # its rule also sets the key weighting and the channel count (ape.py)
            assert chosen["gamma"] == ape.FEW_SHOT_GAMMA
            assert chosen["n_channels"] == max(1, round(ape.FEW_SHOT_CHANNEL_FRACTION * t.keys.shape[1]))
            assert f"n_channels = {chosen['n_channels']}" in report.fallback
    np.testing.assert_array_equal(
        method.predict(t.queries), get_method(name)(**chosen).fit(t.keys, t.labels, t.text, t.groups).predict(t.queries)
    )


def test_single_shot_alpha_grows_when_the_text_knows_nothing() -> None:
    """Same keys; text rows that point at the right classes vs. text rows unrelated to them."""
    t = make_task(17, n_classes=4, shots=1, views=1, dim=8)
    informed = get_method("tip-adapter")()
    informed.tune(t.keys, t.labels, t.keys[np.argsort(t.labels)])  # text = the shots themselves
    rng = np.random.default_rng(3)
    noise = unit(rng.normal(size=t.text.shape)).astype(np.float32)
    blind = get_method("tip-adapter")()
    blind.tune(t.keys, t.labels, noise)
    assert blind.hyperparams["alpha"] > 3 * informed.hyperparams["alpha"]  # measured 4.2x


def test_one_shot_classes_are_keys_but_not_scored() -> None:
    t = make_task(17, n_classes=4, shots=3, dim=6)
    single = np.flatnonzero(t.labels == 0)[1:]  # class 0 keeps one shot
    keep = np.setdiff1d(np.arange(t.labels.size), single)
    keys, labels = t.keys[keep], t.labels[keep]
    method = get_method("tip-adapter")()
    method.tune(keys, labels, t.text, grid={"alpha": [1.0, 10.0]})
    report = method.tune_report
    assert report is not None
    assert set(labels[report.rows].tolist()) == {1, 2, 3}
    assert report.n_scored == int(np.sum(labels != 0))


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"alpah": [1.0]}, "unknown hyper-parameter 'alpah'; valid: alpha, beta, scale"),
        ({"scale": [1.0, 2.0]}, "'scale' cannot be tuned by leave-one-out; tunable: alpha, beta"),
        ({"alpha": []}, r"grid\['alpha'\] is empty"),
        ({"alpha": 1.0}, r"grid\['alpha'\] must be a sequence"),
        ({"alpha": [-1.0]}, "alpha must be non-negative"),
        ({"beta": [True]}, "beta must be a number"),
    ],
)
def test_bad_grids_are_rejected(grid: dict[str, object], message: str) -> None:
    t = make_task(18)
    with pytest.raises(ValueError, match=message):
        get_method("tip-adapter")().tune(t.keys, t.labels, t.text, grid=grid)


def test_tip_x_tau_and_ape_lambdas_are_not_tunable() -> None:
    t = make_task(19)
    with pytest.raises(ValueError, match="'tau' cannot be tuned"):
        get_method("tip-x")().tune(t.keys, t.labels, t.text, grid={"tau": [0.5]})
    with pytest.raises(ValueError, match="'lambda1' cannot be tuned"):
        get_method("ape")().tune(t.keys, t.labels, t.text, grid={"lambda1": [0.5]})


def test_equal_cross_entropy_is_broken_by_accuracy_then_grid_order() -> None:
    from collections.abc import Mapping, Sequence

    from cache_models.tuning import LooScorer, TermKey, search

    # Rows [1, 1, 0] and [0, 1, 1] with label 1 have the same cross-entropy at every temperature,
    # but argmax gets the first wrong (ties go to class 0) and the second right.
    wrong = np.array([[1.0, 1.0, 0.0]] * 4, dtype=np.float32)
    right = np.array([[0.0, 1.0, 1.0]] * 4, dtype=np.float32)
    table = {1.0: wrong, 2.0: right, 3.0: right.copy()}

    class Fixed(LooScorer):
        def term_key(self, params: Mapping[str, float]) -> TermKey:
            return (params["alpha"],)

        def compute_terms(self, terms: Sequence[TermKey]) -> list[np.ndarray]:
            return [table[alpha] for (alpha,) in terms]

        def combine(self, params: Mapping[str, float], term: np.ndarray) -> np.ndarray:
            return term

    labels = np.ones(4, dtype=np.int64)
    report = search(Fixed(wrong), labels, {"alpha": 0.0}, {"alpha": [1.0, 2.0, 3.0]}, [("alpha",)])
    assert report.hyperparams["alpha"] == 2.0  # not 1.0 (less accurate), not 3.0 (later in the grid)
    assert report.accuracy == 1.0
