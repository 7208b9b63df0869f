"""Real `python -m app.cli serve` processes for the client, CLI and browser tests (one open, one with
API keys), on fresh data dirs with the built stand-in linked in, and the cifar10-mini images they use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.server_process import Server, link_model
from tests.conftest import dataset_dir

ALICE_KEY = "alice-web-key-01"
# Three classes the stand-in tells apart well from a few shots (cifar10-mini).
CLASSES = ("airplane", "automobile", "frog")
SHOTS = 4


def start_server(data_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> Server:
    server = Server(data_dir, log_path, env)
    server.wait_ready()
    return server


def stop_server(server: Server) -> None:
    server.stop()
    assert "Traceback" not in server.log(), server.log()


def _serve(tmp: Path, model_data_dir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    data_dir = tmp / "data"
    link_model(data_dir, model_data_dir)
    server = start_server(data_dir, tmp / "server.log", env)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture(scope="session")
def open_server(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(tmp_path_factory.mktemp("web-open"), model_data_dir)


@pytest.fixture(scope="session")
def keyed_server(model_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(
        tmp_path_factory.mktemp("web-keyed"), model_data_dir, {"SHOTCACHE_API_KEYS": f"alice:{ALICE_KEY}"}
    )


def images(split: str, per_class: int, *, skip: int = 0, classes: tuple[str, ...] = CLASSES) -> dict[str, list[Path]]:
    root = dataset_dir("cifar10-mini") / split
    out = {}
    for name in classes:
        paths = sorted((root / name).glob("*.jpg"))[skip : skip + per_class]
        assert len(paths) == per_class, f"cifar10-mini {split}/{name} has too few images"
        out[name] = paths
    return out


@pytest.fixture(scope="session")
def shots() -> dict[str, list[Path]]:
    return images("train", SHOTS)


@pytest.fixture(scope="session")
def shot_folder(shots: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shots as a folder with one sub-folder per class (what `--from-folder` and the page take)."""
    root = tmp_path_factory.mktemp("shots") / "pets"
    for name, paths in shots.items():
        (root / name).mkdir(parents=True)
        for path in paths:
            (root / name / path.name).write_bytes(path.read_bytes())
    return root
