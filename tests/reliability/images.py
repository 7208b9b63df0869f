"""Real labelled images (cifar10-mini from ../shared/datasets) as multipart parts, without pytest fixtures,
so the command-line runs (`python -m tests.reliability.crash_loop`, `... .load`) can use them too."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

from tests.conftest import DATASETS

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

Part = tuple[str, tuple[str, bytes, str]]


class DatasetMissingError(RuntimeError):
    pass


def dataset_root() -> Path:
    root = DATASETS / "cifar10-mini"
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DatasetMissingError(f"cifar10-mini not available at {root}")
    return root


@cache
def image_paths(split: str, label: str) -> tuple[Path, ...]:
    return tuple(sorted((dataset_root() / split / label).glob("*.jpg")))


@cache
def image_bytes(path: Path) -> bytes:
    return path.read_bytes()


def shots(split: str, labels: Sequence[str], per_class: int, *, skip: int = 0) -> list[tuple[Path, str]]:
    """(path, label) for `per_class` images of each label, after the first `skip` of each (wrapping)."""
    out: list[tuple[Path, str]] = []
    for label in labels:
        paths = image_paths(split, label)
        out.extend((paths[(skip + i) % len(paths)], label) for i in range(per_class))
    return out


def parts(items: Sequence[tuple[Path, str]] | Sequence[Path]) -> list[Part]:
    paths = [item[0] if isinstance(item, tuple) else item for item in items]
    return [("images", (p.name, image_bytes(p), "image/jpeg")) for p in paths]
