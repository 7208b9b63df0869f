"""`pick_best` (method=auto): every method scored on the same shot folds, each refitted without them."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest

from cache_models import fit_temperature, get_method, selection
from cache_models.base import CacheMethod, Support, make_support
from cache_models.selection import (
    MAX_FOLDS,
    ONE_SHOT_CHOICE,
    cross_method_scores,
    held_out_logits,
    pick_best,
    shot_folds,
    shot_labels,
)

from .conftest import make_task, unit

F64 = npt.NDArray[np.float64]


def _tuned(name: str, seed: int = 0, **task_args: int | float) -> CacheMethod:
    t = make_task(seed, **task_args)  # type: ignore[arg-type]
    method = get_method(name)(scale=20.0)
    method.tune(t.keys, t.labels, t.text, t.groups)
    return method


def test_folds_deal_every_class_round_robin_and_keep_a_shot_per_class() -> None:
    t = make_task(1, n_classes=3, shots=5, views=2)
    support = make_support(t.keys, t.labels, t.text, t.groups)
    folds = shot_folds(support, 4)
    for group in np.unique(support.groups):  # all views of a shot share its fold
        assert np.unique(folds[support.groups == group]).size == 1
    for label in range(3):
        in_class = support.labels == label
        per_fold = [np.unique(support.groups[in_class & (folds == f)]).size for f in range(4)]
        assert sorted(per_fold) == [1, 1, 1, 2]  # 5 shots into 4 folds
        for f in range(4):  # every fold leaves the class some shots to refit on
            assert np.any(in_class & (folds != f))


def test_held_out_logits_equal_a_refit_without_the_fold() -> None:
    method = _tuned("tip-adapter", 2, shots=4)
    support = method.support
    shots, logits = held_out_logits(method, 2)
    folds = shot_folds(support, 2)
    for fold in range(2):
        train = folds != fold
        reference = get_method("tip-adapter")(**method.hyperparams)
        reference.fit(support.keys[train], support.labels[train], support.text, support.groups[train])
        for row in np.flatnonzero(folds == fold):
            i = int(np.searchsorted(shots, support.groups[row]))
            np.testing.assert_allclose(logits[i], reference.predict(support.keys[row : row + 1])[0], rtol=1e-5)


def test_held_out_logits_average_a_shots_views() -> None:
    method = _tuned("gda", 3, shots=3, views=2)
    shots, logits = held_out_logits(method, 3)
    assert shots.tolist() == sorted(set(method.support.groups.tolist()))
    assert logits.shape == (shots.size, method.support.n_classes)


def test_a_flattering_own_report_does_not_win() -> None:
    """Zero-shot with text unrelated to the classes is at chance on held-out shots; claiming a perfect
    leave-one-out score in its own report must not make `auto` pick it over a working cache."""
    t = make_task(4, n_classes=4, shots=6, dim=16, noise=0.4)
    text = unit(np.random.default_rng(9).standard_normal(t.text.shape))
    methods = {}
    for name in ("zero-shot", "tip-adapter"):
        m = get_method(name)(scale=20.0)
        m.tune(t.keys, t.labels, text, t.groups)
        methods[name] = m
    zero_shot_report = methods["zero-shot"].tune_report
    assert zero_shot_report is not None
    methods["zero-shot"].tune_report = dataclasses.replace(zero_shot_report, nll=0.0, accuracy=1.0)
    assert pick_best(methods) == "tip-adapter"
    assert set(cross_method_scores(methods)) == {"tip-adapter"}


def test_zero_shot_does_not_compete_even_where_its_folds_score_best() -> None:
    """Two shots per class and class text that is the classes' own centre: on the shared folds zero-shot
    (which loses no shot to a fold) has the lowest calibrated cross-entropy, yet `auto` keeps a cache method."""
    t = make_task(3, n_classes=5, shots=2, dim=16, noise=1.2)
    centres = unit(np.stack([t.keys[t.labels == c].mean(axis=0) for c in range(5)]))
    methods = {}
    for name in ("zero-shot", "tip-adapter", "ape"):
        m = get_method(name)(scale=20.0)
        m.tune(t.keys, t.labels, centres, t.groups)
        methods[name] = m
    nll = {}
    for name, method in methods.items():
        shots, logits = held_out_logits(method, 2)
        nll[name] = fit_temperature(logits, shot_labels(method.support, shots))[1]
    assert nll["zero-shot"] < min(nll["tip-adapter"], nll["ape"])  # what the comparison used to pick
    scores = cross_method_scores(methods)
    assert set(scores) == {"tip-adapter", "ape"}
    assert pick_best(methods) == min(scores, key=lambda n: scores[n][0])


def test_untuned_methods_take_no_part() -> None:
    t = make_task(5, shots=4)
    tuned = get_method("tip-adapter")(scale=20.0)
    tuned.tune(t.keys, t.labels, t.text, t.groups)
    given = get_method("ape")(scale=20.0).fit(t.keys, t.labels, t.text, t.groups)
    assert pick_best({"ape": given, "tip-adapter": tuned}) == "tip-adapter"
    assert set(cross_method_scores({"ape": given, "tip-adapter": tuned})) == {"tip-adapter"}


@pytest.mark.parametrize("present", [True, False])
def test_one_shot_per_class_takes_the_one_shot_choice(present: bool) -> None:
    names = ["zero-shot", "tip-adapter", *([ONE_SHOT_CHOICE] if present else [])]
    methods = {name: _tuned(name, 6, shots=1) for name in names}
    assert cross_method_scores(methods) == {}
    assert pick_best(methods) == (ONE_SHOT_CHOICE if present else None)


def test_folds_are_capped() -> None:
    method = _tuned("zero-shot", 7, shots=MAX_FOLDS + 3)
    folds = shot_folds(method.support, MAX_FOLDS)
    assert set(folds.tolist()) == set(range(MAX_FOLDS))


def test_many_classes_compare_on_a_fixed_class_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above MAX_COMPARED_CLASSES the comparison is the same refit on a sub-task of those classes."""
    monkeypatch.setattr(selection, "MAX_COMPARED_CLASSES", 3)
    method = _tuned("tip-adapter", 8, n_classes=5, shots=4)
    classes = selection.compared_classes(5)
    assert classes.size == 3
    assert np.array_equal(classes, selection.compared_classes(5))  # fixed seed
    shots, logits = held_out_logits(method, 2, classes)
    assert logits.shape == (3 * 4, 3)
    support = method.support
    inside = np.isin(support.labels, classes)
    sub_labels = np.searchsorted(classes, support.labels[inside])
    sub = make_support(support.keys[inside], sub_labels, support.text[classes], support.groups[inside])
    folds = shot_folds(sub, 2)
    reference = get_method("tip-adapter")(**method.hyperparams)
    reference.fit(sub.keys[folds != 0], sub.labels[folds != 0], sub.text, sub.groups[folds != 0])
    rows = np.flatnonzero(folds == 0)
    expected = reference.predict(sub.keys[rows])
    np.testing.assert_allclose(logits[np.searchsorted(shots, sub.groups[rows])], expected, rtol=1e-5)
    assert set(cross_method_scores({"tip-adapter": method})) == {"tip-adapter"}


