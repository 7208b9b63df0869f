"""Real `shotcache serve` replicas on one PostgreSQL store (started by benchmarks/server_process.py, which
the cluster benchmark uses too), and the uploads the cluster tests send them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.server_process import REPO, Server, free_port, replica, start_replicas

__all__ = ["REPO", "Replica", "free_port", "images", "multipart", "replica", "start_replicas"]

Replica = Server


def multipart(shots: Sequence[tuple[Path, str]], **form: Any) -> dict[str, Any]:
    """httpx keyword arguments for an upload of (image, label) pairs plus form fields."""
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path, _ in shots]
    return {"files": files, "data": {"labels": [label for _, label in shots], **form}}


def images(paths: Sequence[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
