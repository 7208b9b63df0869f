"""Folders built once and shared by processes (the stand-in model, ONNX exports): an exclusive file
lock around the build, an atomic install by rename so a reader sees the old folder or the new one, and the
checksum their files are named by."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block; other processes wait."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def install_folder(tmp: Path, folder: Path) -> None:
    """Rename the finished `tmp` folder to `folder`, replacing (and deleting) an existing one.

    mkdtemp makes private folders; the result is read by whichever user runs the service, hence 0755.
    """
    tmp.chmod(0o755)
    if folder.exists():
        old = folder.with_name(f".{folder.name}-old-{os.getpid()}-{threading.get_ident()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