def test_a_single_shot_class_stays_in_every_refit_and_is_not_scored() -> None:
    t = make_task(10, n_classes=3, shots=3)
    drop = np.flatnonzero(t.labels == 0)[1:]  # class 0 keeps one shot, the others keep three
    keep = np.setdiff1d(np.arange(t.labels.size), drop)
    methods = {}
    for name in ("zero-shot", "tip-adapter", "proker"):
        m = get_method(name)(scale=20.0)
        m.tune(t.keys[keep], t.labels[keep], t.text, t.groups[keep])
        methods[name] = m
    method = methods["tip-adapter"]
    folds = shot_folds(method.support, 3)
    assert np.all(folds[method.support.labels == 0] == -1)
    shots, logits = held_out_logits(method, 3)
    lone = int(method.support.groups[method.support.labels == 0][0])
    assert lone not in shots.tolist()
    assert shots.size == 6
    assert logits.shape == (6, 3)
    train = folds != 0
    assert np.any(train & (method.support.labels == 0))  # the lone shot is in the refit
    assert set(cross_method_scores(methods)) == set(methods) - {"zero-shot"}
    assert pick_best(methods) in methods


def _gda_fold_reference(support: Support, train: npt.NDArray[np.bool_], test_row: int, alpha: float) -> F64:
    """Dense methods.md GDA for one scored row: the means of the fold's train rows, the scatter of the
    whole support's residuals without the scored row's class (its shot never enters it; only the
    shrinkage scalar is the full support's)."""
    keys, labels = support.keys.astype(np.float64), support.labels
    n, d = support.n_classes, support.dim
    means = np.stack([keys[train & (labels == c)].mean(axis=0) for c in range(n)])
    full_means = np.stack([keys[labels == c].mean(axis=0) for c in range(n)])
    residuals = keys - full_means[labels]
    shrinkage = np.sum(residuals**2) / (labels.size - 1)  # trace(Sigma): the full support's, as in LOO
    kept = residuals[labels != labels[test_row]]
    precision = d * np.linalg.inv(kept.T @ kept + shrinkage * np.eye(d))
    weights = means @ precision
    bias = np.log(1.0 / n) - 0.5 * np.sum(weights * means, axis=1)
    x = keys[test_row]
    return 20.0 * (x @ support.text.T.astype(np.float64)) + alpha * (x @ weights.T + bias)


