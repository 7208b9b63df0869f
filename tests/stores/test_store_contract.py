"""The TaskStore contract, run against every backend: LocalDirStore and PostgresStore (a real server);
the backends and the `backend`/`store` fixtures are in backends.py and conftest.py, the SIGKILL harness
in test_store_crashes.py.

What each backend does on its own storage (the local store's crash sequence and file layout, the
database's rows) is tested beside it: tests/app/test_store.py and tests/stores/test_postgres_store.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import pytest

from app.store import DamagedTaskError, TaskSnapshot, TaskStore, VersionConflict
from tests.stores.backends import Backend
from tests.stores.snapshots import assert_identical, make_snapshot

# --- round trip, versions, delete, listing ---------------------------------------------------------


def test_round_trip_is_bit_identical_and_survives_a_restart(backend: Backend, store: TaskStore) -> None:
    index = faiss.IndexFlatIP(8)
    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    index.add(vectors)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "keys": np.random.default_rng(1).standard_normal((300, 1280)).astype(np.float32),
        "labels": np.arange(300, dtype=np.int64),
        "groups": np.arange(300, dtype=np.int32)[::-1].copy(),
        "text_weights": np.array([[np.nan, np.inf, -0.0]], dtype=np.float16),
        "big_endian": np.arange(5, dtype=">f8"),
        "fortran_order": np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),
        "strided_view": np.arange(40, dtype=np.float32).reshape(4, 10)[:, ::3],
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 16), dtype=np.float32),
        "flags": np.array([True, False]),
        "same_bytes_as_flags": np.array([True, False]),  # identical content under two names
        "method/tip-adapter/index": faiss.serialize_index(index),
    }
    meta = {"name": "chats ✓", "classes": ["cat", "dog"], "loo": 0.875, "hyper": {"alpha": 1, "beta": None}}
    snapshot = TaskSnapshot("acme", "cats", 1, meta, arrays)
    store.save(snapshot)

    assert_identical(backend.open().load("acme", "cats"), snapshot)
    restored, damaged = backend.open().load_all()
    assert damaged == []
    assert len(restored) == 1
    assert_identical(restored[0], snapshot)
    # The FAISS index comes back usable and answers exactly as before.
    reloaded = faiss.deserialize_index(restored[0].arrays["method/tip-adapter/index"])
    assert np.array_equal(reloaded.search(vectors[:5], 3)[1], index.search(vectors[:5], 3)[1])


def test_a_newer_version_replaces_the_old_and_older_ones_are_refused(store: TaskStore) -> None:
    assert store.live_version("acme", "cats") is None
    store.save(make_snapshot(1))
    assert store.live_version("acme", "cats") == 1
    with pytest.raises(VersionConflict, match="not newer") as same:
        store.save(make_snapshot(1))
    assert same.value.live == 1
    store.save(make_snapshot(3))
    with pytest.raises(VersionConflict, match="not newer") as older:
        store.save(make_snapshot(2))
    assert older.value.live == 3
    assert store.live_version("acme", "cats") == 3
    assert_identical(store.load("acme", "cats"), make_snapshot(3))


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: TaskSnapshot("acme", "cats", 0, {}, {}), "version"),
        (lambda: TaskSnapshot("acme", "cats", True, {}, {}), "version"),
        (lambda: TaskSnapshot("acme", "cats", 1, {}, {"x": [1, 2]}), "numpy array"),  # type: ignore[dict-item]
        (lambda: TaskSnapshot("acme", "cats", 1, {}, {"x": np.array([{}], dtype=object)}), "pickles"),
        (lambda: TaskSnapshot("acme", "cats", 1, {"when": object()}, {}), "not JSON-serialisable"),
    ],
)
def test_invalid_snapshots_are_refused_and_nothing_is_stored(
    backend: Backend, store: TaskStore, build: Callable[[], TaskSnapshot], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        store.save(build())
    assert store.load("acme", "cats") is None
    assert backend.residue() == []


def test_delete_removes_the_task_and_its_id_can_be_reused(backend: Backend, store: TaskStore) -> None:
    store.save(make_snapshot(1))
    store.save(make_snapshot(4))
    assert store.delete("acme", "cats") is True
    assert store.load("acme", "cats") is None
    assert store.live_version("acme", "cats") is None
    assert store.list_ids() == []
    assert backend.residue() == []
    assert store.delete("acme", "cats") is False
    store.save(make_snapshot(1))  # a new task under the same id starts again at version 1
    assert_identical(backend.open().load("acme", "cats"), make_snapshot(1))


def test_list_ids_and_usage_per_tenant(store: TaskStore) -> None:
    for tenant, task_id in [("beta", "t2"), ("acme", "t9"), ("acme", "t1")]:
        store.save(make_snapshot(1, tenant, task_id))
    store.save(make_snapshot(2, "acme", "t1"))  # usage counts the live version only
    assert store.list_ids() == [("acme", "t1"), ("acme", "t9"), ("beta", "t2")]
    assert store.list_ids("beta") == [("beta", "t2")]
    assert store.list_ids("nobody") == []
    usage = store.usage()
    assert set(usage) == {"acme", "beta"}
    assert (usage["acme"]["tasks"], usage["beta"]["tasks"]) == (2, 1)
    one_task = sum(a.nbytes for a in make_snapshot(1).arrays.values())
    assert one_task < usage["beta"]["bytes"] < 2 * one_task + 4096
    assert 2 * one_task < usage["acme"]["bytes"] < 3 * one_task + 8192


def test_tenants_are_separate_namespaces(store: TaskStore) -> None:
    store.save(make_snapshot(1, "acme", "cats"))
    store.save(make_snapshot(1, "beta", "cats"))
    store.save(make_snapshot(5, "beta", "cats"))
    assert store.live_version("acme", "cats") == 1
    assert store.live_version("beta", "cats") == 5
    assert store.load("gamma", "cats") is None
    assert store.delete("gamma", "cats") is False
    assert store.delete("beta", "cats") is True
    assert_identical(store.load("acme", "cats"), make_snapshot(1, "acme", "cats"))


BAD_IDS = ["", ".", "..", "../etc", "a/b", "a\\b", "x" * 65, "a\n", "tâche", "a b", "a\x00b", ".damaged", "a'b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_tenant_and_task_ids_are_refused_everywhere(backend: Backend, store: TaskStore, bad: str) -> None:
    for call in (
        *(lambda: store.save(make_snapshot(1, tenant=bad)), lambda: store.save(make_snapshot(1, task_id=bad))),
        *(lambda: store.load(bad, "cats"), lambda: store.load("acme", bad), lambda: store.list_ids(bad)),
        *(lambda: store.live_version(bad, "cats"), lambda: store.live_version("acme", bad)),
        *(lambda: store.delete(bad, "cats"), lambda: store.delete("acme", bad)),
    ):
        with pytest.raises(ValueError, match=r"tenant|task id"):
            call()
    assert backend.residue() == []


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "..", "a/../b", "a\\b", "a b", "x" * 201, "ключ", "a:b"])
def test_bad_array_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="array name"):
        TaskSnapshot("acme", "cats", 1, {}, {bad: np.zeros(1)})


def test_an_update_of_a_deleted_task_is_refused_and_does_not_bring_it_back(backend: Backend, store: TaskStore) -> None:
    store.save(make_snapshot(1))
    deleter = backend.open() if backend.shared else store  # another replica, for a shared backend
    assert deleter.delete("acme", "cats") is True
    with pytest.raises(VersionConflict, match="deleted") as raised:
        store.save(make_snapshot(2))  # built from version 1 before the delete
    assert raised.value.live is None
    assert store.load("acme", "cats") is None
    assert store.list_ids() == []
    assert backend.residue() == []
    with pytest.raises(VersionConflict, match="deleted"):  # an update of a task that never existed, likewise
        store.save(TaskSnapshot("acme", "ghost", 3, {}, {}))
    store.save(make_snapshot(1))  # creating the task again is a new task
    assert store.live_version("acme", "cats") == 1


def save_at(barrier: threading.Barrier, store: TaskStore, snapshot: TaskSnapshot, outcome: list[str]) -> None:
    """Save `snapshot` once the other side of `barrier` is there too; record how it went."""
    barrier.wait(10)
    try:
        store.save(snapshot)
        outcome.append("saved")
    except VersionConflict as conflict:
        outcome.append("refused" if conflict.live is None else f"conflict with live {conflict.live}")


def test_a_save_racing_a_delete_either_lands_before_it_or_is_refused(backend: Backend, store: TaskStore) -> None:
    deleter = backend.open() if backend.shared else store
    outcomes = []
    for round_number in range(20):
        task_id = f"race{round_number}"
        store.save(make_snapshot(1, task_id=task_id))
        barrier = threading.Barrier(2)
        saved: list[str] = []

        saver = threading.Thread(target=save_at, args=(barrier, store, make_snapshot(2, task_id=task_id), saved))
        saver.start()
        barrier.wait(10)
        assert deleter.delete("acme", task_id) is True  # it existed: at version 1 or 2
        saver.join(30)
        outcomes.append(saved[0])
        # Whichever came first, the delete is the last word: the task is gone and stays gone.
        assert store.load("acme", task_id) is None
        assert deleter.live_version("acme", task_id) is None
    assert backend.residue() == []
    assert set(outcomes) <= {"saved", "refused"}


def test_an_update_built_before_a_delete_and_re_create_does_not_change_the_new_task(
    backend: Backend, store: TaskStore
) -> None:
    store.save(make_snapshot(1, incarnation="old"))
    other = backend.open() if backend.shared else store  # another replica, for a shared backend
    assert other.delete("acme", "cats") is True
    other.save(make_snapshot(1, incarnation="new"))  # the same id, another task
    with pytest.raises(VersionConflict, match="deleted and created again") as raised:
        store.save(make_snapshot(2, incarnation="old"))  # built from the old task's version 1
    assert raised.value.live is None
    assert store.live_head("acme", "cats") == (1, "new")
    assert_identical(backend.open().load("acme", "cats"), make_snapshot(1, incarnation="new"))
    with pytest.raises(VersionConflict, match="deleted and created again"):  # however far ahead it is
        store.save(make_snapshot(5, incarnation="old"))
    store.save(make_snapshot(2, incarnation="new"))  # the new task's own updates go through
    assert_identical(backend.open().load("acme", "cats"), make_snapshot(2, incarnation="new"))
    assert backend.beyond_live("acme", "cats", 2) == []


def test_tasks_without_an_incarnation_keep_working_and_refuse_another_ones_update(
    backend: Backend, store: TaskStore
) -> None:
    # A task stored before incarnations existed has none; its updates carry none.
    store.save(make_snapshot(1))
    store.save(make_snapshot(2))
    assert store.live_head("acme", "cats") == (2, None)
    assert_identical(backend.open().load("acme", "cats"), make_snapshot(2))
    with pytest.raises(VersionConflict, match="deleted and created again"):
        store.save(make_snapshot(3, incarnation="other"))
    assert store.live_version("acme", "cats") == 2


def test_a_late_update_racing_a_delete_and_re_create_never_changes_the_new_task(
    backend: Backend, store: TaskStore
) -> None:
    other = backend.open() if backend.shared else store
    outcomes = []
    for round_number in range(20):
        task_id = f"race{round_number}"
        store.save(make_snapshot(1, task_id=task_id, incarnation=f"old{round_number}"))
        barrier = threading.Barrier(2)
        saved: list[str] = []
        late = make_snapshot(2, task_id=task_id, incarnation=f"old{round_number}")
        saver = threading.Thread(target=save_at, args=(barrier, store, late, saved))
        saver.start()
        barrier.wait(10)
        assert other.delete("acme", task_id) is True  # it existed: at version 1 or 2
        new = make_snapshot(1, task_id=task_id, incarnation=f"new{round_number}")
        try:
            other.save(new)
        except VersionConflict:  # the late update recreated the id between the delete and this create
            outcomes.append("recreated by the late update")
            saver.join(30)
            continue
        saver.join(30)
        outcomes.append(saved[0])
        # Whichever came first, the new task is exactly what its creator saved.
        assert_identical(backend.open().load("acme", task_id), new)
        assert backend.beyond_live("acme", task_id, 1) == []
    assert set(outcomes) <= {"saved", "refused"}, outcomes


# --- damage is reported, never raised from load_all ------------------------------------------------

DAMAGE_REASONS = {
    "local": {
        "truncated": "bytes, the manifest says",
        "flipped": "checksum mismatch in a0000.npy",
        "missing": "missing file a0001.npy",
        "meta": "checksum mismatch in meta.json",
    },
    "postgres": {
        "truncated": "array 'keys' is 100 bytes, its row says",
        "flipped": "checksum mismatch in array 'keys'",
        "missing": "array 'labels': its blob .* is missing",
        "meta": "checksum mismatch in meta",
    },
}


@pytest.mark.parametrize("kind", ["truncated", "flipped", "missing", "meta"])
def test_a_damaged_task_is_reported_while_others_load(backend: Backend, store: TaskStore, kind: str) -> None:
    store.save(make_snapshot(1, "acme", "broken"))
    store.save(make_snapshot(2, "acme", "broken"))
    store.save(make_snapshot(1, "beta", "t2"))
    backend.damage(kind, "acme", "broken")
    reason = DAMAGE_REASONS[backend.name][kind]

    with pytest.raises(DamagedTaskError, match=reason) as raised:
        store.load("acme", "broken")
    assert (raised.value.damaged.tenant, raised.value.damaged.task_id) == ("acme", "broken")
    restored, damaged = backend.open().load_all()

    assert [(s.tenant, s.task_id) for s in restored] == [("beta", "t2")]
    assert_identical(restored[0], make_snapshot(1, "beta", "t2"))
    assert [(d.tenant, d.task_id) for d in damaged] == [("acme", "broken")]
    assert json.dumps(damaged[0].reason)  # a plain, reportable string
    assert damaged[0].location
    # Damage never blocks the id: after a delete (or the local store's quarantine) a new task takes it.
    store.delete("acme", "broken")
    store.save(make_snapshot(1, "acme", "broken"))
    assert_identical(store.load("acme", "broken"), make_snapshot(1, "acme", "broken"))


# --- concurrency -----------------------------------------------------------------------------------


def test_reads_during_updates_see_one_whole_version(backend: Backend, store: TaskStore) -> None:
    store.save(make_snapshot(1))
    reader = backend.open()  # another replica, for a shared backend
    versions_seen: list[int] = []

    def update() -> None:
        for version in range(2, 26):
            store.save(make_snapshot(version))

    writer = threading.Thread(target=update)
    writer.start()
    while writer.is_alive() or not versions_seen:
        snapshot = reader.load("acme", "cats")
        assert snapshot is not None
        assert_identical(snapshot, make_snapshot(snapshot.version))
        versions_seen.append(snapshot.version)
    writer.join()
    assert versions_seen == sorted(versions_seen)  # never goes back to an older version
    assert reader.live_version("acme", "cats") == 25


@pytest.mark.parametrize("start", [0, 1])
def test_concurrent_saves_of_one_version_one_wins_the_others_conflict(
    backend: Backend, store: TaskStore, start: int
) -> None:
    if start:
        store.save(make_snapshot(start))
    # Six writers built version start+1 from the same state: six replicas where the backend is shared,
    # six threads of the one process that owns a local directory.
    writers = [backend.open() if backend.shared else store for _ in range(6)]
    barrier = threading.Barrier(len(writers))
    outcomes: dict[int, str | int | None] = {}

    def write(number: int, writer: TaskStore) -> None:
        snapshot = make_snapshot(start + 1)
        mine = TaskSnapshot("acme", "cats", start + 1, {**snapshot.meta, "writer": number}, snapshot.arrays)
        barrier.wait(10)
        try:
            writer.save(mine)
            outcomes[number] = "won"
        except VersionConflict as conflict:
            outcomes[number] = conflict.live

    threads = [threading.Thread(target=write, args=item) for item in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [number for number, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    assert sorted(outcome for outcome in outcomes.values() if outcome != "won") == [start + 1] * (len(writers) - 1)
    loaded = backend.open().load("acme", "cats")
    assert loaded is not None
    assert (loaded.version, loaded.meta["writer"]) == (start + 1, winners[0])
