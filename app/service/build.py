"""Tune every method on a task's shots by leave-one-out and choose the one classify uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

from app.fewshot import TaskSupports, fit_method
from cache_models import METHODS, CacheMethod
from cache_models.base import HyperValue
from cache_models.selection import Choice, choose
from cache_models.tuning import TuneReport

from .requests import AUTO
from .task import ENSEMBLE, AutoSelection, MethodFit, abstain_threshold

log = logging.getLogger(__name__)


def method_fit(method: CacheMethod) -> MethodFit:
    """What a task keeps of a tuned (or given-hyper-parameter) fit; the fitted arrays are not part of it."""
    report = method.tune_report
    name, hyperparams, state = method.name, method.hyperparams, method.extra_state()
    if report is None:  # fitted with given hyper-parameters, not tuned
        return MethodFit(name, hyperparams, state, None, None, 1.0, None, 0, "not tuned")
    return _reported_fit(name, hyperparams, state, report)


def _reported_fit(
    name: str,
    hyperparams: Mapping[str, HyperValue],
    state: Mapping[str, np.ndarray],
    report: TuneReport,
    members: tuple[str, ...] = (),
) -> MethodFit:
    """A fit with what its held-out report says: a method's leave-one-out, or an ensemble's shot folds."""
    threshold = abstain_threshold(report.confidence, report.correct) if report.n_scored else None
    return MethodFit(
        name=name,
        hyperparams=hyperparams,
        state=state,
        loo_accuracy=report.accuracy,
        loo_nll=report.nll,
        temperature=report.temperature,
        abstain_threshold=threshold,
        n_scored=report.n_scored,
        fallback=report.fallback,
        loo_labels=report.labels,
        loo_predicted=report.predicted,
        members=members,
    )


def fit_methods(supports: TaskSupports, *, scale: float, methods: Sequence[str] = METHODS) -> dict[str, CacheMethod]:
    """Each method tuned by leave-one-out on the task's shared support (no re-encoding, no copies)."""
    tuned = {}
    for name in methods:
        started = time.monotonic()
        tuned[name] = fit_method(name, supports, scale=scale)
        log.debug("tuned %s in %.2f s: %s", name, time.monotonic() - started, tuned[name].hyperparams)
    return tuned


def task_fits(
    target: str, tuned: Mapping[str, CacheMethod], default: str
) -> tuple[str, dict[str, MethodFit], AutoSelection | None]:
    """(the method classify uses, every fit the task keeps, how `auto` chose). `auto`: what `choose` (the
    one selection rule) says, a blend of methods kept as the ENSEMBLE fit beside them; `auto` with nothing
    to choose from: `default`; else `target`, which request validation has checked is a method name (no
    selection)."""
    fits = {name: method_fit(m) for name, m in tuned.items()}
    if target != AUTO:
        return target, fits, None
    choice = choose(dict(tuned))
    if choice is None:
        return default, fits, AutoSelection("default", (), 0, 0, 0, False)
    if not choice.blended:
        return choice.members[0], fits, auto_selection(choice)
    fits[ENSEMBLE] = ensemble_fit(choice)
    return ENSEMBLE, fits, auto_selection(choice)


def auto_selection(choice: Choice) -> AutoSelection:
    plan = choice.plan
    return AutoSelection(
        rule=choice.rule,
        ranking=choice.ranking,
        folds=0 if plan is None else plan.n_folds,
        compared_classes=0 if plan is None else int(plan.classes.size),
        scored_shots=choice.scored_shots,
        retuned=plan is not None and plan.retune,
    )


def ensemble_fit(choice: Choice) -> MethodFit:
    """A blend's fit: its members and its held-out report on the shared shot folds (temperature 1: its
    members are calibrated each)."""
    if choice.report is None:
        raise ValueError("a blend of methods comes with its held-out report")
    return _reported_fit(ENSEMBLE, {}, {}, choice.report, members=choice.members)