def test_gda_at_two_shots_is_scored_with_a_covariance_without_the_scored_class() -> None:
    """Two shots per class: every fold leaves each class one shot, whose plain refit has no covariance
    (GDA would score as zero-shot). The fold keeps its one-shot means and takes the covariance from the
    other classes' residuals, never from the scored shot or its class (a dense reference)."""
    method = _tuned("gda", 5, n_classes=4, shots=2, dim=12)
    support = method.support
    folds = shot_folds(support, 2)
    alpha = float(method.hyperparams["alpha"])
    shots, logits = held_out_logits(method, 2)
    zero_shot = 20.0 * (support.keys @ support.text.T)
    for row in range(support.n_rows):
        expected = _gda_fold_reference(support, folds != folds[row], row, alpha)
        i = int(np.searchsorted(shots, support.groups[row]))
        np.testing.assert_allclose(logits[i], expected, rtol=1e-4, atol=1e-4)
        assert not np.allclose(logits[i], zero_shot[row], atol=1e-3)  # the plain refit's degenerate answer


def test_gda_with_two_shots_left_per_class_is_a_plain_refit() -> None:
    method = _tuned("gda", 6, n_classes=3, shots=4, dim=12)
    support = method.support
    folds = shot_folds(support, 2)
    _, logits = held_out_logits(method, 2)
    for fold in range(2):
        train = folds != fold
        reference = get_method("gda")(**method.hyperparams)
        reference.fit(support.keys[train], support.labels[train], support.text, support.groups[train])
        test = np.flatnonzero(folds == fold)
        expected = reference.predict(support.keys[test])
        order = np.searchsorted(np.unique(support.groups), support.groups[test])
        np.testing.assert_allclose(logits[order], expected, rtol=1e-4, atol=1e-4)


def test_folds_are_retuned_at_four_shots_only() -> None:
    for shots, expected in ((2, False), (3, False), (4, True), (5, False), (8, False)):
        t = make_task(13, n_classes=3, shots=shots)
        assert selection.retunes_folds(make_support(t.keys, t.labels, t.text, t.groups)) is expected, shots


@pytest.mark.parametrize("name", ["tip-adapter", "ape", "gda", "proker"])
def test_a_retuned_fold_is_the_method_tuned_on_the_fold_alone(name: str) -> None:
    """With `retune` each fold's refit chooses its own hyper-parameters on the fold's shots, as `tune`
    does from the defaults; the fold's held-out shots never enter that choice."""
    method = _tuned(name, 14, n_classes=3, shots=4, dim=12)
    support = method.support
    shots, logits = held_out_logits(method, 4, retune=True)
    folds = shot_folds(support, 4)
    moved = False
    for fold in range(4):
        train = folds != fold
        reference = get_method(name)(scale=20.0)
        reference.tune(support.keys[train], support.labels[train], support.text, support.groups[train])
        moved |= reference.hyperparams != method.hyperparams
        rows = np.flatnonzero(folds == fold)
        expected = reference.predict(support.keys[rows])
        np.testing.assert_allclose(logits[np.searchsorted(shots, support.groups[rows])], expected, rtol=1e-5, atol=1e-5)
    assert moved  # some fold chose other values than the whole support did: the retune is real


