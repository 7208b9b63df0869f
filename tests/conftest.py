"""Shared fixtures: the real offline stand-in model (built once, cached under .cache/) and the real
labelled images of ../shared/datasets (tests that need them skip cleanly when they are absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.server_process import link_model

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("SHOTCACHE_TEST_DATASETS", REPO.parent / "shared" / "datasets"))
# The stand-in is deterministic, so one build serves every test run on this checkout.
MODEL_DATA_DIR = Path(os.environ.get("SHOTCACHE_TEST_MODEL_DIR", REPO / ".cache" / "test-data"))


def dataset_dir(name: str) -> Path:
    path = DATASETS / name
    if not (path / "train").is_dir() or not (path / "test").is_dir():
        pytest.skip(f"dataset {name} not available at {path}")
    return path


@pytest.fixture(scope="session")
def model_data_dir() -> Path:
    """A data dir holding the built stand-in model (and nothing else the tests write)."""
    from app.encoder.standin import ensure_standin

    ensure_standin(MODEL_DATA_DIR)
    return MODEL_DATA_DIR


@pytest.fixture(scope="session")
def encoder(model_data_dir: Path) -> object:
    from app.encoder import create_encoder
    from app.settings import Settings

    enc, _ = create_encoder(Settings(model="offline", data_dir=model_data_dir, threads=2), torch_free=False)
    return enc


@pytest.fixture
def service_settings(model_data_dir: Path, tmp_path: Path) -> object:
    """Settings for a service whose tasks live in a fresh directory and whose model is the stand-in.

    The stand-in folder and its exports are linked into the fresh data dir (`link_model`).
    """
    from app.settings import Settings

    data_dir = tmp_path / "data"
    link_model(data_dir, model_data_dir)
    return Settings(model="offline", data_dir=data_dir, threads=2, workers=2)
