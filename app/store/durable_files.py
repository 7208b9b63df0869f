"""File-system primitives whose effects survive a crash once they return (POSIX semantics).

A write is only durable after the file's data is fsynced, and a create/rename/unlink only after the
*directory* holding the entry is fsynced; these helpers do both so callers cannot forget one.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt


def fsync_dir(directory: Path) -> None:
    """Make creations, renames and deletions of entries in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(directory: Path) -> None:
    """Create `directory` and missing parents, fsyncing each parent that gained an entry."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        # exist_ok: another thread may have created it first; the parent still needs the fsync.
        path.mkdir(exist_ok=True)
        fsync_dir(path.parent)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._file.write(data)


def write_durably(path: Path, fill: Callable[[Any], None]) -> tuple[int, str]:
    """Create `path`, let `fill(writer)` write its content, fsync it; return (size, sha256 hex)."""
    with open(path, "xb") as file:  # "x": never silently overwrite; every file we write is new
        writer = _HashingWriter(file)
        fill(writer)
        file.flush()
        os.fsync(file.fileno())
    return writer.size, writer.digest.hexdigest()


def write_array_durably(path: Path, array: npt.NDArray[Any]) -> tuple[int, str]:
    """Write `array` as .npy without pickles (object arrays raise ValueError); return (size, sha256)."""
    # write_array streams chunks to a non-file object, so the bytes are hashed as written, not re-read.
    return write_durably(path, lambda writer: np.lib.format.write_array(writer, array, allow_pickle=False))


def write_bytes_durably(path: Path, data: bytes) -> tuple[int, str]:
    return write_durably(path, lambda writer: writer.write(data))


def file_sha256(file: io.BufferedReader) -> str:
    return hashlib.file_digest(file, "sha256").hexdigest()


def remove_quietly(path: Path) -> None:
    """Best-effort removal of a file or directory tree: leftovers are cleaned again at the next restore."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
