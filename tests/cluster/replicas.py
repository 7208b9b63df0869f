"""Real `shotcache serve` replicas on one PostgreSQL store: each its own process, port and data dir.

Each is the shared test server (tests/reliability/server.py) with `SHOTCACHE_STORE` set, the offline
stand-in model linked into its data dir, one thread each (two replicas share two cores). Importable
without pytest so the cluster benchmark can use it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.reliability.server import REPO, Server, free_port, prepare_data_dir

__all__ = ["REPO", "Replica", "free_port", "images", "multipart", "replica", "start_replicas"]

Replica = Server


def replica(
    name: str, root: Path, store_url: str, model_data_dir: Path, env: Mapping[str, str] | None = None
) -> Server:
    """Start (not wait for) replica `name` with its data dir and log under `root`."""
    data_dir = root / name / "data"
    prepare_data_dir(data_dir, model_data_dir)
    settings = {"SHOTCACHE_STORE": store_url, "SHOTCACHE_THREADS": "1", "SHOTCACHE_WORKERS": "2", **(env or {})}
    return Server(data_dir, root / f"{name}.log", settings, name=name)


def start_replicas(
    names: Sequence[str], root: Path, store_url: str, model_data_dir: Path, env: Mapping[str, str] | None = None
) -> list[Server]:
    """Start replicas side by side (their model loads overlap) and wait until all are ready."""
    replicas = [replica(name, root, store_url, model_data_dir, env) for name in names]
    try:
        for started in replicas:
            started.wait_ready()
    except BaseException:
        for started in replicas:
            started.kill()
        raise
    return replicas


def multipart(shots: Sequence[tuple[Path, str]], **form: Any) -> dict[str, Any]:
    """httpx keyword arguments for an upload of (image, label) pairs plus form fields."""
    files = [("images", (path.name, path.read_bytes(), "image/jpeg")) for path, _ in shots]
    return {"files": files, "data": {"labels": [label for _, label in shots], **form}}


def images(paths: Sequence[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]
