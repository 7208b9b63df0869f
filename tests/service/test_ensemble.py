"""The ensemble `method=auto` serves from BLEND_FROM_SHOTS shots per class (cache_models.selection.choose): built,
stored, loaded and classified as one task whose answer is the mean of its members' calibrated answers."""

from __future__ import annotations

import dataclasses
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest

from app.service import ClassifyRequest, Task, TaskService
from app.service.persist import from_snapshot, to_snapshot
from app.service.task import ENSEMBLE
from app.store import TaskSnapshot
from cache_models.selection import BLEND_FROM_SHOTS

from .conftest import Loop, cifar_images, uploads
from .test_service import TENANT, create_request, created

NAMES = ("airplane", "bird", "cat")
PRE_ENSEMBLE = "bb47b2c"  # the last commit whose persist.py predates the ensemble


def _probabilities(task: Task, features: np.ndarray, method: str | None = None) -> np.ndarray:
    predictions = task.classify(features, method=method, top_k=len(NAMES), abstain=False)
    return np.array([[dict(p.top_k)[name] for name in NAMES] for p in predictions])


def test_an_ensemble_task_is_stored_loaded_and_answers_as_its_members_mean(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS, method="auto"))
    assert task.method == ENSEMBLE
    members = task.members()
    assert len(members) == 2
    assert set(members) < set(task.fits) - {ENSEMBLE, "zero-shot"}
    assert task.is_fitted()  # both members are fitted at build: the first classify fits nothing
    fit = task.fits[ENSEMBLE]
    assert (fit.n_scored, fit.loo_labels.size) == (len(NAMES) * BLEND_FROM_SHOTS, len(NAMES) * BLEND_FROM_SHOTS)
    assert fit.abstain_threshold is not None  # from the blend's own held-out confidences
    assert set(task.hyperparams()) == {f"{m}.{k}" for m in members for k in task.fits[m].hyperparams}

    # Ambiguous rows (two shots of different classes mixed), where the members' answers differ.
    shots = task.shot_features[:: task.views]
    labels = task.shot_labels
    mixed = shots[labels == 0][:3] + shots[labels == 1][:3]
    features = (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)
    probs = _probabilities(task, features)
    mean = (_probabilities(task, features, members[0]) + _probabilities(task, features, members[1])) / 2
    np.testing.assert_allclose(probs, mean, atol=1e-6)
    assert not np.allclose(_probabilities(task, features, members[0]), probs, atol=1e-3)

    loaded = from_snapshot(to_snapshot(task))
    assert (loaded.method, loaded.members()) == (ENSEMBLE, members)
    assert loaded.is_fitted()  # a restore fits the ensemble's members, as it fits a task's one method
    np.testing.assert_allclose(_probabilities(loaded, features), probs, atol=1e-6)
    assert loaded.fits[ENSEMBLE].summary() == fit.summary()

    answer = loop.run(service.classify(TENANT, task.task_id, ClassifyRequest(uploads(cifar_images("test", NAMES, 1)))))
    assert {p.method for p in answer.predictions} == {ENSEMBLE}


def test_a_stored_ensemble_whose_members_are_missing_does_not_load(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS, method="auto"))
    snapshot = to_snapshot(task)
    first = task.members()[0]

    def with_members(members: list[str]) -> TaskSnapshot:
        meta = {**snapshot.meta, "ensemble": {**snapshot.meta["ensemble"], "members": members}}
        return dataclasses.replace(snapshot, meta=meta)

    for bad in ([first, "nonsense"], [first, ENSEMBLE], [first], [first, first], [task.members()[1], first]):
        with pytest.raises(ValueError, match="are not methods of the task"):
            from_snapshot(with_members(bad))


def test_the_stored_ensemble_is_readable_as_its_best_method_by_a_reader_that_predates_it(
    loop: Loop, service: TaskService
) -> None:
    """A rolling upgrade on a shared store: a replica still running the code from before the ensemble
    (persist.py as of PRE_ENSEMBLE, loaded from git) reads a task stored by this one and serves the
    ensemble's first member; `meta["methods"]` holds only methods that code knows."""
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS, method="auto"))
    snapshot = to_snapshot(task)
    assert set(snapshot.meta["methods"]) == set(task.fits) - {ENSEMBLE}
    assert snapshot.meta["method"] == task.members()[0]
    root = Path(__file__).resolve().parents[2]
    try:
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{PRE_ENSEMBLE}:app/service/persist.py"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"this checkout has no git history with {PRE_ENSEMBLE}")
    assert "ensemble" not in source.lower()  # really the code from before the ensemble
    module = types.ModuleType("app.service._persist_before_ensemble")
    module.__package__ = "app.service"
    exec(compile(source, "persist.py@" + PRE_ENSEMBLE, "exec"), module.__dict__)
    old = module.from_snapshot(snapshot)
    assert (old.method, set(old.fits)) == (task.members()[0], set(task.fits) - {ENSEMBLE})
    shots = task.shot_features[:: task.views][:4]
    np.testing.assert_allclose(_probabilities(old, shots), _probabilities(task, shots, task.members()[0]), atol=1e-6)


def test_below_the_blend_shots_auto_serves_one_method(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS - 1, method="auto"))
    assert task.method != ENSEMBLE
    assert ENSEMBLE not in task.fits
    assert task.members() == (task.method,)
