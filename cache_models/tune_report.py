"""What leave-one-out selection reports about its chosen point (the service shows it and calibrates with it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ._validation import FloatArray, IntArray

Hyperparams = dict[str, float | int]


@dataclass(frozen=True)
class TuneReport:
    """What leave-one-out selection found; the service reports it and calibrates with it."""

    hyperparams: Hyperparams
    accuracy: float | None  # LOO accuracy at the chosen point (None when LOO was impossible)
    nll: float | None  # calibrated LOO cross-entropy at the chosen point
    temperature: float  # divide logits by this to calibrate them (1.0 when not fitted)
    n_scored: int  # rows that were scored
    fallback: str | None = None  # why the starting values were kept without a search, if they were
    confidence: FloatArray = field(default_factory=lambda: np.zeros(0, np.float32))  # max calibrated prob per row
    correct: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))  # argmax == label per row
    rows: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))  # scored rows, caller's indexing
    labels: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))  # true class per scored row
    predicted: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))  # argmax class per scored row
    n_evaluated: int = 0  # grid points scored

    def to_dict(self) -> dict[str, object]:
        return {
            "hyperparams": dict(self.hyperparams),
            "loo_accuracy": self.accuracy,
            "loo_nll": self.nll,
            "temperature": self.temperature,
            "n_scored": self.n_scored,
            "n_evaluated": self.n_evaluated,
            "fallback": self.fallback,
        }

    def confusion(self, n_classes: int) -> IntArray:
        """[N, N] counts of scored rows: [i, j] rows of class i that leave-one-out predicted as j."""
        out = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(out, (self.labels, self.predicted), 1)
        return out


def report_from_logits(
    params: Mapping[str, float],
    nll: float,
    accuracy: float,
    temperature: float,
    logits: FloatArray,
    labels: IntArray,
    n_evaluated: int,
) -> TuneReport:
    """The report of the chosen point from its LOO logits and score (per-row evidence included)."""
    calibrated = logits / np.float32(temperature)
    # The top calibrated probability is 1 / sum_c exp(z_c - max z): no [rows, N] float64 softmax needed.
    shifted = calibrated - calibrated.max(axis=1, keepdims=True)
    confidence = (1.0 / np.exp(shifted).sum(axis=1, dtype=np.float64)).astype(np.float32)
    predicted = np.argmax(calibrated, axis=1).astype(np.int64)
    return TuneReport(
        hyperparams=dict(params),
        accuracy=accuracy,
        nll=nll,
        temperature=temperature,
        n_scored=int(labels.size),
        confidence=confidence,
        correct=predicted == labels,
        labels=np.asarray(labels, dtype=np.int64),
        predicted=predicted,
        n_evaluated=n_evaluated,
    )
