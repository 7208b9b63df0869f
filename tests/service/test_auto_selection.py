"""Why `method=auto` chose: the ranking `choose` made is kept with the task (`Task.selection`), stored and
restored with it, re-made when shots are added, and absent for a task built with a named method."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from app.service import AddShotsRequest, TaskService
from app.service.persist import from_snapshot, to_snapshot
from app.service.task import ENSEMBLE
from cache_models import METHODS
from cache_models.selection import BLEND_FROM_SHOTS

from .conftest import Loop, cifar_images, uploads
from .test_service import TENANT, create_request, created

NAMES = ("airplane", "bird", "cat")


def test_auto_keeps_its_ranking_through_a_restore_and_re_ranks_on_new_shots(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS, method="auto"))
    selection = task.selection
    assert selection is not None
    assert (task.method, selection.rule) == (ENSEMBLE, "blend")
    ranked = [r.method for r in selection.ranking]
    assert sorted(ranked) == sorted(set(METHODS) - {"zero-shot"})
    assert tuple(ranked[:2]) == task.members()
    nlls = [r.nll for r in selection.ranking]
    assert nlls == sorted(nlls)
    assert all(0.0 <= r.accuracy <= 1.0 for r in selection.ranking)
    assert (selection.folds, selection.compared_classes, selection.scored_shots) == (
        BLEND_FROM_SHOTS,
        len(NAMES),
        len(NAMES) * BLEND_FROM_SHOTS,
    )
    assert from_snapshot(to_snapshot(task)).selection == selection
    more = cifar_images("train", NAMES[:1], 1, skip=BLEND_FROM_SHOTS)
    grown = loop.run(service.add_shots(TENANT, task.task_id, AddShotsRequest(uploads(more), [NAMES[0]])))
    assert grown.selection is not None
    assert grown.selection.scored_shots == selection.scored_shots + 1  # ranked again, on the new shots too


def test_two_shots_rank_and_keep_the_best_alone(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS - 1, method="auto"))
    assert task.selection is not None
    assert task.selection.rule == "best"
    assert task.selection.ranking[0].method == task.method


def test_a_named_method_has_no_selection_and_stores_none(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, 2, method="ape"))
    assert task.selection is None
    snapshot = to_snapshot(task)
    assert "selection" not in snapshot.meta
    assert from_snapshot(snapshot).selection is None


@pytest.mark.parametrize(
    "damage",
    [
        {"rule": "nonsense"},
        {"ranking": [{"method": "ape"}]},
        {"folds": "four"},
        None,
    ],
)
def test_an_unreadable_stored_ranking_is_dropped_not_the_task(
    loop: Loop, service: TaskService, caplog: pytest.LogCaptureFixture, damage: dict[str, object] | None
) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS, method="auto"))
    snapshot = to_snapshot(task)
    stored = snapshot.meta["selection"]
    broken = "not a mapping" if damage is None else {**stored, **damage}
    with caplog.at_level(logging.WARNING, logger="app.service.persist"):
        loaded = from_snapshot(dataclasses.replace(snapshot, meta={**snapshot.meta, "selection": broken}))
    assert loaded.selection is None
    assert "unreadable" in caplog.text
    assert (loaded.method, loaded.members()) == (task.method, task.members())
    shots = task.shot_features[:: task.views][:4]
    np.testing.assert_array_equal(
        [p.label for p in loaded.classify(shots, method=None, top_k=1, abstain=False)],
        [p.label for p in task.classify(shots, method=None, top_k=1, abstain=False)],
    )
