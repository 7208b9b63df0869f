"""The embedded task store: one directory per task on the local file system, crash-safe by ordering.

Layout under `root` (`<data_dir>/tasks`)::

    <tenant>/<task_id>/current.json        manifest: names the live version and the task's incarnation,
                                           size + SHA-256 of every file
    <tenant>/<task_id>/v<version>/meta.json    the snapshot's meta, JSON
    <tenant>/<task_id>/v<version>/a0000.npy    one .npy per array (numbered; names live in the manifest)
    <tenant>/<task_id>/.tmp-v<version>-*/      a version being written (never visible)
    .damaged/<tenant>/<task_id>-<utc time>/    tasks that failed verification, kept for an operator

Save, in this order, each step durable before the next starts:
    1. write every array and meta.json into a fresh temp dir, fsync each file, fsync the temp dir;
    2. rename the temp dir to `v<version>`, fsync the task dir;
    3. write `current.json.tmp`, fsync it, rename it over `current.json`, fsync the task dir;
    4. remove older version dirs and other leftovers (best-effort).
The rename in step 3 is the commit point: before it the old manifest names the old, complete version;
after it the new manifest names a version whose files are already on disk. A SIGKILL at any instant
therefore leaves either the old or the new version live, never a mix; `save` returns only after step 3.

Delete unlinks `current.json` and fsyncs the task dir (the commit point), then removes the rest.

Restore (`load_all`): only what a manifest names is visible. Every file is checked against the size and
SHA-256 recorded in the manifest, and the array's dtype and shape against the manifest too. Anything
else in a task dir (temp dirs, versions no manifest names, a stray `current.json.tmp`) is the residue
of an unacknowledged save or an interrupted delete and is removed; a task dir without a manifest is
removed whole. A task whose manifest or files fail verification is moved to `.damaged/` and reported.

The compare-and-set (`base.refusal`) is decided under the task's lock from the live manifest: a
version not above the live one, an update of a task without a manifest, or an update built from another
incarnation of the task (deleted and created again meanwhile) is refused before anything is written.

Concurrency: a per-task lock serialises saves and deletes of the same task; different tasks save in
parallel. Reads take no lock: they read one manifest (replaced atomically) and the files it names, and if
a concurrent save removed those files mid-read they retry with the new manifest. The locks are
in-process: one process owns a data dir; many replicas need a shared backend behind `TaskStore`.

No pickles anywhere: arrays are written and read with `allow_pickle=False`, meta is JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.store.base import (
    DamagedTask,
    DamagedTaskError,
    TaskSnapshot,
    TaskStore,
    check_id,
    encode_meta,
    refusal,
)
from app.store.durable_files import (
    file_sha256,
    fsync_dir,
    make_dirs_durably,
    remove_quietly,
    sha256_hex,
    write_array_durably,
    write_bytes_durably,
)
from app.store.manifest import (
    META_FILE,
    ArrayEntry,
    FileEntry,
    Manifest,
    ManifestError,
    array_file_name,
    version_dir_name,
)

logger = logging.getLogger(__name__)

CURRENT = "current.json"
CURRENT_TMP = "current.json.tmp"
DAMAGED_DIR = ".damaged"
TEMP_PREFIX = ".tmp-"
# A read races a save at most once per save that commits during it; a few retries cover any real load.
_READ_ATTEMPTS = 5

StepHook = Callable[[str], None]


class _DamageError(Exception):
    """A task's manifest or files failed verification (internal: load raises DamagedTaskError)."""


