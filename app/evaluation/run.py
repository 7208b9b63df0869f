"""Per seed: sample K shots per class from train, tune every method on those shots only (leave-one-out,
never on test), classify every test image. Each image is encoded once per run and reused."""

from __future__ import annotations

import itertools
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from tqdm import tqdm

from app.encoder import Encoder
from app.encoder.encoder import prompt_means
from app.encoder.prompts import ClassPrompts
from app.fewshot import build_method, method_inputs
from app.images import ImageLimits, decode_image
from app.service.builder import encode_views
from cache_models import METHODS, CacheMethod, get_method
from cache_models.prompt_weighting import weighted_class_text
from cache_models.selection import Choice, blend_hyperparams, calibrated_probabilities, choose

from .datasets import FolderDataset

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

# Dataset files are local and trusted more than uploads, but they go through the same decoder.
DATASET_LIMITS = ImageLimits(max_file_bytes=100 * 1024 * 1024)


@dataclass(frozen=True)
class EncodedDataset:
    name: str
    classes: list[str]
    views: int
    train_views: FloatArray  # [T * views, d], rows i*views .. of train image i
    train_labels: IntArray  # [T]
    test_features: FloatArray  # [E, d]
    test_labels: IntArray  # [E]
    text: FloatArray  # [N, d], each class's plain prompt mean
    prompts: FloatArray  # [P, d], every class's prompts (class c: rows prompt_offsets[c]:prompt_offsets[c + 1])
    prompt_offsets: IntArray  # [N + 1]


@dataclass(frozen=True)
class ResultRow:
    method: str
    shots: int
    seed: int
    accuracy: float
    hyperparams: dict[str, float | int]
    loo_accuracy: float | None
    loo_nll: float | None
    chosen: str | None = None  # for `auto`: the method it picked

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "shots": self.shots,
            "seed": self.seed,
            "accuracy": self.accuracy,
            "hyperparams": self.hyperparams,
            "loo_accuracy": self.loo_accuracy,
            "loo_nll": self.loo_nll,
        }
        if self.chosen is not None:
            out["chosen"] = self.chosen
        return out


def load_images(paths: Sequence[Any], min_decode_side: int) -> list[Image.Image]:
    return [
        decode_image(path.read_bytes(), DATASET_LIMITS, filename=str(path), min_decode_side=min_decode_side)
        for path in paths
    ]


def encode_dataset(
    encoder: Encoder,
    dataset: FolderDataset,
    *,
    views: int,
    seed: int = 0,
    progress: bool = True,
    templates: Sequence[str] | None = None,
) -> EncodedDataset:
    """Encode every train image under `views` views (seeded per image), every test image once, and
    every class's prompts (`templates`: the model's default set when None)."""
    chunk = 64
    side = 2 * encoder.input_size
    bar = tqdm(
        total=len(dataset.train) + len(dataset.test),
        desc=f"encoding {dataset.name}",
        unit="img",
        disable=not progress,
        file=sys.stderr,
    )
    train_views = []
    for start in range(0, len(dataset.train), chunk):
        items = dataset.train[start : start + chunk]
        images = load_images([p for p, _ in items], side)
        seeds = [seed * 1_000_003 + start + i for i in range(len(items))]
        train_views.append(
            encode_views(encoder.encode_crops, encoder.preprocessor, images, views, seeds, per_call=chunk)
        )
        bar.update(len(items))
    test = []
    for start in range(0, len(dataset.test), chunk):
        items = dataset.test[start : start + chunk]
        test.append(encoder.encode_images(load_images([p for p, _ in items], side)))
        bar.update(len(items))
    bar.close()
    classes = [ClassPrompts(name) for name in dataset.classes]
    prompts, prompt_offsets = encoder.prompt_embeddings(classes, templates)
    return EncodedDataset(
        name=dataset.name,
        classes=dataset.classes,
        views=views,
        train_views=np.concatenate(train_views),
        train_labels=np.array(dataset.train_labels(), dtype=np.int64),
        test_features=np.concatenate(test),
        test_labels=np.array([label for _, label in dataset.test], dtype=np.int64),
        text=prompt_means(prompts, prompt_offsets),
        prompts=prompts,
        prompt_offsets=prompt_offsets,
    )


