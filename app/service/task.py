"""A task: one tenant's few-shot classifier, immutable once built.

An update builds a new `Task` beside the old one and swaps the reference, so a classify call that took
the reference sees one version whole, never a mix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from app import thumbnails
from app.encoder import ClassPrompts
from app.fewshot import TaskSupports
from cache_models import CacheMethod
from cache_models.evidence import nearest_shots

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

# Abstain when the calibrated top probability is below what 95% of the correctly classified
# leave-one-out shots reached: in-distribution answers are kept at roughly that rate.
ABSTAIN_KEEP_FRACTION = 0.95
MIN_CORRECT_FOR_THRESHOLD = 5


@dataclass(frozen=True)
class MethodFit:
    """A fitted method with what leave-one-out said about it."""

    method: CacheMethod
    loo_accuracy: float | None
    loo_nll: float | None
    temperature: float  # calibrated probabilities are softmax(logits / temperature)
    abstain_threshold: float | None
    n_scored: int
    fallback: str | None
    # Leave-one-out's scored rows: true and predicted class (the confusion matrix; empty if none scored).
    loo_labels: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    loo_predicted: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))

    def confusion(self, n_classes: int) -> IntArray:
        """[N, N]: [i, j] scored shots of class i that leave-one-out classified as j."""
        out = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(out, (self.loo_labels, self.loo_predicted), 1)
        return out

    @property
    def name(self) -> str:
        return self.method.name

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "hyperparams": self.method.hyperparams,
            "loo_accuracy": self.loo_accuracy,
            "loo_nll": self.loo_nll,
            "temperature": self.temperature,
            "abstain_threshold": self.abstain_threshold,
            "loo_scored_shots": self.n_scored,
            "fallback": self.fallback,
        }


def abstain_threshold(confidence: FloatArray, correct: npt.NDArray[np.bool_]) -> float | None:
    right = np.sort(confidence[correct])
    if right.size < MIN_CORRECT_FOR_THRESHOLD:
        return None
    return float(np.quantile(right, 1.0 - ABSTAIN_KEEP_FRACTION))


@dataclass(frozen=True)
class Prediction:
    label: str | None
    top_k: list[tuple[str, float]]
    method: str
    reason: str | None = None
    evidence: list[tuple[int, str, float]] | None = None  # (shot, its class, cosine), nearest first


@dataclass(frozen=True)
class Task:
    tenant: str
    task_id: str
    name: str | None
    version: int
    created_at: float
    updated_at: float
    model_id: str
    backend: str
    views: int
    templates: tuple[str, ...]
    classes: tuple[ClassPrompts, ...]
    supports: TaskSupports  # the shots' features, labels and class text, shared read-only by every fit
    shot_seeds: IntArray  # [S], the augmentation seed of each shot
    fits: Mapping[str, MethodFit]
    method: str  # what classify uses unless told otherwise
    method_requested: str  # what the client asked for ("auto", a method name, or "default")
    # One small JPEG per shot (app.thumbnails' pack); empty for tasks stored before thumbnails existed.
    thumbnail_data: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros(0, np.uint8))
    thumbnail_offsets: IntArray = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.task_id)

    @property
    def shot_features(self) -> FloatArray:
        """[S * views, d] in shot order (rows s*views .. of shot s); a fresh array on every call."""
        return self.supports.view_features()

    @property
    def shot_labels(self) -> IntArray:
        """[S] in shot order."""
        return self.supports.shot_labels()

    @property
    def text(self) -> FloatArray:
        """[N, d] class text weights."""
        return self.supports.text

    @property
    def nbytes(self) -> int:
        """Bytes of the shared support and the thumbnails (what a memory budget counts; the fits add their own
        state)."""
        return self.supports.nbytes + int(self.shot_seeds.nbytes + self.thumbnail_data.nbytes)

    def thumbnail(self, shot: int) -> bytes | None:
        return thumbnails.thumbnail(self.thumbnail_data, self.thumbnail_offsets, shot)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def shot_counts(self) -> list[int]:
        return np.bincount(self.shot_labels, minlength=len(self.classes)).astype(int).tolist()  # type: ignore[no-any-return]

    def classify(
        self, features: FloatArray, *, method: str | None, top_k: int, abstain: bool, evidence: int = 0
    ) -> list[Prediction]:
        """Calibrated top-k per query row. CPU work (cache math, softmax): call it from a worker thread."""
        fit = self.fits[method or self.method]
        near: list[list[tuple[int, str, float]] | None] = [None] * features.shape[0]
        if evidence > 0:
            # The per-shot support's keys are label-sorted; source_rows maps them back to shot ids.
            per_shot = self.supports.per_shot
            index, cosine = nearest_shots(features, per_shot.keys, evidence)
            names_of = self.class_names
            near = [
                [
                    (int(per_shot.source_rows[r]), names_of[int(per_shot.labels[r])], float(c))
                    for r, c in zip(rows, cos, strict=True)
                ]
                for rows, cos in zip(index, cosine, strict=True)
            ]
        logits = fit.method.predict(features).astype(np.float64) / fit.temperature
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        names = self.class_names
        out = []
        for row, idx, shots in zip(probs, order, near, strict=True):
            ranked = [(names[i], float(row[i])) for i in idx]
            label: str | None = ranked[0][0]
            reason = None
            if abstain:
                if fit.abstain_threshold is None:
                    reason = (
                        f"no abstain threshold: it needs {MIN_CORRECT_FOR_THRESHOLD} or more shots that "
                        "leave-one-out classifies correctly (add shots); answered anyway"
                    )
                elif ranked[0][1] < fit.abstain_threshold:
                    label = None
                    reason = (
                        f"top probability {ranked[0][1]:.3f} is below the task's threshold "
                        f"{fit.abstain_threshold:.3f} (what 95% of correctly classified shots reached)"
                    )
            out.append(Prediction(label, ranked, fit.name, reason, shots))
        return out