class LocalDirStore(TaskStore):
    """Tasks as directories under `root`; see the module docstring for the durability argument.

    `on_step` is a test seam: it is called with a step name after every durability step of save, delete
    and cleanup, so tests can simulate a crash at each one by raising a BaseException from it.
    """

    def __init__(self, root: Path, *, on_step: StepHook | None = None) -> None:
        self.root = Path(root)
        self._on_step: StepHook = on_step if on_step is not None else _no_step
        self._locks_guard = threading.Lock()
        self._task_locks: dict[tuple[str, str], threading.Lock] = {}
        make_dirs_durably(self.root)

    # --- TaskStore --------------------------------------------------------------------------------

    def save(self, snapshot: TaskSnapshot) -> None:
        meta_bytes = encode_meta(snapshot)
        task_dir = self._task_dir(snapshot.tenant, snapshot.task_id)
        with self._task_lock(snapshot.tenant, snapshot.task_id):
            head = self._stored_head(task_dir)
            refused = refusal(snapshot, head)
            if refused is not None:
                raise refused
            if head is None:
                # Fsync both parents even if another thread created them: its fsync may still be pending,
                # and this save must not return before the path to the new task is durable.
                task_dir.mkdir(parents=True, exist_ok=True)
                fsync_dir(task_dir.parent)
                fsync_dir(self.root)
            version_dir = task_dir / version_dir_name(snapshot.version)
            temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}v{snapshot.version}-", dir=task_dir))
            self._on_step("temp_dir_created")
            try:
                manifest = self._write_version_files(temp_dir, snapshot, meta_bytes)
                fsync_dir(temp_dir)
                self._on_step("temp_dir_synced")
                if version_dir.exists():  # residue of an earlier save of this version that never committed
                    remove_quietly(version_dir)
                os.rename(temp_dir, version_dir)
                self._on_step("version_dir_renamed")
                fsync_dir(task_dir)
                self._on_step("version_dir_synced")
                (task_dir / CURRENT_TMP).unlink(missing_ok=True)
                write_bytes_durably(task_dir / CURRENT_TMP, manifest.to_bytes())
                self._on_step("manifest_written")
                os.replace(task_dir / CURRENT_TMP, task_dir / CURRENT)
            except Exception:
                # Nothing is committed yet (os.replace is atomic: it happened or it did not).
                for leftover in (temp_dir, version_dir, task_dir / CURRENT_TMP):
                    remove_quietly(leftover)
                raise
            self._on_step("manifest_replaced")
            fsync_dir(task_dir)
            self._on_step("committed")
            self._remove_leftovers(task_dir, keep=version_dir.name)

    def load(self, tenant: str, task_id: str) -> TaskSnapshot | None:
        task_dir = self._task_dir(tenant, task_id)
        try:
            return self._read_task(task_dir, tenant, task_id)
        except _DamageError as damage:
            raise DamagedTaskError(DamagedTask(tenant, task_id, str(task_dir), str(damage))) from None

    def live_version(self, tenant: str, task_id: str) -> int | None:
        # One small file read; an unreadable manifest reads as "no live version" here and is reported
        # as damage by `load`.
        head = self._stored_head(self._task_dir(tenant, task_id))
        return None if head is None else head[0]

    def live_head(self, tenant: str, task_id: str) -> tuple[int, str | None] | None:
        return self._stored_head(self._task_dir(tenant, task_id))

    def delete(self, tenant: str, task_id: str) -> bool:
        task_dir = self._task_dir(tenant, task_id)
        with self._task_lock(tenant, task_id):
            try:
                (task_dir / CURRENT).unlink()
            except FileNotFoundError:
                existed = False
            else:
                existed = True
                self._on_step("manifest_removed")
                fsync_dir(task_dir)
                self._on_step("delete_committed")
            if task_dir.exists():
                remove_quietly(task_dir)  # best-effort: a task dir without a manifest is removed at restore
            return existed

    def list_ids(self, tenant: str | None = None) -> list[tuple[str, str]]:
        tenants = [check_id(tenant, "tenant")] if tenant is not None else self._tenant_names()
        ids: list[tuple[str, str]] = []
        for tenant_name in tenants:
            for task_dir in _sorted_entries(self.root / tenant_name):
                if _is_valid_id(task_dir.name) and (task_dir / CURRENT).is_file():
                    ids.append((tenant_name, task_dir.name))
        return sorted(ids)

    def load_all(self) -> tuple[list[TaskSnapshot], list[DamagedTask]]:
        snapshots: list[TaskSnapshot] = []
        damaged: list[DamagedTask] = []
        for tenant_dir in _sorted_entries(self.root):
            if tenant_dir.name.startswith("."):  # the store's own `.damaged`, or an operator's hidden file
                continue
            if not (_is_valid_id(tenant_dir.name) and tenant_dir.is_dir()):
                damaged.append(DamagedTask(None, None, str(tenant_dir), "unexpected entry in the task store"))
                continue
            for task_dir in _sorted_entries(tenant_dir):
                if task_dir.name.startswith("."):
                    continue
                if not (_is_valid_id(task_dir.name) and task_dir.is_dir()):
                    damaged.append(DamagedTask(tenant_dir.name, None, str(task_dir), "unexpected entry"))
                    continue
                self._restore_task(tenant_dir.name, task_dir.name, snapshots, damaged)
        return snapshots, damaged

    def usage(self) -> dict[str, dict[str, int]]:
        usage: dict[str, dict[str, int]] = {}
        for tenant, task_id in self.list_ids():
            tenant_usage = usage.setdefault(tenant, {"tasks": 0, "bytes": 0})
            tenant_usage["tasks"] += 1
            tenant_usage["bytes"] += _bytes_on_disk(self.root / tenant / task_id)
        return usage

    # --- writing ----------------------------------------------------------------------------------

    def _write_version_files(self, version_dir: Path, snapshot: TaskSnapshot, meta_bytes: bytes) -> Manifest:
        array_entries: list[ArrayEntry] = []
        for index, (name, array) in enumerate(snapshot.arrays.items()):
            file_name = array_file_name(index)
            try:
                size, digest = write_array_durably(version_dir / file_name, array)
            except ValueError as error:  # e.g. a dtype .npy cannot hold without pickles
                raise ValueError(f"array {name!r} cannot be stored: {error}") from None
            array_entries.append(ArrayEntry(name, array.dtype.str, array.shape, FileEntry(file_name, size, digest)))
            self._on_step(f"array_written:{name}")
        size, digest = write_bytes_durably(version_dir / META_FILE, meta_bytes)
        self._on_step("meta_written")
        meta_entry = FileEntry(META_FILE, size, digest)
        return Manifest(
            snapshot.tenant, snapshot.task_id, snapshot.version, meta_entry, tuple(array_entries), snapshot.incarnation
        )

    def _remove_leftovers(self, task_dir: Path, keep: str) -> None:
        for entry in _sorted_entries(task_dir):
            if entry.name not in (CURRENT, keep):
                remove_quietly(entry)
                self._on_step(f"leftover_removed:{entry.name}")

    # --- reading ----------------------------------------------------------------------------------

    def _read_task(self, task_dir: Path, tenant: str, task_id: str) -> TaskSnapshot | None:
        """The version the manifest names, verified; None without a manifest; _DamageError if it fails."""
        for _ in range(_READ_ATTEMPTS):
            manifest_bytes = _read_manifest_bytes(task_dir)
            if manifest_bytes is None:
                return None
            try:
                manifest = Manifest.from_bytes(manifest_bytes, tenant, task_id)
            except ManifestError as error:
                raise _DamageError(str(error)) from None
            try:
                return _read_version(task_dir / manifest.version_dir, manifest)
            except _DamageError:
                # A save may have committed and removed this version while we read it: retry with the
                # new manifest. Only damage under an unchanged manifest is real damage.
                if _read_manifest_bytes(task_dir) == manifest_bytes:
                    raise
        raise _DamageError(f"manifest kept changing during {_READ_ATTEMPTS} read attempts")

    def _restore_task(
        self, tenant: str, task_id: str, snapshots: list[TaskSnapshot], damaged: list[DamagedTask]
    ) -> None:
        task_dir = self.root / tenant / task_id
        with self._task_lock(tenant, task_id):
            try:
                snapshot = self._read_task(task_dir, tenant, task_id)
            except Exception as error:  # broad on purpose: one bad task must never stop the restore of the rest
                reason = str(error) if isinstance(error, _DamageError) else f"{type(error).__name__}: {error}"
                location = self._quarantine(task_dir, tenant, task_id)
                logger.warning("task %s/%s is damaged (%s); kept at %s", tenant, task_id, reason, location)
                damaged.append(DamagedTask(tenant, task_id, str(location), reason))
                return
            if snapshot is None:  # residue of a first save that never committed, or of a delete
                remove_quietly(task_dir)
                self._on_step("orphan_task_removed")
            else:
                self._remove_leftovers(task_dir, keep=version_dir_name(snapshot.version))
                snapshots.append(snapshot)

    def _quarantine(self, task_dir: Path, tenant: str, task_id: str) -> Path:
        """Move a damaged task out of the way (so its id is free again); leave it in place if that fails."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.root / DAMAGED_DIR / tenant / f"{task_id}-{stamp}"
        try:
            make_dirs_durably(target.parent)
            os.rename(task_dir, target)
            fsync_dir(task_dir.parent)
            fsync_dir(target.parent)
        except OSError:
            return task_dir
        return target

    # --- helpers ----------------------------------------------------------------------------------

    def _task_dir(self, tenant: str, task_id: str) -> Path:
        return self.root / check_id(tenant, "tenant") / check_id(task_id, "task id")

    def _task_lock(self, tenant: str, task_id: str) -> threading.Lock:
        # Locks are never dropped (a few hundred bytes per task id ever seen): dropping one while a thread
        # waits on it would let the next caller take a fresh lock and run alongside that thread.
        with self._locks_guard:
            return self._task_locks.setdefault((tenant, task_id), threading.Lock())

    def _stored_head(self, task_dir: Path) -> tuple[int, str | None] | None:
        """The live (version, incarnation), or None if there is none or its manifest is unreadable (a save
        replaces it)."""
        manifest_bytes = _read_manifest_bytes(task_dir)
        if manifest_bytes is None:
            return None
        try:
            manifest = Manifest.from_bytes(manifest_bytes, task_dir.parent.name, task_dir.name)
        except ManifestError:
            logger.warning("replacing the unreadable manifest of %s", task_dir)
            return None
        return manifest.version, manifest.incarnation

    def _tenant_names(self) -> list[str]:
        return [entry.name for entry in _sorted_entries(self.root) if _is_valid_id(entry.name) and entry.is_dir()]


def _read_version(version_dir: Path, manifest: Manifest) -> TaskSnapshot:
    try:
        meta_bytes = _read_verified_bytes(version_dir / META_FILE, manifest.meta)
        meta = json.loads(meta_bytes)
        if not isinstance(meta, dict):
            raise _DamageError("meta.json is not a JSON object")
        arrays = {entry.name: _read_verified_array(version_dir, entry) for entry in manifest.arrays}
        return TaskSnapshot(manifest.tenant, manifest.task_id, manifest.version, meta, arrays, manifest.incarnation)
    except FileNotFoundError as error:
        raise _DamageError(f"missing file {Path(str(error.filename)).name} of version {manifest.version}") from None
    except (OSError, ValueError, RecursionError) as error:  # bad JSON or .npy header, invalid snapshot
        raise _DamageError(f"unreadable version {manifest.version}: {error}") from None


def _read_verified_bytes(path: Path, expected: FileEntry) -> bytes:
    data = path.read_bytes()
    if len(data) != expected.size:
        raise _DamageError(f"{path.name} is {len(data)} bytes, the manifest says {expected.size}")
    if sha256_hex(data) != expected.sha256:
        raise _DamageError(f"checksum mismatch in {path.name}")
    return data


def _read_verified_array(version_dir: Path, entry: ArrayEntry) -> npt.NDArray[Any]:
    path = version_dir / entry.stored.file
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size != entry.stored.size:
            raise _DamageError(
                f"{path.name} (array {entry.name!r}) is {size} bytes, the manifest says {entry.stored.size}"
            )
        if file_sha256(file) != entry.stored.sha256:
            raise _DamageError(f"checksum mismatch in {path.name} (array {entry.name!r})")
        file.seek(0)
        array = np.load(file, allow_pickle=False)
    if not isinstance(array, np.ndarray) or array.dtype.str != entry.dtype or array.shape != entry.shape:
        raise _DamageError(f"array {entry.name!r} does not have the dtype and shape its manifest records")
    return array


def _read_manifest_bytes(task_dir: Path) -> bytes | None:
    try:
        return (task_dir / CURRENT).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _is_valid_id(name: str) -> bool:
    try:
        check_id(name, "id")
    except ValueError:
        return False
    return True


def _sorted_entries(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _bytes_on_disk(task_dir: Path) -> int:
    total = 0
    for dir_path, _, file_names in os.walk(task_dir):
        for file_name in file_names:
            with contextlib.suppress(FileNotFoundError):  # removed by a concurrent save's cleanup
                total += os.stat(os.path.join(dir_path, file_name)).st_size
    return total


def _no_step(step: str) -> None:
    pass
