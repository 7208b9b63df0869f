"""The ensemble `method=auto` serves from BLEND_FROM_SHOTS shots per class (cache_models.selection.choose): built,
stored, loaded and classified as one task whose answer is the mean of its members' calibrated answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from app.service import ClassifyRequest, Task, TaskService
from app.service.persist import from_snapshot, to_snapshot
from app.service.task import ENSEMBLE
from cache_models.selection import BLEND_FROM_SHOTS

from .conftest import Loop, cifar_images, uploads
from .test_service import TENANT, create_request, created

NAMES = ("airplane", "bird", "cat")


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
    methods = dict(snapshot.meta["methods"])
    methods[ENSEMBLE] = {**methods[ENSEMBLE], "members": ["tip-adapter", "nonsense"]}
    with pytest.raises(ValueError, match="are not methods of the task"):
        from_snapshot(dataclasses.replace(snapshot, meta={**snapshot.meta, "methods": methods}))
    methods[ENSEMBLE] = {**methods[ENSEMBLE], "members": [ENSEMBLE, "ape"]}
    with pytest.raises(ValueError, match="are not methods of the task"):
        from_snapshot(dataclasses.replace(snapshot, meta={**snapshot.meta, "methods": methods}))


def test_below_the_blend_shots_auto_serves_one_method(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS - 1, method="auto"))
    assert task.method != ENSEMBLE
    assert ENSEMBLE not in task.fits
    assert task.members() == (task.method,)
