"""Snapshots for the store tests whose contents depend on their version, so a mix of two versions (or a
version paired with another's arrays) cannot pass for either."""

from __future__ import annotations

from typing import Any

import numpy as np

from app.store import TaskSnapshot


def make_snapshot(
    version: int = 1, tenant: str = "acme", task_id: str = "cats", rows: int = 12, incarnation: str | None = None
) -> TaskSnapshot:
    rng = np.random.default_rng(version)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "keys": rng.standard_normal((rows, 32)).astype(np.float32),
        "labels": (np.arange(rows) % 3).astype(np.int64),
        "method/tip-adapter/alpha": np.array(float(version)),
    }
    meta = {"version": version, "classes": ["a", "b", "c"], "incarnation": incarnation}
    return TaskSnapshot(tenant, task_id, version, meta, arrays, incarnation)


def assert_identical(actual: TaskSnapshot | None, expected: TaskSnapshot) -> None:
    assert actual is not None
    assert (actual.tenant, actual.task_id, actual.version, actual.incarnation) == (
        expected.tenant,
        expected.task_id,
        expected.version,
        expected.incarnation,
    )
    assert dict(actual.meta) == dict(expected.meta)
    assert list(actual.arrays) == list(expected.arrays)
    for name, array in expected.arrays.items():
        loaded = actual.arrays[name]
        assert (loaded.dtype, loaded.shape) == (array.dtype, array.shape), name
        assert loaded.tobytes() == array.tobytes(), name
