"""The task store keeps every acknowledged task and never shows a half-written one, whatever happens."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from app.store import DamagedTaskError, LocalDirStore, TaskSnapshot

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SimulatedCrash(BaseException):
    """Raised from the store's step hook: a BaseException so the store's error cleanup does not run."""


def make_snapshot(version: int = 1, tenant: str = "acme", task_id: str = "cats", rows: int = 12) -> TaskSnapshot:
    # Contents depend on the version, so a mix of two versions cannot pass for either.
    rng = np.random.default_rng(version)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "keys": rng.standard_normal((rows, 32)).astype(np.float32),
        "labels": (np.arange(rows) % 3).astype(np.int64),
        "method/tip-adapter/alpha": np.array(float(version)),
    }
    return TaskSnapshot(tenant, task_id, version, {"version": version, "classes": ["a", "b", "c"]}, arrays)


def assert_identical(actual: TaskSnapshot | None, expected: TaskSnapshot) -> None:
    assert actual is not None
    assert (actual.tenant, actual.task_id, actual.version) == (expected.tenant, expected.task_id, expected.version)
    assert dict(actual.meta) == dict(expected.meta)
    assert list(actual.arrays) == list(expected.arrays)
    for name, array in expected.arrays.items():
        loaded = actual.arrays[name]
        assert (loaded.dtype, loaded.shape) == (array.dtype, array.shape), name
        assert loaded.tobytes() == array.tobytes(), name


def task_dir_entries(root: Path, tenant: str = "acme", task_id: str = "cats") -> set[str]:
    return set(os.listdir(root / tenant / task_id))


# --- round trip, versions, delete, listing ---------------------------------------------------------


def test_round_trip_is_bit_identical_and_survives_a_restart(tmp_path: Path) -> None:
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
        "empty": np.zeros((0, 16), dtype=np.float32),
        "flags": np.array([True, False]),
        "method/tip-adapter/index": faiss.serialize_index(index),
    }
    meta = {"name": "chats ✓", "classes": ["cat", "dog"], "loo": 0.875, "hyper": {"alpha": 1, "beta": None}}
    snapshot = TaskSnapshot("acme", "cats", 1, meta, arrays)
    LocalDirStore(tmp_path).save(snapshot)

    assert_identical(LocalDirStore(tmp_path).load("acme", "cats"), snapshot)
    restored, damaged = LocalDirStore(tmp_path).load_all()
    assert damaged == []
    assert len(restored) == 1
    assert_identical(restored[0], snapshot)
    # The FAISS index comes back usable and answers exactly as before.
    reloaded = faiss.deserialize_index(restored[0].arrays["method/tip-adapter/index"])
    assert np.array_equal(reloaded.search(vectors[:5], 3)[1], index.search(vectors[:5], 3)[1])


def test_a_newer_version_replaces_the_old_and_older_ones_are_refused(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(1))
    with pytest.raises(ValueError, match="not newer"):
        store.save(make_snapshot(1))
    store.save(make_snapshot(3))
    with pytest.raises(ValueError, match="not newer"):
        store.save(make_snapshot(2))
    assert_identical(store.load("acme", "cats"), make_snapshot(3))
    assert task_dir_entries(tmp_path) == {"current.json", "v3"}  # the old version's files are gone


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
    tmp_path: Path, build: Callable[[], TaskSnapshot], problem: str
) -> None:
    store = LocalDirStore(tmp_path)
    with pytest.raises(ValueError, match=problem):
        store.save(build())
    assert os.listdir(tmp_path) == []


def test_delete_removes_the_task_and_its_id_can_be_reused(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(4))
    assert store.delete("acme", "cats") is True
    assert store.load("acme", "cats") is None
    assert store.list_ids() == []
    assert not (tmp_path / "acme" / "cats").exists()
    assert store.delete("acme", "cats") is False
    store.save(make_snapshot(1))  # a new task under the same id starts again at version 1
    assert_identical(LocalDirStore(tmp_path).load("acme", "cats"), make_snapshot(1))


def test_list_ids_and_usage_per_tenant(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    for tenant, task_id in [("beta", "t2"), ("acme", "t9"), ("acme", "t1")]:
        store.save(make_snapshot(1, tenant, task_id))
    assert store.list_ids() == [("acme", "t1"), ("acme", "t9"), ("beta", "t2")]
    assert store.list_ids("beta") == [("beta", "t2")]
    assert store.list_ids("nobody") == []
    usage = store.usage()
    assert set(usage) == {"acme", "beta"}
    assert usage["acme"]["tasks"] == 2
    assert usage["beta"]["tasks"] == 1
    on_disk = sum(p.stat().st_size for p in (tmp_path / "beta" / "t2").rglob("*") if p.is_file())
    assert usage["beta"]["bytes"] == on_disk > sum(a.nbytes for a in make_snapshot(1).arrays.values())


BAD_IDS = ["", ".", "..", "../etc", "a/b", "a\\b", "x" * 65, "a\n", "tâche", "a b", "a\x00b", ".damaged"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_tenant_and_task_ids_are_refused_everywhere(tmp_path: Path, bad: str) -> None:
    store = LocalDirStore(tmp_path / "tasks")
    for call in (
        *(lambda: store.save(make_snapshot(1, tenant=bad)), lambda: store.save(make_snapshot(1, task_id=bad))),
        *(lambda: store.load(bad, "cats"), lambda: store.load("acme", bad), lambda: store.list_ids(bad)),
        *(lambda: store.delete(bad, "cats"), lambda: store.delete("acme", bad)),
    ):
        with pytest.raises(ValueError, match=r"tenant|task id"):
            call()
    assert os.listdir(tmp_path) == ["tasks"]
    assert os.listdir(tmp_path / "tasks") == []


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "..", "a/../b", "a\\b", "a b", "x" * 201, "ключ", "a:b"])
def test_bad_array_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="array name"):
        TaskSnapshot("acme", "cats", 1, {}, {bad: np.zeros(1)})


# --- damage is reported, never raised from load_all ------------------------------------------------


def _flip_byte(version_dir: Path) -> None:
    data = bytearray((version_dir / "a0000.npy").read_bytes())
    data[-7] ^= 0x01
    (version_dir / "a0000.npy").write_bytes(bytes(data))


def _tampered_manifest(version_dir: Path) -> None:
    document = json.loads((version_dir.parent / "current.json").read_bytes())
    document["body"]["arrays"][0]["file"] = "../../../beta/t2/v1/a0000.npy"
    (version_dir.parent / "current.json").write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda version_dir: os.truncate(version_dir / "a0000.npy", 100), "bytes, the manifest says"),
        (_flip_byte, "checksum mismatch in a0000.npy"),
        (lambda version_dir: (version_dir.parent / "current.json").write_bytes(b'{"body": {"ve'), "not JSON"),
        (_tampered_manifest, "manifest checksum"),
        (lambda version_dir: (version_dir / "a0001.npy").unlink(), "missing file a0001.npy"),
    ],
)
def test_a_damaged_task_is_reported_and_set_aside_while_others_load(
    tmp_path: Path, damage: Callable[[Path], object], reason: str
) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(2, "acme", "broken"))
    store.save(make_snapshot(1, "beta", "t2"))
    damage(tmp_path / "acme" / "broken" / "v2")

    with pytest.raises(DamagedTaskError, match=reason):
        store.load("acme", "broken")
    restored, damaged = LocalDirStore(tmp_path).load_all()

    assert [(s.tenant, s.task_id) for s in restored] == [("beta", "t2")]
    assert_identical(restored[0], make_snapshot(1, "beta", "t2"))
    assert len(damaged) == 1
    assert (damaged[0].tenant, damaged[0].task_id) == ("acme", "broken")
    assert reason in damaged[0].reason
    # Kept for an operator, out of the way: the id is free and a new task can take it.
    location = Path(damaged[0].location)
    assert location.is_relative_to(tmp_path / ".damaged")
    assert (location / "v2").is_dir()
    assert store.list_ids() == [("beta", "t2")]
    store.save(make_snapshot(1, "acme", "broken"))
    assert_identical(store.load("acme", "broken"), make_snapshot(1, "acme", "broken"))


# --- crashes at every step of the write sequence ---------------------------------------------------


def crash_after(step_number: int) -> tuple[Callable[[str], None], list[str]]:
    steps: list[str] = []

    def on_step(step: str) -> None:
        steps.append(step)
        if len(steps) == step_number:
            raise SimulatedCrash(step)

    return on_step, steps


@pytest.mark.parametrize("operation", ["create", "update", "delete"])
def test_a_crash_after_any_step_leaves_the_old_or_the_new_task_intact(tmp_path: Path, operation: str) -> None:
    old = make_snapshot(1) if operation != "create" else None
    new = make_snapshot(2, rows=20) if operation != "delete" else None
    for step_number in itertools.count(1):
        root = tmp_path / str(step_number)
        if old is not None:
            LocalDirStore(root).save(old)
        on_step, steps = crash_after(step_number)
        crashing = LocalDirStore(root, on_step=on_step)
        try:
            if new is not None:
                crashing.save(new)
            else:
                crashing.delete("acme", "cats")
        except SimulatedCrash:
            pass
        else:
            break  # the operation ran to the end: every step has had its crash
        # Before the commit point the old state must survive the crash, after it the new one.
        expected = new if {"manifest_replaced", "manifest_removed"} & set(steps) else old

        restarted = LocalDirStore(root)
        restored, damaged = restarted.load_all()
        assert damaged == [], steps
        if expected is None:
            assert restored == [], steps
            assert not (root / "acme" / "cats").exists()
            continue
        assert len(restored) == 1, steps
        assert_identical(restored[0], expected)
        # Leftovers (temp dirs, unnamed versions, manifest temp files) are gone and the task takes updates.
        assert task_dir_entries(root) == {"current.json", f"v{expected.version}"}, steps
        restarted.save(make_snapshot(expected.version + 1))
        assert_identical(restarted.load("acme", "cats"), make_snapshot(expected.version + 1))
    assert step_number > (2 if operation == "delete" else 10)  # the step hook really saw every step


def test_a_failed_save_leaves_the_old_version_and_no_residue(tmp_path: Path) -> None:
    def disk_full_at_manifest(step: str) -> None:
        if step == "manifest_written":
            raise OSError(28, "No space left on device")

    store = LocalDirStore(tmp_path, on_step=disk_full_at_manifest)
    LocalDirStore(tmp_path).save(make_snapshot(1))
    with pytest.raises(OSError, match="No space"):
        store.save(make_snapshot(2))
    assert_identical(store.load("acme", "cats"), make_snapshot(1))
    assert task_dir_entries(tmp_path) == {"current.json", "v1"}


def test_restore_ignores_and_cleans_incomplete_versions_and_reports_stray_entries(tmp_path: Path) -> None:
    LocalDirStore(tmp_path).save(make_snapshot(1))
    task_dir = tmp_path / "acme" / "cats"
    (task_dir / "v2").mkdir()
    (task_dir / "v2" / "a0000.npy").write_bytes(b"\x93NUMPY half")
    (task_dir / ".tmp-v3-xyz").mkdir()
    (task_dir / "current.json.tmp").write_bytes(b'{"body": ')
    (tmp_path / "acme" / "never-committed" / "v1").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("not a tenant")
    (tmp_path / "acme" / "bad name").mkdir()

    restored, damaged = LocalDirStore(tmp_path).load_all()
    assert sorted(Path(d.location).name for d in damaged) == ["bad name", "notes.txt"]  # reported, not fatal
    assert len(restored) == 1
    assert_identical(restored[0], make_snapshot(1))
    assert task_dir_entries(tmp_path) == {"current.json", "v1"}
    assert not (tmp_path / "acme" / "never-committed").exists()


# --- concurrency -----------------------------------------------------------------------------------


def test_reads_during_updates_see_one_whole_version(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(1))
    versions_seen: list[int] = []

    def update() -> None:
        for version in range(2, 26):
            store.save(make_snapshot(version))

    writer = threading.Thread(target=update)
    writer.start()
    while writer.is_alive() or not versions_seen:
        snapshot = store.load("acme", "cats")
        assert snapshot is not None
        assert_identical(snapshot, make_snapshot(snapshot.version))
        versions_seen.append(snapshot.version)
    writer.join()
    assert versions_seen == sorted(versions_seen)  # never goes back to an older version
    assert len(set(versions_seen)) > 1


def test_saves_of_one_task_serialise_and_other_tasks_do_not_wait(tmp_path: Path) -> None:
    reached, release = threading.Event(), threading.Event()

    def hold_first_save(step: str) -> None:
        if threading.current_thread().name == "slow" and step == "temp_dir_synced":
            reached.set()
            assert release.wait(10)

    store = LocalDirStore(tmp_path, on_step=hold_first_save)
    slow = threading.Thread(target=store.save, args=(make_snapshot(1),), name="slow")
    same_task = threading.Thread(target=store.save, args=(make_snapshot(2),))
    slow.start()
    assert reached.wait(10)
    same_task.start()
    store.save(make_snapshot(1, task_id="dogs"))  # completes while "cats" is mid-save
    same_task.join(0.2)
    assert same_task.is_alive()  # waits for the lock instead of interleaving with the first save
    release.set()
    slow.join(10)
    same_task.join(10)
    assert_identical(store.load("acme", "cats"), make_snapshot(2))


# --- the real thing: SIGKILL a process that is saving ----------------------------------------------


def crash_loop_snapshot(version: int) -> TaskSnapshot:
    keys = np.full((200 + version % 97, 128), version, dtype=np.float32) + np.arange(128, dtype=np.float32)
    index = np.full(50_000 + version, version % 251, dtype=np.uint8)
    return TaskSnapshot("acme", "cats", version, {"version": version}, {"keys": keys, "method/x/index": index})


CHILD_SCRIPT = """
import sys
from pathlib import Path
import numpy as np
from app.store import LocalDirStore, TaskSnapshot
{snapshot_source}
store = LocalDirStore(Path(sys.argv[1]))
current = store.load("acme", "cats")
version = current.version if current else 0
print("ready", flush=True)
while True:
    version += 1
    store.save(crash_loop_snapshot(version))
    print(version, flush=True)
