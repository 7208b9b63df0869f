"""A loaded task fits only the method it serves; another method is fitted on its first use, gives the same
logits as the build's fit, and counts against the registry's memory budget from then on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from app.encoder import ClassPrompts
from app.fewshot import TaskSupports, make_supports
from app.service import Task, TaskRegistry
from app.service.build import fit_methods, method_fit
from app.service.persist import from_snapshot, to_snapshot
from app.service.task import unique_nbytes
from app.store import LocalDirStore
from cache_models import METHODS, CacheMethod

CLASSES, SHOTS, DIM = 6, 4, 48
SERVED = "tip-adapter"


def unit(rng: np.random.Generator, rows: int) -> np.ndarray:
    x = rng.standard_normal((rows, DIM)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def shots(seed: int) -> TaskSupports:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES, dtype=np.int64), SHOTS)
    return make_supports(unit(rng, CLASSES * SHOTS), labels, unit(rng, CLASSES), 1)


def built(task_id: str, supports: TaskSupports, tuned: dict[str, CacheMethod]) -> Task:
    task = Task(
        tenant="t",
        task_id=task_id,
        name=None,
        version=1,
        created_at=0.0,
        updated_at=0.0,
        model_id="m",
        backend="b",
        views=1,
        templates=("a photo of a {}.",),
        classes=tuple(ClassPrompts(f"class {i}") for i in range(CLASSES)),
        supports=supports,
        shot_seeds=np.zeros(CLASSES * SHOTS, np.int64),
        fits={name: method_fit(method) for name, method in tuned.items()},
        method=SERVED,
        method_requested=SERVED,
    )
    task.fitted.keep(tuned[SERVED])
    return task


@pytest.fixture(scope="module")
def tuned() -> tuple[TaskSupports, dict[str, CacheMethod]]:
    supports = shots(0)
    return supports, fit_methods(supports, scale=100.0)


def registry(root: Path, budget: int | None = None) -> TaskRegistry:
    return TaskRegistry(LocalDirStore(root), from_snapshot, to_snapshot, model_id="m", budget_bytes=budget)


def test_only_the_served_method_is_fitted_until_another_is_used(
    tmp_path: Path, tuned: tuple[TaskSupports, dict[str, CacheMethod]]
) -> None:
    supports, methods = tuned
    registry(tmp_path).save(built("a", supports, methods))
    loaded = registry(tmp_path)
    task = loaded.get(("t", "a"))
    assert task.fitted.names == (SERVED,)
    assert loaded.cached_bytes == task.nbytes
    queries = unit(np.random.default_rng(1), 5)
    for name in METHODS:
        before = task.nbytes
        logits = task.model(name).predict(queries)
        # fitted again from the stored state: the build's tuned fit, to float32 round-off
        np.testing.assert_allclose(logits, methods[name].predict(queries), rtol=1e-5, atol=1e-4)
        assert name in task.fitted.names
        stored = [id(a) for a in task.fits[name].state.values()]  # counted since the load
        new = [a for a in task.model(name).held_arrays() if id(a) not in stored]
        assert task.nbytes - before == (0 if name == SERVED else unique_nbytes(new))
        assert loaded.cached_bytes == task.nbytes  # the registry counted the fit
    assert task.fitted.names == (SERVED, *[m for m in METHODS if m != SERVED])
    assert dataclasses.replace(task, version=2).fitted.names == ()  # a new version fits its own


def test_a_derived_array_counts_in_the_task_size(tuned: tuple[TaskSupports, dict[str, CacheMethod]]) -> None:
    supports, methods = tuned
    task = built("a", supports, methods)
    before = task.nbytes
    ape = task.model("ape")
    channels = ape.channels.size
    # APE's channel keys [M, n_channels] float32 are its own array, not the support's
    assert task.nbytes - before >= CLASSES * SHOTS * channels * 4
    for name in METHODS:
        for array in task.model(name).held_arrays():
            assert not np.may_share_memory(array, supports.per_shot.keys)


def test_a_method_fitted_late_can_evict_other_tasks(
    tmp_path: Path, tuned: tuple[TaskSupports, dict[str, CacheMethod]]
) -> None:
    supports, methods = tuned
    writer = registry(tmp_path)
    writer.save(built("a", supports, methods))
    other = shots(2)
    writer.save(built("b", other, fit_methods(other, scale=100.0)))
    probe = registry(tmp_path)
    served_only = probe.get(("t", "a")).nbytes + probe.get(("t", "b")).nbytes
    # room for both tasks as loaded, and not a byte more
    bounded = registry(tmp_path, budget=served_only)
    a, b = bounded.get(("t", "a")), bounded.get(("t", "b"))
    assert len(bounded) == 2
    assert bounded.cached_bytes == a.nbytes + b.nbytes
    b.model("gda")  # the first use of another method makes b bigger: a is evicted (reloaded on its next get)
    assert len(bounded) == 1
    assert bounded.cached(("t", "b")) is b
    assert bounded.cached(("t", "a")) is None
    assert bounded.cached_bytes == b.nbytes
