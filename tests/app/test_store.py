"""The local task store keeps every acknowledged task and never shows a half-written one, whatever happens.

The contract every store keeps (round trip, versions, ids, damage, concurrency) is tested for every
backend in tests/stores/test_store_contract.py; this file holds what is the local directory's own.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from app.store import LocalDirStore
from tests.stores.snapshots import assert_identical, make_snapshot

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SimulatedCrash(BaseException):
    """Raised from the store's step hook: a BaseException so the store's error cleanup does not run."""


def task_dir_entries(root: Path, tenant: str = "acme", task_id: str = "cats") -> set[str]:
    return set(os.listdir(root / tenant / task_id))


# --- the local layout (the contract every store keeps is in tests/stores/test_store_contract.py) ----


def test_only_the_live_version_stays_on_disk(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(1))
    store.save(make_snapshot(3))
    with pytest.raises(ValueError, match="not newer"):
        store.save(make_snapshot(2))
    assert task_dir_entries(tmp_path) == {"current.json", "v3"}  # the old version's files are gone
    assert store.delete("acme", "cats") is True
    assert not (tmp_path / "acme" / "cats").exists()


def test_a_manifest_written_before_incarnations_loads_and_its_task_updates(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(1, incarnation="abc"))
    manifest = tmp_path / "acme" / "cats" / "current.json"
    body = json.loads(manifest.read_bytes())["body"]
    assert body["incarnation"] == "abc"
    # The same manifest as a shotcache before incarnations wrote it: no such field (its checksum recomputed).
    del body["incarnation"]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    document = {"body": body, "sha256": hashlib.sha256(canonical).hexdigest()}
    manifest.write_bytes(json.dumps(document).encode())
    loaded = LocalDirStore(tmp_path).load("acme", "cats")
    assert loaded is not None
    assert loaded.incarnation is None
    store.save(make_snapshot(2))  # an update of it carries none, as before
    assert_identical(store.load("acme", "cats"), make_snapshot(2))


def test_usage_counts_the_bytes_on_disk(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(1, "beta", "t2"))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "beta" / "t2").rglob("*") if p.is_file())
    assert store.usage()["beta"]["bytes"] == on_disk > sum(a.nbytes for a in make_snapshot(1).arrays.values())


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
        (_flip_byte, "checksum mismatch in a0000.npy"),
        (lambda version_dir: (version_dir.parent / "current.json").write_bytes(b'{"body": {"ve'), "not JSON"),
        (_tampered_manifest, "manifest checksum"),
    ],
)
def test_a_damaged_task_is_moved_aside_and_its_id_freed(
    tmp_path: Path, damage: Callable[[Path], object], reason: str
) -> None:
    store = LocalDirStore(tmp_path)
    store.save(make_snapshot(1, "acme", "broken"))
    store.save(make_snapshot(2, "acme", "broken"))
    store.save(make_snapshot(1, "beta", "t2"))
    damage(tmp_path / "acme" / "broken" / "v2")

    restored, damaged = LocalDirStore(tmp_path).load_all()

    assert [(s.tenant, s.task_id) for s in restored] == [("beta", "t2")]
    assert len(damaged) == 1
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
    new = make_snapshot(1 if old is None else 2, rows=20) if operation != "delete" else None
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