def test_the_comparison_retunes_at_four_shots_and_refits_at_five() -> None:
    for shots, retune in ((4, True), (5, False)):
        t = make_task(15, n_classes=3, shots=shots, dim=12)
        methods = {}
        for name in ("zero-shot", "ape"):
            m = get_method(name)(scale=20.0)
            m.tune(t.keys, t.labels, t.text, t.groups)
            methods[name] = m
        scores = cross_method_scores(methods)
        n_folds = min(MAX_FOLDS, shots)
        ids, logits = held_out_logits(methods["ape"], n_folds, retune=retune)
        labels = selection.shot_labels(methods["ape"].support, ids)
        _, nll = fit_temperature(logits, labels)
        assert scores["ape"][0] == pytest.approx(nll, abs=1e-6)
        _, other = held_out_logits(methods["ape"], n_folds, retune=not retune)
        assert not np.allclose(logits, other)  # the two kinds of fold differ here, so the check above can fail


def _softmax(z: F64) -> F64:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: F64 = e / e.sum(axis=1, keepdims=True)
    return out


def test_calibrated_probabilities_are_the_mean_of_each_methods_calibrated_softmax() -> None:
    rng = np.random.default_rng(20)
    a, b = rng.standard_normal((6, 4)).astype(np.float32) * 5, rng.standard_normal((6, 4)).astype(np.float32)
    one = selection.calibrated_probabilities([a], [0.5])
    np.testing.assert_allclose(one, _softmax(a.astype(np.float64) / 0.5), rtol=1e-12)
    two = selection.calibrated_probabilities([a, b], [0.5, 2.0])
    expected = (_softmax(a.astype(np.float64) / 0.5) + _softmax(b.astype(np.float64) / 2.0)) / 2
    np.testing.assert_allclose(two, expected, rtol=1e-12)
    np.testing.assert_allclose(two.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="2 logit arrays for 1 temperatures"):
        selection.calibrated_probabilities([a, b], [1.0])


def _all_tuned(
    seed: int, shots: int, names: tuple[str, ...] = ("zero-shot", "tip-adapter", "ape", "proker")
) -> dict[str, CacheMethod]:
    t = make_task(seed, n_classes=4, shots=shots, dim=12, noise=1.0)
    methods = {}
    for name in names:
        m = get_method(name)(scale=20.0)
        m.tune(t.keys, t.labels, t.text, t.groups)
        methods[name] = m
    return methods


@pytest.mark.parametrize("shots", [selection.BLEND_FROM_SHOTS - 1])
def test_below_the_blend_shots_auto_keeps_the_one_best_method(shots: int) -> None:
    methods = _all_tuned(21, shots)
    choice = selection.choose(methods)
    assert choice is not None
    assert not choice.blended
    assert choice.report is None
    assert choice.members == (pick_best(methods),)
    assert choice.temperatures == (methods[choice.members[0]].tune_report.temperature,)  # type: ignore[union-attr]


