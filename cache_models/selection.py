"""Choosing among fitted methods: the one rule `method=auto` uses in the service and `shotcache eval`
reports (callers never re-implement it).

Each method's own leave-one-out score cannot be compared across methods: statistics that are not a
cache (APE's channel selection, GDA's means and covariance) are fitted on the full support, the
held-out shot included, so those methods' scores are optimistic by an amount that differs per method
(on train-split simulations APE had the lowest LOO cross-entropy in most tasks while GDA or ProKeR
classified the pseudo-queries better). `pick_best` therefore scores every method on the SAME shot
folds, each method refitted from scratch without the fold (its chosen hyper-parameters kept, every
statistic refitted), and compares the pooled held-out logits by calibrated cross-entropy (one fitted
temperature per method) — the same footing for every method.

Folds: each class's shots are dealt round-robin into min(shots, MAX_FOLDS) folds, so every fold
holds out about 1/folds of every class's shots and every class keeps at least one shot. A class with a
single shot keeps it in every refit and is not scored; when no class has two shots nothing can be
held out and ONE_SHOT_CHOICE, chosen on train-split simulations, is taken. With two shots per class
every refit has one shot per class, where a plain GDA refit has no covariance and would score as
zero-shot: each method scores a fold through `CacheMethod.held_out_fold`, and GDA's keeps the
fold's one-shot means but takes the covariance from the residuals of every class except the scored
one (the scored shot never enters what scores it; cache_models.gda, docs/benchmarks.md).

Zero-shot does not compete. It has no shots to lose, while every cache method is scored refitted on
(folds - 1) / folds of them: the comparison is pessimistic for every method but zero-shot, and the
more so the fewer the shots. At 2 shots per class (a refit keeps one) `auto` picked zero-shot in 3 of
20 and 6 of 40 train-split draws of cifar10-mini and lost 10-14 points on those draws; without it,
`auto` - the best method went from -1.55 to -0.12 and from -1.53 to +0.06 points, and no other
cell of either data set (2, 3, 4, 8, 16 shots) ever picked it (docs/benchmarks.md, "`auto`"). A task
whose shots do not help keeps each cache method's own way back towards zero-shot: its tuned weight
of the cache (at 2 shots the few-shot rule's, which shrinks with the zero-shot temperature).

Blending from 3 shots (`choose`): the fold scores of the best methods differ by less than their noise,
so from BLEND_FROM_SHOTS shots per scored class `auto` answers with the mean of the calibrated
probabilities (each method's logits over its own leave-one-out temperature) of the BLEND_SIZE methods
ranked first, instead of betting on one. Measured with `shotcache eval --train-only` (20 draws per
cell, the test splits never read; docs/benchmarks.md, "`auto` blends"), against the single pick in
points: 3 shots +1.47 / +1.25 (cifar10-mini / textile-defects), 4 shots +0.84 / -0.31, 8 shots
+0.56 / +1.77; at 2 shots -1.12 / -0.83, where each fold's refit keeps one shot per class and the
ranking is too noisy for its second place to help, so 2 shots keep one method. Earlier simulations
(shots drawn from all train images, 16 draws) also lost at 2 shots and gained at 4, 8 and 16. The
blend's own report (accuracy, cross-entropy, the confusion matrix and the abstain threshold's
confidences) is its members' fold logits blended the same way: no extra refit.

Re-tuned folds at 4 shots: a method's hyper-parameters were chosen by leave-one-out on the whole
support, the fold's held-out shots included, so a refit that keeps them scores optimistically, and the
more so the larger the method's search (APE's ~500 grid points against GDA's 22) and the fewer the
shots it was chosen on. When the fewest shots of a scored class is within RETUNE_SHOTS each fold
therefore re-tunes every method on the fold's shots alone, exactly as `tune` would, so the held-out
shots score the whole recipe, its search included. On train-split simulations (docs/benchmarks.md)
it brought `auto` closer to the best method at 4 shots on both data sets, and not at 8 or 16 (the
optimism shrinks with the shots; a search per fold costs more there). At 3 shots a fold leaves two
shots per class, where `tune` switches to the few-shot rules: the fold would score another recipe
than the task's (measured: worse on cifar10-mini), so 3 shots and fewer keep the plain refits.

Cost: MAX_FOLDS refits of each method at its chosen values (no grid) and one prediction of every
shot; at 4 shots MAX_FOLDS full tunes per method instead (7-12x the refits, 1.6-3.7 s more for all six
methods in a quiet window; measured in docs/benchmarks.md, "`auto`"). Above MAX_COMPARED_CLASSES
classes the comparison runs on a fixed-seed subset of that many classes (the same for every method, so
still fair): a 1000-class task costs what a 64-class one does (measured in docs/benchmarks.md, "auto's
comparison").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ._validation import FloatArray, IntArray, Support, make_support
from .base import CacheMethod
from .tuning import TuneReport, fit_temperature

Float64Array = npt.NDArray[np.float64]

ZERO_SHOT = "zero-shot"
MAX_FOLDS = 4  # shot folds of the cross-method comparison (module docstring)
# One shot per class: nothing can be held out. On TRAIN-split simulations (10 draws per data set, the
# few-shot rules of round 2's third session) ProKeR's rule was best on cifar10-mini (54.3% vs APE 51.3%,
# Tip-Adapter 50.9%) and 1.9 points behind the best (APE, 65.8%) on textile-defects: the smallest
# worst-case loss of every method (APE 3.0, Tip-Adapter / Tip-X 3.4; docs/benchmarks.md).
ONE_SHOT_CHOICE = "proker"
# Fewest shots of a scored class (inclusive range) at which every method is re-tuned inside each fold
# rather than refitted at the values it chose on the whole support (module docstring). From 4: a fold
# then leaves every class 3 or more shots, above few_shot.FEW_SHOT_MAX, so the fold's tune follows the
# same recipe (leave-one-out search) as the task's own; up to 4: where it was measured to pay.
RETUNE_SHOTS = (4, 4)
# From this many shots per scored class `auto` averages the calibrated probabilities of its BLEND_SIZE
# best methods instead of keeping one (module docstring; chosen on train-split runs, docs/benchmarks.md).
BLEND_FROM_SHOTS = 3
BLEND_SIZE = 2
MAX_COMPARED_CLASSES = 64  # classes the comparison refits on at most (module docstring)
_SEED = 0  # the class subset is deterministic: the same task always compares on the same classes


def shot_folds(support: Support, n_folds: int) -> IntArray:
    """Fold of each row: the shots (groups) of each class dealt round-robin into `n_folds` folds;
    -1 (never held out, never scored) for a class with a single shot, which must stay in every refit."""
    folds = np.full(support.n_rows, -1, dtype=np.int64)
    for label in range(support.n_classes):
        rows = np.flatnonzero(support.labels == label)
        shots, index = np.unique(support.groups[rows], return_inverse=True)
        if shots.size >= 2:
            folds[rows] = index % n_folds
    return folds


def fold_count(support: Support) -> int:
    """min(MAX_FOLDS, fewest shots of a class with two or more); 0 when no class has two."""
    shots = support.shots_per_class()
    shots = shots[shots >= 2]
    return int(min(MAX_FOLDS, shots.min())) if shots.size else 0


def compared_classes(n_classes: int) -> IntArray:
    """The classes the comparison uses: all, or a fixed-seed subset of MAX_COMPARED_CLASSES."""
    if n_classes <= MAX_COMPARED_CLASSES:
        return np.arange(n_classes, dtype=np.int64)
    rng = np.random.default_rng(_SEED)
    return np.sort(rng.choice(n_classes, size=MAX_COMPARED_CLASSES, replace=False)).astype(np.int64)


def class_subset(support: Support, classes: IntArray) -> Support:
    """The support restricted to `classes` (sorted), relabelled 0..len(classes)-1."""
    if classes.size == support.n_classes:
        return support
    rows = np.isin(support.labels, classes)
    labels = np.searchsorted(classes, support.labels[rows])
    return make_support(support.keys[rows], labels, support.text[classes], support.groups[rows])


def fewest_scored_shots(support: Support) -> int:
    """The fewest shots of a class with two or more (a scored class); 0 when none has two."""
    shots = support.shots_per_class()
    shots = shots[shots >= 2]
    return int(shots.min()) if shots.size else 0


def retunes_folds(support: Support) -> bool:
    """Whether the comparison re-tunes every method inside each fold: when the fewest shots of a
    scored class is within RETUNE_SHOTS (module docstring)."""
    fewest = fewest_scored_shots(support)
    return bool(fewest) and RETUNE_SHOTS[0] <= fewest <= RETUNE_SHOTS[1]


def held_out_logits(
    method: CacheMethod, n_folds: int, classes: IntArray | None = None, *, retune: bool = False
) -> tuple[IntArray, FloatArray]:
    """(shot ids, logits [shots, C]): each shot of `classes` (default all) scored by the method
    refitted without its fold on those classes alone (with `retune`, its hyper-parameters chosen
    again on the fold's shots: `CacheMethod.held_out_fold`).

    Rows of one shot (a per-view method's views) are averaged into one logit row per shot, so every
    method is scored on the same shots whatever its support looks like. Single-shot classes' shots
    are never held out and not returned."""
    support = method.support if classes is None else class_subset(method.support, classes)
    folds = shot_folds(support, n_folds)
    logits = np.empty((support.n_rows, support.n_classes), dtype=np.float32)
    for fold in range(n_folds):
        train, test = folds != fold, folds == fold
        logits[test] = method.held_out_fold(support, train, test, retune=retune)
    held = folds >= 0
    shots, index, counts = np.unique(support.groups[held], return_inverse=True, return_counts=True)
    per_shot = np.zeros((shots.size, support.n_classes), dtype=np.float64)
    np.add.at(per_shot, index, logits[held])
    return shots, (per_shot / counts[:, None]).astype(np.float32)


def shot_labels(support: Support, shots: IntArray) -> IntArray:
    """The label of each shot id in `shots` (sorted, as np.unique returns them)."""
    unique, first = np.unique(support.groups, return_index=True)
    return support.labels[first[np.searchsorted(unique, shots)]]


@dataclass(frozen=True)
class FoldScore:
    """One method on the shared folds: calibrated held-out cross-entropy, held-out accuracy, and the
    held-out logits [shots, classes] of each scored shot (`shots`: sorted ids). Logit columns and
    `labels` index `classes`, the task classes compared (all of them up to MAX_COMPARED_CLASSES)."""

    nll: float
    accuracy: float
    shots: IntArray
    labels: IntArray
    logits: FloatArray
    classes: IntArray


@dataclass(frozen=True)
class FoldPlan:
    """How the methods are compared: on `classes` (task classes, sorted), `n_folds` shot folds, each
    method re-tuned inside every fold when `retune` (module docstring)."""

    classes: IntArray
    n_folds: int
    retune: bool


def _compared(methods: Mapping[str, CacheMethod]) -> dict[str, CacheMethod]:
    return {name: m for name, m in methods.items() if m.tune_report is not None and name != ZERO_SHOT}


def fold_plan(methods: Mapping[str, CacheMethod]) -> FoldPlan | None:
    """The comparison `fold_scores` runs; None when nothing can be held out (no tuned cache method, or no
    compared class with two shots)."""
    tuned = _compared(methods)
    if not tuned:
        return None
    classes = compared_classes(next(iter(tuned.values())).support.n_classes)
    n_folds = min(fold_count(class_subset(m.support, classes)) for m in tuned.values())
    if n_folds == 0:
        return None
    return FoldPlan(classes, n_folds, retunes_folds(class_subset(next(iter(tuned.values())).support, classes)))


def fold_scores(methods: Mapping[str, CacheMethod], plan: FoldPlan | None = None) -> dict[str, FoldScore]:
    """Every tuned cache method scored on the same folds (`plan`, default `fold_plan(methods)`); zero-shot
    takes no part (module docstring)."""
    plan = plan or fold_plan(methods)
    if plan is None:
        return {}
    classes, n_folds, retune = plan.classes, plan.n_folds, plan.retune
    out = {}
    for name, method in _compared(methods).items():
        shots, logits = held_out_logits(method, n_folds, classes, retune=retune)
        labels = shot_labels(class_subset(method.support, classes), shots)
        _, nll = fit_temperature(logits, labels)
        out[name] = FoldScore(nll, float(np.mean(np.argmax(logits, axis=1) == labels)), shots, labels, logits, classes)
    return out


def cross_method_scores(methods: Mapping[str, CacheMethod]) -> dict[str, tuple[float, float]]:
    """(calibrated held-out cross-entropy, held-out accuracy) per tuned cache method, all on the same
    folds; zero-shot takes no part (module docstring)."""
    return {name: (score.nll, score.accuracy) for name, score in fold_scores(methods).items()}


def _ranked(scores: Mapping[str, FoldScore], order: list[str]) -> list[str]:
    """Lowest calibrated cross-entropy first (ties to 1e-6: higher held-out accuracy, then the earlier name)."""
    return sorted(scores, key=lambda n: (round(scores[n].nll, 6), -scores[n].accuracy, order.index(n)))


def pick_best(methods: Mapping[str, CacheMethod]) -> str | None:
    """The tuned cache method with the lowest calibrated cross-entropy on the shared shot folds (ties to
    1e-6: higher held-out accuracy, then the earlier name). With one shot per class ONE_SHOT_CHOICE
    when it is among them, else None (the caller's default). Zero-shot, and methods fitted with given
    hyper-parameters (no `tune_report`), take no part."""
    scores = fold_scores(methods)
    if not scores:
        return _one_shot_choice(methods)
    return _ranked(scores, list(methods))[0]


@dataclass(frozen=True)
class Ranked:
    """One method as `auto` ranked it on the shared folds: calibrated held-out cross-entropy (what ranks)
    and held-out accuracy."""

    method: str
    nll: float
    accuracy: float


@dataclass(frozen=True)
class Choice:
    """What `method=auto` classifies with: one method, or (`blended`) the mean of the calibrated
    probabilities of `members`, best first, whose own held-out `report` on the shared folds gives the
    blend's accuracy, confusion and abstain threshold (`blend_report`). Why: `ranking`, every compared
    method best first, on `plan`'s folds (both empty / None when nothing could be held out and the one-shot
    choice was taken)."""

    members: tuple[str, ...]
    temperatures: tuple[float, ...]  # each member's calibration (its leave-one-out temperature)
    report: TuneReport | None = None
    ranking: tuple[Ranked, ...] = ()
    plan: FoldPlan | None = None
    scored_shots: int = 0  # shots the comparison held out and scored (each method the same ones)

    @property
    def blended(self) -> bool:
        return len(self.members) > 1

    @property
    def rule(self) -> Literal["blend", "best", "one-shot"]:
        """ "blend" (the mean of the best BLEND_SIZE), "best" (the best alone: too few shots to blend) or
        "one-shot" (no class has two shots: ONE_SHOT_CHOICE)."""
        if not self.ranking:
            return "one-shot"
        return "blend" if self.blended else "best"


def choose(methods: Mapping[str, CacheMethod]) -> Choice | None:
    """`method=auto`: from BLEND_FROM_SHOTS shots per scored class the mean calibrated probabilities of
    the BLEND_SIZE methods `pick_best` ranks first; below, `pick_best`'s one method; None where
    `pick_best` gives None (the caller's default)."""
    plan = fold_plan(methods)
    scores = fold_scores(methods, plan)
    if not scores:
        single = _one_shot_choice(methods)
        return None if single is None else Choice((single,), (_temperature(methods[single]),))
    ranked = _ranked(scores, list(methods))
    ranking = tuple(Ranked(name, scores[name].nll, scores[name].accuracy) for name in ranked)
    scored = int(scores[ranked[0]].labels.size)
    support = class_subset(methods[ranked[0]].support, next(iter(scores.values())).classes)
    blend = len(ranked) >= BLEND_SIZE and fewest_scored_shots(support) >= BLEND_FROM_SHOTS
    members = tuple(ranked[:BLEND_SIZE]) if blend else (ranked[0],)
    temperatures = tuple(_temperature(methods[name]) for name in members)
    report = blend_report([scores[name] for name in members], temperatures) if blend else None
    return Choice(members, temperatures, report, ranking, plan, scored)


def calibrated_probabilities(logits: Sequence[FloatArray], temperatures: Sequence[float]) -> Float64Array:
    """[Q, N] float64: the mean over methods of softmax(logits / temperature), one logits array and
    temperature per method; with one method, its calibrated probabilities."""
    if not logits or len(logits) != len(temperatures):
        raise ValueError(f"{len(logits)} logit arrays for {len(temperatures)} temperatures")
    total: Float64Array | None = None
    for z, temperature in zip(logits, temperatures, strict=True):
        scaled = np.asarray(z, dtype=np.float64) / temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        probs = np.exp(scaled)
        probs /= probs.sum(axis=1, keepdims=True)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(logits)


def blend_report(scores: Sequence[FoldScore], temperatures: Sequence[float]) -> TuneReport:
    """The blend's held-out report: its calibrated probabilities on the shared folds' logits of its
    members (every member scored the same shots). Labels are task classes; temperature 1 (the blend's
    probabilities are already calibrated member by member)."""
    first = scores[0]
    for other in scores[1:]:
        if not np.array_equal(other.shots, first.shots):
            raise ValueError("blend members were scored on different shots")
    probs = calibrated_probabilities([s.logits for s in scores], temperatures)
    predicted = np.argmax(probs, axis=1).astype(np.int64)
    correct = predicted == first.labels
    truth = np.maximum(probs[np.arange(probs.shape[0]), first.labels], np.finfo(np.float64).tiny)
    return TuneReport(
        hyperparams={},
        accuracy=float(np.mean(correct)),
        nll=float(-np.mean(np.log(truth))),
        temperature=1.0,
        n_scored=int(first.labels.size),
        confidence=probs.max(axis=1).astype(np.float32),
        correct=correct,
        rows=first.shots,
        labels=first.classes[first.labels],
        predicted=first.classes[predicted],
    )


def blend_hyperparams(members: Mapping[str, Mapping[str, float | int]]) -> dict[str, float | int]:
    """A blend's hyper-parameters as one mapping: each member's, keyed `member.name`."""
    return {f"{member}.{key}": value for member, params in members.items() for key, value in params.items()}


def _temperature(method: CacheMethod) -> float:
    report = method.tune_report
    if report is None:
        raise ValueError(f"{method.name} is not tuned: it has no calibration to blend with")
    return report.temperature


def _one_shot_choice(methods: Mapping[str, CacheMethod]) -> str | None:
    tuned = {name for name, m in methods.items() if m.tune_report is not None}
    return ONE_SHOT_CHOICE if ONE_SHOT_CHOICE in tuned else None