def sample_shots(labels: IntArray, shots: int, seed: int) -> IntArray:
    """`shots` train indices per class, drawn without replacement by a seeded generator."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size < shots:
            raise ValueError(f"class {int(label)} has {members.size} train images, fewer than {shots} shots")
        picked.append(np.sort(rng.choice(members, size=shots, replace=False)))
    return np.concatenate(picked).astype(np.int64)


def view_rows(indices: IntArray, views: int) -> IntArray:
    return (indices[:, None] * views + np.arange(views)[None, :]).reshape(-1)


AUTO = "auto"


def evaluate(
    data: EncodedDataset,
    *,
    shots: Sequence[int],
    seeds: Sequence[int],
    methods: Sequence[str],
    scale: float,
    default_method: str = "ape",
    oracle: bool = False,
    paper: bool = False,
    prompt_weighting: float = 0.0,
) -> list[ResultRow]:
    """Test accuracy of every method tuned by leave-one-out on the sampled shots only.

    `auto` is what the service's `method=auto` would classify with (`choose`: the method with the
    lowest calibrated cross-entropy on shared shot folds, or from BLEND_FROM_SHOTS shots the blend of
    the best two; its one-shot choice, else `default_method`, at one shot); `chosen` names them.
    `oracle` adds `<method>@oracle` rows: the same grid searched for the best TEST accuracy, an
    upper bound no service can reach, reported to show what leave-one-out tuning leaves. `paper`
    adds `<method>@paper` rows: the method at its papers' default hyper-parameters, untuned.
    `prompt_weighting` > 0 weighs each class's prompts by its sampled shots (image-guided, TIMO;
    cache_models.prompt_weighting) instead of averaging them; with one prompt per class it changes nothing.
    """
    rows = []
    # auto compares every method (and falls back to the default one), so it needs them all fitted
    fitted_methods = list(METHODS) if AUTO in methods else list(methods)
    for k in shots:
        for seed in seeds:
            picked = sample_shots(data.train_labels, k, seed)
            feats = data.train_views[view_rows(picked, data.views)]
            labels = data.train_labels[picked]
            drawn = data
            if prompt_weighting > 0:  # the class text this draw's shots would give a task
                per_view = np.repeat(labels, data.views)
                text = weighted_class_text(data.prompts, data.prompt_offsets, feats, per_view, prompt_weighting)
                drawn = replace(data, text=text)
            fitted = {
                name: build_method(name, feats, labels, drawn.text, drawn.views, scale=scale) for name in fitted_methods
            }
            for name, method in fitted.items():
                if name in methods:
                    rows.append(_row(name, k, seed, method, drawn))
                if oracle and name != "zero-shot":
                    rows.append(_oracle_row(name, k, seed, method, feats, labels, drawn, scale))
                if paper and name != "zero-shot":
                    keys, key_labels, groups = method_inputs(name, feats, labels, drawn.views)
                    untuned = get_method(name)(scale=scale).fit(keys, key_labels, drawn.text, groups)
                    rows.append(_row(f"{name}@paper", k, seed, untuned, drawn))
            if AUTO in methods:
                rows.append(_auto_row(choose(fitted) or Choice((default_method,), (1.0,)), k, seed, fitted, drawn))
    return rows


def _auto_row(choice: Choice, k: int, seed: int, fitted: dict[str, CacheMethod], data: EncodedDataset) -> ResultRow:
    """What `method=auto` classifies with (`choose`): one method's row, or its blend's."""
    if not choice.blended:
        best = choice.members[0]
        return replace(_row(best, k, seed, fitted[best], data), method=AUTO, chosen=best)
    members = [fitted[name] for name in choice.members]
    probs = calibrated_probabilities([m.predict(data.test_features) for m in members], choice.temperatures)
    report = choice.report
    return ResultRow(
        method=AUTO,
        shots=k,
        seed=seed,
        accuracy=float(np.mean(np.argmax(probs, axis=1) == data.test_labels)),
        hyperparams=blend_hyperparams({m.name: m.hyperparams for m in members}),
        loo_accuracy=None if report is None else report.accuracy,
        loo_nll=None if report is None else report.nll,
        chosen="+".join(choice.members),
    )


def _accuracy(method: CacheMethod, data: EncodedDataset) -> float:
    return float(np.mean(np.argmax(method.predict(data.test_features), axis=1) == data.test_labels))


def _row(name: str, k: int, seed: int, method: CacheMethod, data: EncodedDataset) -> ResultRow:
    report = method.tune_report
    return ResultRow(
        method=name,
        shots=k,
        seed=seed,
        accuracy=_accuracy(method, data),
        hyperparams=method.hyperparams,
        loo_accuracy=None if report is None else report.accuracy,
        loo_nll=None if report is None else report.nll,
    )


def _oracle_row(
    name: str,
    k: int,
    seed: int,
    tuned: CacheMethod,
    feats: FloatArray,
    labels: IntArray,
    data: EncodedDataset,
    scale: float,
) -> ResultRow:
    """Coordinate search of the method's own grid and stages, scored by test accuracy."""
    keys, key_labels, groups = method_inputs(name, feats, labels, data.views)
    grid, stages = tuned.search_space(keys, key_labels, data.text, groups)
    current = {p: float(v) for p, v in tuned.hyperparams.items()}
    scores: dict[tuple[tuple[str, float], ...], float] = {}

    def score(params: dict[str, float]) -> float:
        key = tuple(sorted(params.items()))
        if key not in scores:
            method = get_method(name)(**params).fit(keys, key_labels, data.text, groups)
            scores[key] = _accuracy(method, data)
        return scores[key]

    best = score(current)
    for _ in range(2):
        for stage in stages:
            names = [n for n in stage if n in grid]
            for values in itertools.product(*(grid[n] for n in names)):
                candidate = {**current, **dict(zip(names, values, strict=True))}
                if score(candidate) > best:
                    best, current = score(candidate), candidate
    return ResultRow(f"{name}@oracle", k, seed, best, current, None, None)


def summary_table(rows: Sequence[ResultRow]) -> str:
    """Markdown table: method x shots, test accuracy mean ± std over seeds (in %)."""
    shots = sorted({r.shots for r in rows})
    methods = list(dict.fromkeys(r.method for r in rows))
    lines = ["| method | " + " | ".join(f"{k} shot" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    for method in methods:
        cells = []
        for k in shots:
            accs = [100 * r.accuracy for r in rows if r.method == method and r.shots == k]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {std:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