@pytest.mark.parametrize("shots", [selection.BLEND_FROM_SHOTS, 4, 6])
def test_from_the_blend_shots_auto_blends_the_two_best_ranked_methods(shots: int) -> None:
    assert selection.BLEND_FROM_SHOTS >= 2  # 1 shot per class has no folds to blend on
    assert selection.BLEND_SIZE == 2
    methods = _all_tuned(22, shots)
    scores = cross_method_scores(methods)
    choice = selection.choose(methods)
    assert choice is not None
    assert choice.blended
    ranked = sorted(scores, key=lambda n: scores[n][0])
    assert choice.members == tuple(ranked[:2])
    assert choice.members[0] == pick_best(methods)
    assert "zero-shot" not in choice.members
    # The blend's report: its calibrated probabilities on the members' own fold logits, recomputed here.
    n_folds = min(MAX_FOLDS, shots)
    retune = selection.retunes_folds(methods[ranked[0]].support)
    probs = np.zeros(1)
    for name, temperature in zip(choice.members, choice.temperatures, strict=True):
        assert temperature == methods[name].tune_report.temperature  # type: ignore[union-attr]
        ids, logits = held_out_logits(methods[name], n_folds, retune=retune)
        probs = probs + _softmax(logits.astype(np.float64) / temperature)
    probs /= 2
    labels = shot_labels(methods[ranked[0]].support, ids)
    report = choice.report
    assert report is not None
    assert report.n_scored == labels.size == 4 * shots
    np.testing.assert_array_equal(report.labels, labels)
    np.testing.assert_array_equal(report.predicted, np.argmax(probs, axis=1))
    np.testing.assert_allclose(report.confidence, probs.max(axis=1), rtol=1e-6)
    assert report.accuracy == pytest.approx(float(np.mean(np.argmax(probs, axis=1) == labels)))
    assert report.nll == pytest.approx(float(-np.mean(np.log(probs[np.arange(labels.size), labels]))))
    assert report.temperature == 1.0


def test_a_blends_report_names_task_classes_when_it_compares_a_class_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "MAX_COMPARED_CLASSES", 3)
    t = make_task(23, n_classes=6, shots=4, dim=12, noise=1.0)
    methods = {}
    for name in ("tip-adapter", "proker"):
        m = get_method(name)(scale=20.0)
        m.tune(t.keys, t.labels, t.text, t.groups)
        methods[name] = m
    choice = selection.choose(methods)
    assert choice is not None
    assert choice.report is not None
    classes = selection.compared_classes(6)
    assert not np.array_equal(classes, np.arange(3))  # the subset is not the first classes, so the check can fail
    assert set(choice.report.labels.tolist()) == set(classes.tolist())
    assert set(choice.report.predicted.tolist()) <= set(classes.tolist())


def test_one_method_alone_is_never_blended() -> None:
    methods = _all_tuned(24, 5, ("zero-shot", "ape"))
    choice = selection.choose(methods)
    assert choice is not None
    assert choice.members == ("ape",)


def test_one_shot_per_class_chooses_the_one_shot_choice_alone() -> None:
    methods = _all_tuned(25, 1)
    choice = selection.choose(methods)
    assert choice is not None
    assert choice.members == (ONE_SHOT_CHOICE,)
    assert choice.report is None
    assert selection.choose(_all_tuned(25, 1, ("zero-shot", "ape"))) is None


@pytest.mark.parametrize(("shots", "rule"), [(2, "best"), (4, "blend")])
def test_a_choice_carries_the_ranking_it_was_made_from(shots: int, rule: str) -> None:
    """Why `auto` chose: every compared method (zero-shot never) best first, with the same cross-entropy and
    accuracy `cross_method_scores` gives, on the folds it states."""
    methods = _all_tuned(26, shots)
    scores = cross_method_scores(methods)
    choice = selection.choose(methods)
    assert choice is not None
    assert choice.rule == rule
    assert [r.method for r in choice.ranking] == sorted(scores, key=lambda n: scores[n][0])
    assert "zero-shot" not in {r.method for r in choice.ranking}
    for ranked in choice.ranking:
        assert (ranked.nll, ranked.accuracy) == pytest.approx(scores[ranked.method])
    assert choice.members == tuple(r.method for r in choice.ranking[: len(choice.members)])
    assert choice.plan is not None
    assert choice.plan.n_folds == min(MAX_FOLDS, shots)
    assert choice.plan.retune == selection.retunes_folds(methods["ape"].support)
    assert choice.plan.classes.tolist() == [0, 1, 2, 3]
    assert choice.scored_shots == 4 * shots


def test_a_one_shot_choice_has_no_ranking() -> None:
    choice = selection.choose(_all_tuned(27, 1))
    assert choice is not None
    assert choice.rule == "one-shot"
    assert choice.ranking == ()
    assert choice.plan is None
