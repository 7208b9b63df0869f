"""`shotcache eval` end to end on a small real image folder: the table, the JSON, the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.encoder.encoder import Encoder
from app.encoder.prompts import ClassPrompts, template_set
from app.evaluation.datasets import load_folder_dataset
from app.evaluation.run import encode_dataset, evaluate, sample_shots, view_rows
from app.fewshot import build_method
from cache_models import METHODS
from cache_models.prompt_weighting import weighted_class_text
from cache_models.selection import BLEND_FROM_SHOTS, calibrated_probabilities
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
    assert (payload["templates"], payload["prompt_weighting"]) == (None, 0.0)  # the model's set, plain mean
    results = payload["results"]
    assert len(results) == 2 * 2 * 7  # shots x seeds x methods (6 and auto)
    for row in results:
        assert set(row) >= {"method", "shots", "seed", "accuracy", "hyperparams"}
        assert 0.0 <= row["accuracy"] <= 1.0
    chosen = {r["chosen"] for r in results if r["method"] == "auto"}
    assert chosen <= {"tip-adapter", "tip-x", "ape", "gda", "proker"}  # zero-shot never competes


def test_class_names_come_from_folders(tmp_path: Path) -> None:
    dataset = load_folder_dataset(_small_dataset(tmp_path))
    assert dataset.classes == ["airplane", "cargo ship", "frog"]


def test_eval_refuses_a_folder_without_splits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must hold train"):
        load_folder_dataset(tmp_path)
    with pytest.raises(SystemExit):
        main(["eval", "--data", str(tmp_path), "--shots", "0"])


def test_eval_weighs_prompts_by_the_drawn_shots(encoder: Encoder, tmp_path: Path) -> None:
    """--prompt-weighting: each draw's zero-shot text is the shots' weighting of the set's prompts, as
    cache_models.prompt_weighting computes it; 0 keeps the plain mean."""
    dataset = load_folder_dataset(_small_dataset(tmp_path))
    seven = template_set("clip-simple-7")
    data = encode_dataset(encoder, dataset, views=2, progress=False, templates=seven)
    assert data.prompts.shape[0] == 7 * len(dataset.classes)
    np.testing.assert_array_equal(data.prompt_offsets, np.arange(4) * 7)
    np.testing.assert_array_equal(
        data.text, encoder.class_text_weights([ClassPrompts(c) for c in dataset.classes], seven)
    )

    def zero_shot_accuracy(gamma: float) -> float:
        rows = evaluate(data, shots=[2], seeds=[5], methods=["zero-shot"], scale=1.0, prompt_weighting=gamma)
        return rows[0].accuracy

    picked = sample_shots(data.train_labels, 2, 5)
    feats = data.train_views[view_rows(picked, 2)]
    text = weighted_class_text(data.prompts, data.prompt_offsets, feats, np.repeat(data.train_labels[picked], 2), 30.0)
    assert not np.allclose(text, data.text, atol=1e-4)
    by_hand = float(np.mean(np.argmax(data.test_features @ text.T, axis=1) == data.test_labels))
    plain = float(np.mean(np.argmax(data.test_features @ data.text.T, axis=1) == data.test_labels))
    assert zero_shot_accuracy(30.0) == by_hand
    assert zero_shot_accuracy(0.0) == plain


def test_eval_auto_reports_the_blend_the_service_would_classify_with(encoder: Encoder, tmp_path: Path) -> None:
    """From BLEND_FROM_SHOTS shots `auto`'s row is `choose`'s blend: named by its two members, their
    tuned hyper-parameters prefixed by member, and the test accuracy of their mean calibrated
    probabilities (recomputed here from the members fitted on the same draw)."""
    dataset = load_folder_dataset(_small_dataset(tmp_path))
    data = encode_dataset(encoder, dataset, views=2, progress=False)
    k, seed = BLEND_FROM_SHOTS, 4
    rows = evaluate(data, shots=[k], seeds=[seed], methods=[*METHODS, "auto"], scale=encoder.logit_scale)
    auto = next(r for r in rows if r.method == "auto")
    assert auto.chosen is not None
    members = auto.chosen.split("+")
    assert len(members) == 2
    assert set(members) <= set(METHODS) - {"zero-shot"}
    own = {r.method: r for r in rows}
    assert auto.hyperparams == {f"{m}.{key}": v for m in members for key, v in own[m].hyperparams.items()}
    picked = sample_shots(data.train_labels, k, seed)
    feats, labels = data.train_views[view_rows(picked, 2)], data.train_labels[picked]
    fitted = [build_method(m, feats, labels, data.text, 2, scale=encoder.logit_scale) for m in members]
    temperatures = [m.tune_report.temperature for m in fitted if m.tune_report is not None]
    probs = calibrated_probabilities([m.predict(data.test_features) for m in fitted], temperatures)
    assert auto.accuracy == float(np.mean(np.argmax(probs, axis=1) == data.test_labels))
    assert auto.loo_accuracy is not None
    assert auto.loo_nll is not None


def test_eval_refuses_unknown_template_sets_and_negative_weighting(tmp_path: Path) -> None:
    for bad in (["--templates", "nope"], ["--prompt-weighting", "-1"], ["--prompt-weighting", "inf"]):
        with pytest.raises(SystemExit):
            main(["eval", "--data", str(tmp_path), *bad])


def test_train_only_splits_each_class_of_the_train_split_and_never_reads_test(tmp_path: Path) -> None:
    dataset = load_folder_dataset(_small_dataset(tmp_path))
    split = dataset.train_only()
    assert split.classes == dataset.classes
    assert split.name == "mini (train split)"
    train_files = {path for path, _ in dataset.train}
    assert {p for p, _ in split.train} | {p for p, _ in split.test} == train_files
    assert not {p for p, _ in split.train} & {p for p, _ in split.test}
    for label in range(3):  # 4 train images per class: the first 2 by name to sample from, the last 2 scored
        mine = sorted(p for p, of in dataset.train if of == label)
        assert [p for p, of in split.train if of == label] == mine[:2]
        assert [p for p, of in split.test if of == label] == mine[2:]


def test_eval_train_only_runs_and_refuses_shots_it_cannot_sample(
    model_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _small_dataset(tmp_path)
    for image in (data / "test").rglob("*.jpg"):
        image.write_bytes(b"not read")  # --train-only must never decode these
    out = tmp_path / "train-only.json"
    argv = ["eval", "--model", "offline", "--data-dir", str(model_data_dir), "--data", str(data), "--quiet"]
    assert main([*argv, "--train-only", "--shots", "1,2", "--seeds", "1", "--methods", "auto", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["train_only"] is True
    assert payload["dataset"] == "mini (train split)"
    assert {r["shots"] for r in payload["results"]} == {1, 2}
    assert main([*argv, "--train-only", "--shots", "3"]) == 2  # 2 images per class to sample from
    assert "--shots 3 needs that many train images per class; mini (train split) has 2" in capsys.readouterr().err