"""


def test_sigkill_during_saves_never_loses_an_acknowledged_version(tmp_path: Path) -> None:
    script = CHILD_SCRIPT.format(snapshot_source=textwrap.dedent(inspect.getsource(crash_loop_snapshot)))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    delays = random.Random(6)
    known = 0  # the newest version known to be stored: acknowledged, or restored after the previous kill
    acknowledged_saves = 0
    for _ in range(24):
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=PROJECT_ROOT,
            env=env,
        )
        assert child.stdout is not None
        if child.stdout.readline() != "ready\n":
            child.kill()
            pytest.fail(f"child did not start: {child.communicate()[1]}")
        time.sleep(delays.uniform(0.0, 0.2))
        child.send_signal(signal.SIGKILL)
        acknowledged = [int(line) for line in child.communicate(timeout=10)[0].split()]
        acknowledged_saves += len(acknowledged)
        known = max([known, *acknowledged])

        restored, damaged = LocalDirStore(tmp_path).load_all()
        assert damaged == []
        if known == 0 and not restored:
            continue
        assert len(restored) == 1
        version = restored[0].version
        assert known <= version <= known + 1  # +1: the save committed, the kill came before it printed
        assert_identical(restored[0], crash_loop_snapshot(version))
        assert task_dir_entries(tmp_path) == {"current.json", f"v{version}"}
        known = version
    assert acknowledged_saves >= 12  # the children really were saving when they were killed
