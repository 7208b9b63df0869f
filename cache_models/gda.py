"""GDA (Wang et al., ICLR 2024): a Gaussian discriminant classifier on the image features,
added to the zero-shot logits. Shared covariance with the paper's shrinkage:

    P   = d * pinv((M' - 1) * Sigma + trace(Sigma) * I)
    G_c = P mu_c ;  b_c = log(1/N) - 1/2 mu_c^T P mu_c
    logits = Z + alpha * (f G^T + b)

Every augmented view is a sample of its own. No key search at prediction time (cost N * d), so
`top_k` does not apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._validation import FloatArray, IntArray, Support
from .base import DEFAULT_SCALE, CacheMethod
from .tuning import LooScorer, log_grid

ALPHA_GRID = log_grid(1e-4, 1e3, 3)  # the paper's {1e-4 .. 1e2}, extended up for weak text priors


def class_means(support: Support) -> tuple[np.ndarray, IntArray]:
    counts = np.bincount(support.labels, minlength=support.n_classes)
    if np.any(counts == 0):
        missing = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"gda: class {missing} has no keys; every class needs at least one sample")
    sums = np.zeros((support.n_classes, support.dim), dtype=np.float64)
    np.add.at(sums, support.labels, support.keys.astype(np.float64))
    return sums / counts[:, None], counts


def shrunk_precision(support: Support, means: np.ndarray) -> np.ndarray:
    """d * pinv((M'-1) * Sigma + trace(Sigma) * I), Sigma the unbiased covariance of centred samples."""
    m, d = support.n_rows, support.dim
    if m < 2:
        raise ValueError("gda: at least two samples are needed to estimate a covariance")
    centred = support.keys.astype(np.float64) - means[support.labels]
    scatter = centred.T @ centred  # == (M' - 1) * Sigma
    trace = float(np.trace(scatter)) / (m - 1)
    return d * np.linalg.pinv(scatter + trace * np.eye(d))  # type: ignore[no-any-return]


def discriminant(means: np.ndarray, precision: np.ndarray, n_classes: int) -> tuple[FloatArray, FloatArray]:
    weights = means @ precision  # precision is symmetric: rows are (P mu_c)^T
    bias = np.log(1.0 / n_classes) - 0.5 * np.sum(weights * means, axis=1)
    return weights.astype(np.float32), bias.astype(np.float32)


class _GdaScorer:
    """Leave-one-out GDA: the scored shot's rows are removed from its own class mean.

    The covariance (a statistic, not the cache) stays the full-support estimate; the class mean is
    what would otherwise let a shot vote for itself.
    """

    def __init__(self, support: Support, rows: IntArray, scale: float) -> None:
        s = support
        means, counts = class_means(s)
        precision = shrunk_precision(s, means)
        weights, bias = discriminant(means, precision, s.n_classes)
        x = s.keys[rows].astype(np.float64)
        self._zero_shot = scale * (s.keys[rows] @ s.text.T)
        term = x @ weights.T.astype(np.float64) + bias
        # Own-class mean without the scored row's whole group (all views of its shot).
        _, group_of = np.unique(s.groups, return_inverse=True)
        group_sums = np.zeros((int(group_of.max()) + 1, s.dim))
        np.add.at(group_sums, group_of, s.keys.astype(np.float64))
        group_sizes = np.bincount(group_of).astype(np.float64)
        g, own = group_of[rows], s.labels[rows]
        n_c = counts[own].astype(np.float64)
        loo_means = (n_c[:, None] * means[own] - group_sums[g]) / (n_c - group_sizes[g])[:, None]
        loo_weights = loo_means @ precision
        loo_bias = np.log(1.0 / s.n_classes) - 0.5 * np.sum(loo_weights * loo_means, axis=1)
        term[np.arange(rows.size), own] = np.sum(x * loo_weights, axis=1) + loo_bias
        self._term = term.astype(np.float32)

    def logits(self, params: Mapping[str, float]) -> FloatArray:
        return self._zero_shot + params["alpha"] * self._term  # type: ignore[no-any-return]


class GDA(CacheMethod):
    """Default alpha 1; default grid: 22 log-spaced alphas over [1e-4, 1e3] * scale/100."""

    name = "gda"
    defaults = {"alpha": 1.0, "scale": DEFAULT_SCALE}

    def _fit(self, support: Support) -> None:
        means, _ = class_means(support)
        self._weights, self._bias = discriminant(means, shrunk_precision(support, means), support.n_classes)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        term = queries @ self._weights.T + self._bias
        return self.zero_shot_logits(queries) + float(self._hp["alpha"]) * term  # type: ignore[no-any-return]

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        return {"alpha": tuple(a * self.scale / DEFAULT_SCALE for a in ALPHA_GRID)}

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha",)]

    def _loo_scorer(self, support: Support, rows: np.ndarray) -> LooScorer:
        return _GdaScorer(support, rows, self.scale)
