"""Updating a built task without new shots (TaskService.update): another method, chosen again from the stored
shots, and/or another name; the version goes up, nothing is re-encoded, and the change is stored."""

from __future__ import annotations

import numpy as np
import pytest

from app.errors import AppError, ErrorCode
from app.service import ClassifyRequest, TaskService, UpdateTaskRequest
from app.service.task import ENSEMBLE
from cache_models.selection import BLEND_FROM_SHOTS

from .conftest import Loop, cifar_images, uploads
from .test_service import TENANT, code_of, create_request, created

NAMES = ("airplane", "bird", "cat")


def test_a_named_task_switched_to_auto_ranks_its_stored_shots(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS, method="ape", name="birds"))
    assert (task.method, task.selection) == ("ape", None)
    updated = loop.run(service.update(TENANT, task.task_id, UpdateTaskRequest(method="auto")))
    assert (updated.version, updated.method_requested, updated.method) == (task.version + 1, "auto", ENSEMBLE)
    assert updated.selection is not None
    assert updated.selection.rule == "blend"
    assert updated.name == "birds"
    assert updated.created_at == task.created_at
    np.testing.assert_array_equal(updated.shot_features, task.shot_features)  # not re-encoded
    np.testing.assert_array_equal(updated.thumbnail_data, task.thumbnail_data)
    # what a fresh auto task on the same shots chooses: the same rule on the same features
    fresh = created(loop, service, create_request(NAMES, BLEND_FROM_SHOTS, method="auto"))
    assert updated.members() == fresh.members()
    assert updated.selection == fresh.selection
    # stored: what a restart serves
    service.registry.evict(task.key)
    stored = loop.run(service.get(TENANT, task.task_id))
    assert (stored.version, stored.method, stored.selection) == (updated.version, ENSEMBLE, updated.selection)
    answer = loop.run(service.classify(TENANT, task.task_id, ClassifyRequest(uploads(cifar_images("test", NAMES, 1)))))
    assert {p.method for p in answer.predictions} == {ENSEMBLE}

    back = loop.run(service.update(TENANT, task.task_id, UpdateTaskRequest(method="gda")))
    assert (back.version, back.method, back.method_requested, back.selection) == (task.version + 2, "gda", "gda", None)
    assert ENSEMBLE not in back.fits


def test_a_rename_keeps_the_fits_and_what_is_fitted(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(NAMES, 2, method="auto", name="old"))
    renamed = loop.run(service.update(TENANT, task.task_id, UpdateTaskRequest(name="new", rename=True)))
    assert (renamed.name, renamed.version, renamed.method, renamed.method_requested) == (
        "new",
        task.version + 1,
        task.method,
        "auto",
    )
    assert renamed.fits == task.fits
    assert renamed.selection == task.selection
    assert renamed.is_fitted()  # the first classify after a rename fits nothing
    cleared = loop.run(service.update(TENANT, task.task_id, UpdateTaskRequest(name=None, rename=True)))
    assert cleared.name is None
    assert loop.run(service.get(TENANT, task.task_id)).name is None


@pytest.mark.parametrize(
    ("request_", "code", "mentions"),
    [
        (UpdateTaskRequest(), ErrorCode.INVALID_REQUEST, "nothing to change"),
        (UpdateTaskRequest(method="magic"), ErrorCode.UNKNOWN_METHOD, "magic"),
        (UpdateTaskRequest(name="x" * 1000, rename=True), ErrorCode.NAME_TOO_LONG, "name"),
    ],
)
def test_a_bad_update_changes_nothing(
    loop: Loop, service: TaskService, request_: UpdateTaskRequest, code: ErrorCode, mentions: str
) -> None:
    task = created(loop, service, create_request(NAMES, 2, method="ape", name="kept"))
    with pytest.raises(AppError) as raised:
        loop.run(service.update(TENANT, task.task_id, request_))
    assert raised.value.code == code
    assert mentions in str(raised.value)
    live = loop.run(service.get(TENANT, task.task_id))
    assert (live.version, live.method, live.name) == (task.version, "ape", "kept")


def test_updating_a_missing_task_is_not_found(loop: Loop, service: TaskService) -> None:
    assert code_of(lambda: loop.run(service.update(TENANT, "nope", UpdateTaskRequest(method="ape")))) == (
        ErrorCode.TASK_NOT_FOUND
    )
