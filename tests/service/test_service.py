"""`TaskService` in process, without HTTP: its one async API end to end, its error codes, and its
behaviour under concurrency (readers listing and classifying while builds run)."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from app.errors import AppError, ErrorCode, StaleVersion
from app.service import (
    AddShotsRequest,
    BuildStatus,
    ClassifyRequest,
    CreateTaskRequest,
    Task,
    TaskRegistry,
    TaskService,
)
from app.service.persist import from_snapshot, to_snapshot
from app.store import LocalDirStore

from .conftest import Loop, cifar_images, uploads

TENANT = "t1"


def create_request(names: tuple[str, ...], per_class: int, *, skip: int = 0, **fields: Any) -> CreateTaskRequest:
    shots = cifar_images("train", names, per_class, skip=skip)
    return CreateTaskRequest(images=uploads(shots), labels=[label for _, label in shots], **fields)


def created(loop: Loop, service: TaskService, request: CreateTaskRequest, tenant: str = TENANT) -> Task:
    task = loop.run(service.create(tenant, request))
    assert isinstance(task, Task)
    return task


def code_of(call: Callable[[], object]) -> ErrorCode:
    with pytest.raises(AppError) as raised:
        call()
    return raised.value.code


def test_create_add_shots_classify_list_delete(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(("airplane", "automobile", "bird"), 3, method="auto"))
    assert (task.version, task.class_names, task.shot_counts()) == (1, ["airplane", "automobile", "bird"], [3, 3, 3])
    assert task.method in task.fits

    more = cifar_images("train", ("bird", "cat"), 2, skip=3)
    grown = loop.run(
        service.add_shots(TENANT, task.task_id, AddShotsRequest(uploads(more), [label for _, label in more]))
    )
    assert (grown.version, grown.class_names, grown.shot_counts()) == (2, [*task.class_names, "cat"], [3, 3, 5, 2])
    assert grown.shot_features[: task.shot_features.shape[0]].tobytes() == task.shot_features.tobytes()

    probes = cifar_images("test", ("cat",), 2)
    answer = loop.run(service.classify(TENANT, task.task_id, ClassifyRequest(uploads(probes), top_k=4)))
    assert answer.task.version == 2
    assert [len(p.top_k) for p in answer.predictions] == [4, 4]
    assert all({name for name, _ in p.top_k} == set(grown.class_names) for p in answer.predictions)

    listing = loop.run(service.list(TENANT))
    assert [t.task_id for t in listing.tasks] == [task.task_id]
    assert loop.run(service.list("someone-else")).tasks == []

    loop.run(service.delete(TENANT, task.task_id))
    assert code_of(lambda: loop.run(service.get(TENANT, task.task_id))) == ErrorCode.TASK_NOT_FOUND
    assert code_of(lambda: loop.run(service.delete(TENANT, task.task_id))) == ErrorCode.TASK_NOT_FOUND
    assert service.store.load(TENANT, task.task_id) is None
    assert service.registry._writers == {}  # no per-task lock outlives its writers
    for bad_id in ("x" * 65, "a/b", "ü"):  # ids come from URLs; no store call may see them
        assert code_of(lambda bad_id=bad_id: loop.run(service.get(TENANT, bad_id))) == ErrorCode.TASK_NOT_FOUND
        assert code_of(lambda bad_id=bad_id: loop.run(service.delete(TENANT, bad_id))) == ErrorCode.TASK_NOT_FOUND


def test_each_request_is_checked_once_with_its_own_code(loop: Loop, service: TaskService) -> None:
    def create_code(**fields: Any) -> ErrorCode:
        return code_of(lambda: loop.run(service.create(TENANT, create_request(("cat", "dog"), 1, **fields))))

    assert create_code(method="nope") == ErrorCode.UNKNOWN_METHOD
    assert create_code(views=33) == ErrorCode.INVALID_VIEWS
    assert create_code(templates=["no placeholder"]) == ErrorCode.INVALID_TEMPLATES
    assert create_code(hyperparams={"alpha": 1.0}) == ErrorCode.HYPERPARAMS_WITHOUT_METHOD
    assert create_code(method="tip-adapter", hyperparams={"nope": 1.0}) == ErrorCode.INVALID_HYPERPARAMS
    assert create_code(classes={"horse": ["a horse"]}) == ErrorCode.UNKNOWN_CLASS_IN_CLASSES
    assert create_code(classes={"cat": {"templates": False}}) == ErrorCode.INVALID_CLASS_PROMPTS
    assert create_code(classes=["cat"]) == ErrorCode.INVALID_CLASSES
    one_class = create_request(("cat",), 2)
    assert code_of(lambda: loop.run(service.create(TENANT, one_class))) == ErrorCode.TOO_FEW_CLASSES

    task = created(loop, service, create_request(("cat", "dog"), 2))
    probe = uploads(cifar_images("test", ("cat",), 1))

    def classify_code(**fields: Any) -> ErrorCode:
        return code_of(lambda: loop.run(service.classify(TENANT, task.task_id, ClassifyRequest(probe, **fields))))

    assert classify_code(top_k=0) == ErrorCode.INVALID_TOP_K
    assert classify_code(method="nope") == ErrorCode.UNKNOWN_METHOD
    no_images = ClassifyRequest([])
    assert code_of(lambda: loop.run(service.classify(TENANT, task.task_id, no_images))) == ErrorCode.NO_IMAGES
    redefine = AddShotsRequest(probe, ["cat"], classes={"cat": ["a cat"]})
    assert code_of(lambda: loop.run(service.add_shots(TENANT, task.task_id, redefine))) == ErrorCode.CLASS_EXISTS
    corrupt = [dataclasses.replace(probe[0], data=probe[0].data[:200])]
    request = ClassifyRequest(corrupt)
    assert code_of(lambda: loop.run(service.classify(TENANT, task.task_id, request))) == ErrorCode.CORRUPT_IMAGE
    assert service.admission.pending_images == 0  # a failed classify gave its permit back


def test_background_build_reports_progress_then_is_served(loop: Loop, service: TaskService) -> None:
    status = loop.run(service.create(TENANT, create_request(("cat", "dog"), 2, wait=False)))
    assert isinstance(status, BuildStatus)
    assert status.state == "building"
    for _ in range(600):
        current = loop.run(service.build_status(TENANT, status.task_id))
        if current is None:
            break
        assert current.state == "building", current
        threading.Event().wait(0.1)
    task = loop.run(service.get(TENANT, status.task_id))
    assert task.shot_counts() == [2, 2]
    assert service.admission.pending_builds == 0


def test_a_stale_writer_gets_version_conflict_with_the_live_version(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(("cat", "dog"), 2))
    service.registry.save(dataclasses.replace(task, version=2))
    with pytest.raises(StaleVersion) as raised:
        service.registry.save(dataclasses.replace(task, version=2))  # built from v1 too: lost the race
    assert (raised.value.code, raised.value.live) == (ErrorCode.VERSION_CONFLICT, 2)
    assert loop.run(service.get(TENANT, task.task_id)).version == 2  # reloaded from the store


def test_a_change_built_before_a_delete_answers_not_found_and_does_not_recreate_the_task(
    loop: Loop, service: TaskService
) -> None:
    task = created(loop, service, create_request(("cat", "dog"), 2))
    loop.run(service.delete(TENANT, task.task_id))  # lands while the change below was being built from v1
    with pytest.raises(AppError) as raised:
        service.registry.save(dataclasses.replace(task, version=2))
    assert raised.value.code == ErrorCode.TASK_NOT_FOUND
    assert "deleted while this change was built" in raised.value.message
    with pytest.raises(AppError) as gone:
        loop.run(service.get(TENANT, task.task_id))
    assert gone.value.code == ErrorCode.TASK_NOT_FOUND


def test_a_change_built_before_a_delete_and_re_create_does_not_change_the_new_task(
    loop: Loop, service: TaskService
) -> None:
    old = created(loop, service, create_request(("cat", "dog"), 2))
    other = created(loop, service, create_request(("cat", "dog"), 2))
    assert old.incarnation is not None
    assert other.incarnation is not None
    assert old.incarnation != other.incarnation
    more = cifar_images("train", ("cat",), 1, skip=2)
    grown = loop.run(service.add_shots(TENANT, old.task_id, AddShotsRequest(uploads(more), ["cat"])))
    assert grown.incarnation == old.incarnation  # every version of a task carries the one set at create
    loop.run(service.delete(TENANT, old.task_id))
    # The id is taken again by a new task (another incarnation) while a change of the old one was built.
    renewed = dataclasses.replace(other, task_id=old.task_id, name="new")
    service.registry.save(renewed)
    with pytest.raises(AppError) as raised:
        service.registry.save(grown)  # built from the old task's version 1, saved late
    assert raised.value.code == ErrorCode.TASK_NOT_FOUND
    live = loop.run(service.get(TENANT, old.task_id))
    assert (live.version, live.name, live.incarnation) == (1, "new", other.incarnation)


def test_freshness_check_serves_what_another_replica_wrote(loop: Loop, service: TaskService) -> None:
    task = created(loop, service, create_request(("cat", "dog"), 2))

    def replica(check_freshness: bool) -> TaskRegistry:
        store = LocalDirStore(service.settings.data_dir / "tasks")
        return TaskRegistry(store, from_snapshot, to_snapshot, model_id=task.model_id, check_freshness=check_freshness)

    fresh, stale = replica(True), replica(False)
    assert fresh.get(task.key).version == stale.get(task.key).version == 1  # both loaded on a miss
    service.registry.save(dataclasses.replace(task, version=2, name="renamed"))
    assert fresh.get(task.key).name == "renamed"  # its version moved in the store: reloaded
    assert stale.get(task.key).version == 1  # no check: the embedded store's behaviour
    loop.run(service.delete(TENANT, task.task_id))
    with pytest.raises(AppError) as raised:
        fresh.get(task.key)
    assert raised.value.code == ErrorCode.TASK_NOT_FOUND


def test_freshness_check_sees_a_task_created_again_at_the_cached_version(loop: Loop, service: TaskService) -> None:
    old = created(loop, service, create_request(("cat", "dog"), 2))
    other = created(loop, service, create_request(("cat", "dog"), 2))
    store = LocalDirStore(service.settings.data_dir / "tasks")
    fresh = TaskRegistry(store, from_snapshot, to_snapshot, model_id=old.model_id, check_freshness=True)
    assert fresh.get(old.key).incarnation == old.incarnation  # cached at version 1
    loop.run(service.delete(TENANT, old.task_id))
    service.registry.save(dataclasses.replace(other, task_id=old.task_id, name="new"))  # version 1 again
    served = fresh.get(old.key)
    assert (served.version, served.name, served.incarnation) == (1, "new", other.incarnation)


READERS = 8
BUILDERS = 4
ROUNDS = 200


def test_readers_list_and_classify_while_builds_run(loop: Loop, service: TaskService) -> None:
    """8 threads list and classify 200 rounds each while 4 threads keep creating, growing and deleting
    tasks: no exception anywhere, and every task a reader sees is one whole version."""
    stable = created(loop, service, create_request(("airplane", "automobile"), 2))
    probe = uploads(cifar_images("test", ("airplane",), 1))
    failures: list[BaseException] = []
    readers_done = threading.Event()
    builds_done = [0] * BUILDERS

    def check_whole(task: Task) -> None:
        counts = task.shot_counts()
        assert len(counts) == len(task.classes) == task.text.shape[0]
        assert sum(counts) * task.views == task.shot_features.shape[0] == task.shot_labels.shape[0] * task.views
        assert task.method in task.fits

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(ROUNDS):
                listing = loop.run(service.list(TENANT))
                for task in listing.tasks:
                    check_whole(task)
                assert all(b.state == "building" for b in listing.building)
                answer = loop.run(service.classify(TENANT, stable.task_id, ClassifyRequest(probe, top_k=2)))
                assert {name for name, _ in answer.predictions[0].top_k} == {"airplane", "automobile"}
                if listing.tasks:
                    try:
                        check_whole(loop.run(service.get(TENANT, rng.choice(listing.tasks).task_id)))
                    except AppError as exc:  # a listed task deleted before the get: the one expected error
                        if exc.code != ErrorCode.TASK_NOT_FOUND:
                            raise
        except BaseException as exc:
            failures.append(exc)

    def builder(index: int) -> None:
        classes = (("bird", "cat"), ("deer", "dog"), ("frog", "horse"), ("ship", "truck"))[index]
        try:
            while not readers_done.is_set() or builds_done[index] == 0:
                task = created(loop, service, create_request(classes, 2))
                more = cifar_images("train", classes[:1], 1, skip=2)
                request = AddShotsRequest(uploads(more), [label for _, label in more])
                assert loop.run(service.add_shots(TENANT, task.task_id, request)).version == 2
                loop.run(service.delete(TENANT, task.task_id))
                builds_done[index] += 1
        except BaseException as exc:
            failures.append(exc)

    builders = [threading.Thread(target=builder, args=(i,)) for i in range(BUILDERS)]
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(READERS)]
    for thread in builders + readers:
        thread.start()
    for thread in readers:
        thread.join(timeout=1200)
    readers_done.set()
    for thread in builders:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in builders + readers)
    assert failures == []
    assert min(builds_done) >= 1
    assert [t.task_id for t in loop.run(service.list(TENANT)).tasks] == [stable.task_id]
    assert service.registry._writers == {}
    assert (service.admission.pending_builds, service.admission.pending_images) == (0, 0)


def test_a_classify_dropped_by_the_pool_at_shutdown_fails_instead_of_hanging(loop: Loop, service: TaskService) -> None:
    """The classify stages hand over to each other off the event loop; a stage the pool drops unrun
    (shutdown with cancel_futures) must still end the request, with shutting_down."""
    import asyncio
    import time

    task = created(loop, service, create_request(("airplane", "automobile"), 2))
    release = threading.Event()
    blockers = [service._classify_pool.submit(release.wait) for _ in range(service.settings.workers)]
    probes = cifar_images("test", ("airplane",), 1)
    pending = asyncio.run_coroutine_threadsafe(
        service.classify(TENANT, task.task_id, ClassifyRequest(uploads(probes))), loop.loop
    )
    deadline = time.monotonic() + 30
    while service._classify_pool._work_queue.qsize() == 0:  # its first stage waits behind the blockers
        assert time.monotonic() < deadline, "the classify never reached the pool"
        time.sleep(0.01)
    service._classify_pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    with pytest.raises(AppError) as raised:
        pending.result(timeout=30)
    assert raised.value.code == ErrorCode.SHUTTING_DOWN
    assert all(b.result(timeout=10) for b in blockers)  # the blockers ran to their end
    assert service.queue._announced == 0  # the encoder queue does not wait for the dropped request
