"""What every task store offers: snapshots in, snapshots out, damage reported rather than raised.

The service talks to storage only through `TaskStore`, so a shared backend (object store, database) can
replace the local directory when several replicas serve the same tasks. Names are checked here, once,
for every backend: tenant and task ids and array names come from the network, and a backend is free to
build paths or keys from them only because nothing outside the allowed alphabets ever gets this far.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ARRAY_NAME_PATTERN = re.compile(r"[A-Za-z0-9_./-]{1,200}")


def check_id(value: object, what: str) -> str:
    """Return `value` if it is a valid tenant or task id, else raise ValueError naming the problem."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    # fullmatch, not match with `$`: `$` would accept a trailing newline.
    if not _ID_PATTERN.fullmatch(value):
        raise ValueError(f"{what} {value!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ -")
    return value


def check_array_name(value: object) -> str:
    """Return `value` if it is a valid array name, else raise ValueError naming the problem."""
    if not isinstance(value, str):
        raise ValueError(f"array name must be a string, got {type(value).__name__}")
    if not _ARRAY_NAME_PATTERN.fullmatch(value):
        raise ValueError(f"array name {value!r} is invalid: use 1-200 characters from A-Z a-z 0-9 _ . / -")
    if value.startswith("/") or ".." in value:
        raise ValueError(f"array name {value!r} is invalid: no leading '/' and no '..'")
    return value


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarrays with == is elementwise, not a bool
class TaskSnapshot:
    """One version of one task, exactly as the service hands it to the store and gets it back.

    `meta` must be JSON-serialisable; it comes back as parsed JSON (tuples as lists, keys as strings).
    Arrays come back bit-identical: same dtype (byte order included), shape and bytes.

    `incarnation` tells apart two tasks that had the same id one after the other (deleted, then created
    again): set once when the task is created (`new_incarnation`), carried unchanged by every later
    version, and an update is stored only over the incarnation it was built from. None: a task stored
    before incarnations existed (it keeps working; its updates carry None too).
    """

    tenant: str
    task_id: str
    version: int
    meta: Mapping[str, Any]
    arrays: Mapping[str, npt.NDArray[Any]]
    incarnation: str | None = None

    def __post_init__(self) -> None:
        check_id(self.tenant, "tenant")
        check_id(self.task_id, "task id")
        # bool is an int subclass; True as a version is a caller bug, not version 1.
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise ValueError(f"version must be an integer >= 1, got {self.version!r}")
        if self.incarnation is not None:
            check_id(self.incarnation, "incarnation")
        if not isinstance(self.meta, Mapping):
            raise ValueError(f"meta must be a mapping, got {type(self.meta).__name__}")
        for name, array in self.arrays.items():
            check_array_name(name)
            if not isinstance(array, np.ndarray):
                raise ValueError(f"array {name!r} must be a numpy array, got {type(array).__name__}")
            if array.dtype.hasobject:
                raise ValueError(f"array {name!r} has dtype {array.dtype}: object arrays would need pickles")


def new_incarnation() -> str:
    """A fresh incarnation id for a task being created (128 random bits: never reused in practice)."""
    return secrets.token_hex(16)


