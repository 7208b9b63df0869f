"""`shotcache eval` end to end on a small real image folder: the table, the JSON, the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.cli import main
from app.evaluation.datasets import load_folder_dataset
from tests.conftest import dataset_dir


def _small_dataset(tmp_path: Path) -> Path:
    """3 cifar10-mini classes (one with `_`-free names), 4 train / 5 test images each."""
    source = dataset_dir("cifar10-mini")
    root = tmp_path / "mini"
    for split, count in (("train", 4), ("test", 5)):
        for cls in ("airplane", "frog", "ship"):
            target = root / split / (cls if cls != "ship" else "cargo_ship")
            target.mkdir(parents=True)
            for image in sorted((source / split / cls).iterdir())[:count]:
                shutil.copy(image, target / image.name)
    return root


def test_eval_prints_the_table_and_writes_the_json(
    model_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _small_dataset(tmp_path)
    out = tmp_path / "result.json"
    argv = ["eval", "--model", "offline", "--data-dir", str(model_data_dir), "--data", str(data)]
    code = main([*argv, "--shots", "1,2", "--seeds", "1,2", "--methods", "zero-shot,tip-adapter,auto", "--paper"])
    assert code == 0  # without --json: table only
    code = main([*argv, "--shots", "1,2", "--seeds", "1,2", "--methods", "all", "--json", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | 1 shot | 2 shot |" in printed
    assert "| tip-adapter@paper |" in printed
    for method in ("zero-shot", "tip-adapter", "tip-x", "ape", "gda", "proker", "auto"):
        assert f"| {method} |" in printed
    payload = json.loads(out.read_text())
    assert payload["model"].startswith("offline-standin@")
    assert payload["dataset"] == "mini"
    results = payload["results"]
    assert len(results) == 2 * 2 * 7  # shots x seeds x methods (6 and auto)
    for row in results:
        assert set(row) >= {"method", "shots", "seed", "accuracy", "hyperparams"}
        assert 0.0 <= row["accuracy"] <= 1.0
    chosen = {r["chosen"] for r in results if r["method"] == "auto"}
    assert chosen <= {"tip-adapter", "tip-x", "ape", "gda", "proker", "zero-shot"}


def test_class_names_come_from_folders(tmp_path: Path) -> None:
    dataset = load_folder_dataset(_small_dataset(tmp_path))
    assert dataset.classes == ["airplane", "cargo ship", "frog"]


def test_eval_refuses_a_folder_without_splits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must hold train"):
        load_folder_dataset(tmp_path)
    with pytest.raises(SystemExit):
        main(["eval", "--data", str(tmp_path), "--shots", "0"])
