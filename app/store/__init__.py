"""Task persistence: the `TaskStore` interface and its embedded local-directory backend."""

from app.store.base import (
    DamagedTask,
    DamagedTaskError,
    TaskSnapshot,
    TaskStore,
    VersionConflict,
    new_incarnation,
)
from app.store.local import LocalDirStore

__all__ = [
    "DamagedTask",
    "DamagedTaskError",
    "LocalDirStore",
    "TaskSnapshot",
    "TaskStore",
    "VersionConflict",
    "new_incarnation",
]