def encode_meta(snapshot: TaskSnapshot) -> bytes:
    """The bytes every backend stores for `snapshot.meta` (UTF-8 JSON); ValueError if it is not JSON."""
    try:
        return json.dumps(dict(snapshot.meta), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        raise ValueError(f"task {snapshot.tenant}/{snapshot.task_id}: meta is not JSON-serialisable: {error}") from None


@dataclass(frozen=True)
class DamagedTask:
    """A task found on storage that cannot be served; `location` tells an operator where it now is."""

    tenant: str | None
    task_id: str | None
    location: str
    reason: str


class DamagedTaskError(Exception):
    """Raised by `TaskStore.load` for a task that exists but fails verification."""

    def __init__(self, damaged: DamagedTask) -> None:
        super().__init__(f"task {damaged.tenant}/{damaged.task_id} is damaged: {damaged.reason}")
        self.damaged = damaged


class VersionConflict(ValueError):  # noqa: N818 (the condition, like DamagedTask)
    """`TaskStore.save` lost a race: the live version is not older than the one being saved.

    `live` is the version that is live now (None: the task does not exist any more). The writer built
    its snapshot from an older version; it must reload and retry (or report the conflict), never
    overwrite: this is the store's compare-and-set.
    """

    def __init__(self, message: str, *, live: int | None) -> None:
        super().__init__(message)
        self.live = live


def refusal(snapshot: TaskSnapshot, live: tuple[int, str | None] | None) -> VersionConflict | None:
    """Why `snapshot` may not be stored over the live (version, incarnation) of its task (None: it may).

    Every backend's compare-and-set decides by this rule (the local store before it writes, the
    database in its conditional statement, whose refusals it explains with this function).
    """
    refused = f"task {snapshot.tenant}/{snapshot.task_id}: version {snapshot.version} refused"
    if live is None:
        if snapshot.version == 1:
            return None
        return VersionConflict(f"{refused}, it was deleted: an update does not recreate a task", live=None)
    live_version, live_incarnation = live
    if snapshot.version > 1 and live_incarnation != snapshot.incarnation:
        return VersionConflict(
            f"{refused}, it was deleted and created again since this update was built: "
            "an update of the old task does not change the new one",
            live=None,
        )
    if snapshot.version <= live_version:
        return VersionConflict(f"{refused}, it is not newer than the stored version {live_version}", live=live_version)
    return None


class StoreUnavailable(Exception):  # noqa: N818 (a condition the service reports, like VersionConflict)
    """The store cannot be reached right now (a shared backend is down or unreachable).

    Transient: the same call may succeed later. The message is safe to show (it never holds credentials).
    A save that raises this may or may not have committed; a retry of it then meets VersionConflict.
    """


class TaskStore(Protocol):
    """Durable storage of task snapshots, one live version per (tenant, task id)."""

    def save(self, snapshot: TaskSnapshot) -> None:
        """Store `snapshot` durably and atomically, replacing older versions of the task.

        When this returns the snapshot survives a crash; if it raises or the process dies first, the
        previous version stays intact. Version 1 creates the task, a higher version updates it. Raises
        VersionConflict (a ValueError) if `snapshot.version` is not above the live one (a writer that
        built from a stale version never overwrites a newer one), and with `live=None` for an update
        (version > 1) of a task that does not exist, or whose live incarnation is not the snapshot's (the
        task was deleted and created again under the same id while the update was built): a save racing
        a delete never resurrects the task, nor changes the one created after it.
        """
        ...

    def live_version(self, tenant: str, task_id: str) -> int | None:
        """The live version number of a task (None if it does not exist), without loading it: the cheap
        check a replica makes on every request to see whether its cached copy is still current."""
        ...

    def live_head(self, tenant: str, task_id: str) -> tuple[int, str | None] | None:
        """The live (version, incarnation) of a task (None if it does not exist): `live_version` plus what
        tells a task created again under the same id from the one a replica has cached."""
        ...

    def load(self, tenant: str, task_id: str) -> TaskSnapshot | None:
        """The live version of a task, None if there is none; DamagedTaskError if it fails verification."""
        ...

    def delete(self, tenant: str, task_id: str) -> bool:
        """Remove a task durably; False if it did not exist."""
        ...

    def list_ids(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """Sorted (tenant, task id) pairs of stored tasks, of one tenant or of all."""
        ...

    def load_all(self) -> tuple[list[TaskSnapshot], list[DamagedTask]]:
        """Every intact task and every damaged one, for startup restore; never raises for bad data."""
        ...

    def usage(self) -> dict[str, dict[str, int]]:
        """Per tenant with at least one task: {"tasks": count, "bytes": stored bytes of live versions}."""
        ...
