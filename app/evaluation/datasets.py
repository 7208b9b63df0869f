"""Labelled image folders: `<root>/{train,test}/<class>/<image>`; class name = folder name, `_` -> space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def class_name(folder: str) -> str:
    """A class folder's name as a label: `pickup_truck` -> `pickup truck`."""
    return folder.replace("_", " ")


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name (other files are ignored)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class FolderDataset:
    name: str
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]

    def train_labels(self) -> list[int]:
        return [label for _, label in self.train]

    def train_only(self) -> FolderDataset:
        """The train split alone, split again: per class, the first half of its train images (by file
        name) to sample shots from, the second half as the test images. For choosing rules without ever
        reading the test split (a class needs 2 or more train images)."""
        train: list[tuple[Path, int]] = []
        test: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = [path for path, of in self.train if of == label]
            if len(files) < 2:
                raise ValueError(f"class {name!r} has {len(files)} train image(s); splitting it needs 2 or more")
            half = len(files) // 2
            train.extend((path, label) for path in files[:half])
            test.extend((path, label) for path in files[half:])
        return FolderDataset(f"{self.name} (train split)", self.classes, train, test)


def load_folder_dataset(root: Path) -> FolderDataset:
    root = root.resolve()
    train_dir, test_dir = root / "train", root / "test"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise ValueError(f"{root} must hold train/<class>/* and test/<class>/*; {folder} is missing")
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    test_folders = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    if folders != test_folders:
        raise ValueError(f"train and test class folders differ: {sorted(set(folders) ^ set(test_folders))}")
    if len(folders) < 2:
        raise ValueError(f"{root} has {len(folders)} class folder(s); at least 2 are needed")
    train = _images(train_dir, folders)
    test = _images(test_dir, folders)
    return FolderDataset(root.name, [class_name(f) for f in folders], train, test)


def _images(split: Path, folders: list[str]) -> list[tuple[Path, int]]:
    out: list[tuple[Path, int]] = []
    for label, folder in enumerate(folders):
        files = images_in(split / folder)
        if not files:
            raise ValueError(f"{split / folder} holds no images")
        out.extend((path, label) for path in files)
    return out
