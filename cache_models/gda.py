"""GDA (Wang et al., ICLR 2024): a Gaussian discriminant classifier on the image features,
added to the zero-shot logits. Shared covariance with the paper's shrinkage:

    P   = d * pinv((M' - 1) * Sigma + trace(Sigma) * I)
    G_c = P mu_c ;  b_c = log(1/N) - 1/2 mu_c^T P mu_c
    logits = Z + alpha * (f G^T + b)

Every augmented view is a sample of its own. No key search at prediction time (cost N * d), so
`top_k` does not apply. Every class needs at least one sample (its mean defines the class).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from ._validation import BoolArray, FloatArray, IntArray, Support, make_support
from .base import DEFAULT_SCALE, CacheMethod, HyperValue
from .tuning import LooScorer, TermKey, log_grid

F64 = npt.NDArray[np.float64]

_BLOCK = 4096  # sample rows converted to float64 at once
ALPHA_GRID = log_grid(1e-4, 1e3, 3)  # the paper's {1e-4 .. 1e2}, extended up for weak text priors
# The few-shot rule (cache_models.few_shot): alpha = this x the shots' zero-shot temperature. Chosen on
# simulated 2-shot tasks from the TRAIN splits of both shared data sets (docs/benchmarks.md).
FEW_SHOT_ALPHA_PER_TEMPERATURE = 0.003


def class_means(support: Support) -> tuple[F64, IntArray]:
    """mu_c [N, d] (float64) and the sample count of each class."""
    counts = np.bincount(support.labels, minlength=support.n_classes)
    if np.any(counts == 0):
        missing = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"gda: class {missing} has no keys; every class needs at least one sample")
    return support.class_sums() / counts[:, None], counts.astype(np.int64)


def scatter_and_shrinkage(support: Support, means: F64) -> tuple[F64, float]:
    """(M'-1) * Sigma (the scatter of the centred samples, [d, d]) and trace(Sigma).

    The centred samples x - mu_y sum to zero, so (M'-1) * Sigma is exactly their scatter matrix.
    """
    m, d = support.n_rows, support.dim
    if m < 2:
        raise ValueError("gda: at least two samples are needed to estimate a covariance")
    scatter = np.zeros((d, d), dtype=np.float64)  # accumulated over row blocks
    for start in range(0, m, _BLOCK):
        rows = slice(start, start + _BLOCK)
        centred = support.keys[rows].astype(np.float64) - means[support.labels[rows]]
        scatter += centred.T @ centred
    return scatter, float(np.trace(scatter)) / (m - 1)


def discriminant(support: Support, means: F64) -> tuple[F64, F64]:
    """G [N, d] (rows P mu_c) and b [N], with P = d * pinv((M'-1) * Sigma + trace(Sigma) * I).

    The scatter is positive semi-definite and trace(Sigma) > 0, so the matrix is positive definite and its
    pseudo-inverse is its inverse (condition number <= ~M'). G needs P only applied to the N means, so it is
    one solve with N right-hand sides, in place in the scatter: no inverse is formed (a third of its
    flops) and no second [d, d] matrix is allocated.
    """
    scatter, trace = scatter_and_shrinkage(support, means)
    d, n_classes = support.dim, support.n_classes
    if trace <= 0.0:
        # No within-class spread: the matrix is zero and its pseudo-inverse is zero.
        weights = np.zeros_like(means)
    else:
        scatter[np.diag_indices(d)] += trace
        weights = d * np.linalg.solve(scatter, means.T).T.astype(np.float64, copy=False)  # (P mu_c)^T: P is symmetric
    del scatter
    bias = np.log(1.0 / n_classes) - 0.5 * np.sum(weights * means, axis=1)
    return weights, bias


class CovarianceWithout:
    """GDA's discriminant for given class means with the covariance of the whole support's residuals
    WITHOUT one class's, for any class: `weights(c)`.

    As in the leave-one-out scorer, only the shrinkage scalar trace(Sigma) keeps its full-support
    value; the scatter without class c is S - R_c^T R_c (R_c: c's residuals, a few rows), so with
    B = (S + trace(Sigma) I)^-1 formed once, (S - R_c^T R_c + trace I)^-1 = B + B R_c^T (I - R_c B
    R_c^T)^-1 R_c B (Woodbury): one [d, d] inverse per fold, then per class a tiny solve."""

    def __init__(self, support: Support, means: F64) -> None:
        full_means, _ = class_means(support)
        scatter, shrinkage = scatter_and_shrinkage(support, full_means)
        self._labels = support.labels
        self._residuals = support.keys.astype(np.float64) - full_means[support.labels]
        self._means = means
        self._dim = support.dim
        self._spread = shrinkage > 0.0
        if self._spread:
            scatter[np.diag_indices(support.dim)] += shrinkage
            self._inverse = np.linalg.inv(scatter)
            self._inverse_means = self._inverse @ means.T  # B mu^T [d, N]

    def weights(self, excluded: int) -> tuple[F64, F64]:
        """G [N, d] and b [N], the covariance without class `excluded`'s residuals."""
        if not self._spread:  # no spread: P = 0, as in `discriminant`
            weights = np.zeros_like(self._means)
        else:
            own = self._residuals[self._labels == excluded]  # R_c [n_c, d]
            inverse_own = self._inverse @ own.T  # B R_c^T [d, n_c]
            capacitance = np.eye(own.shape[0]) - own @ inverse_own
            correction = inverse_own @ np.linalg.solve(capacitance, own @ self._inverse_means)
            weights = self._dim * (self._inverse_means + correction).T
        bias = np.log(1.0 / self._means.shape[0]) - 0.5 * np.sum(weights * self._means, axis=1)
        return weights, bias


class _GdaScorer(LooScorer):
    """Leave-one-out GDA: the scored shot's rows (all its views) leave both its class mean AND the
    covariance; only the shrinkage scalar trace(Sigma) keeps its full-support value.

    With fewer samples than dimensions every sample's residual is a leading direction of the
    covariance, so a full-support covariance lets the held-out shot shrink its own distance to its
    class: LOO accuracy near 100% and a near-zero temperature, measured on 6-shot CIFAR-10. Removing
    the shot from the scatter is a rank-(g + 2) change (its g rows, the old and the new class mean):

        S' = S - sum_j x_j x_j^T + n mu mu^T - n' mu' mu'^T = S + U D U^T,

    so with B = (S + lambda I)^-1 the held-out precision is B - B U (D^-1 + U^T B U)^-1 U^T B
    (Woodbury): per shot, one [d, d] x [d, g + 2] product and a tiny solve, never a new inverse.
    """

    def __init__(self, support: Support, rows: IntArray, scale: float) -> None:
        s = support
        super().__init__(scale * (s.keys[rows] @ s.text.T))
        means, counts = class_means(s)
        scatter, shrinkage = scatter_and_shrinkage(s, means)
        log_prior = float(np.log(1.0 / s.n_classes))
        if shrinkage <= 0.0:  # no spread: P = 0 and every class scores log(1/N), as in the fit
            self._term = np.full((rows.size, s.n_classes), log_prior, dtype=np.float32)
            return
        d = s.dim
        inverse = np.linalg.inv(scatter + shrinkage * np.eye(d))
        inverse_means = inverse @ means.T  # [d, N]
        mean_quadratic = np.einsum("nd,dn->n", means, inverse_means)  # mu_k^T B mu_k
        term = np.empty((rows.size, s.n_classes), dtype=np.float64)
        position = {int(r): i for i, r in enumerate(rows)}
        order = np.argsort(s.groups, kind="stable")
        bounds = np.flatnonzero(np.diff(s.groups[order])) + 1
        for members in np.split(order, bounds):
            scored = [position[int(r)] for r in members if int(r) in position]
            if not scored:
                continue
            label = int(s.labels[members[0]])
            n, g = float(counts[label]), members.size
            x_group = s.keys[members].astype(np.float64)
            loo_mean = (n * means[label] - x_group.sum(axis=0)) / (n - g)
            basis = np.vstack([x_group, means[label], loo_mean]).T  # U [d, g + 2]
            inverse_basis = inverse @ basis  # B U
            capacitance = np.diag(np.r_[-np.ones(g), 1.0 / n, -1.0 / (n - g)]) + basis.T @ inverse_basis
            correction = np.linalg.solve(capacitance, inverse_basis.T)  # (D^-1 + U^T B U)^-1 U^T B
            x = s.keys[rows[scored]].astype(np.float64)
            # every class k != own: mu_k unchanged, precision downdated
            projected = inverse_basis.T @ means.T  # U^T B mu_k, [g + 2, N]
            solved = correction @ means.T  # (D^-1 + U^T B U)^-1 U^T B mu_k
            linear = x @ inverse_means - (x @ inverse_basis) @ solved
            quadratic = mean_quadratic - np.einsum("rn,rn->n", projected, solved)
            block = d * (linear - 0.5 * quadratic) + log_prior
            # own class: its leave-one-out mean under the downdated precision
            own_direction = inverse_basis[:, -1] - inverse_basis @ (correction @ loo_mean)
            block[:, label] = d * (x @ own_direction - 0.5 * loo_mean @ own_direction) + log_prior
            term[scored] = block
        self._term = term.astype(np.float32)

    def compute_terms(self, terms: Sequence[TermKey]) -> list[FloatArray]:
        return [self._term for _ in terms]


class GDA(CacheMethod):
    """GDA. Default alpha 1.

    Default grid: 22 log-spaced alphas over [1e-4, 1e3] * scale/100 (the paper searches
    {1e-4, ..., 1e2} at scale 100).
    """

    name = "gda"
    defaults: ClassVar[Mapping[str, HyperValue]] = {"alpha": 1.0, "scale": DEFAULT_SCALE}
    tunable = frozenset({"alpha"})
    per_view = True  # each augmented view is a sample of its class's Gaussian

    def _fit(self, support: Support) -> None:
        means, _ = class_means(support)
        weights, bias = discriminant(support, means)
        self._weights, self._bias = weights.astype(np.float32), bias.astype(np.float32)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        term = queries @ self._weights.T + self._bias
        return self.zero_shot_logits(queries) + float(self._hp["alpha"]) * term

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        return {"alpha": tuple(a * self.scale / DEFAULT_SCALE for a in ALPHA_GRID)}

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha",)]

    def held_out_fold(self, support: Support, train: BoolArray, test: BoolArray, *, retune: bool = False) -> FloatArray:
        """One fold of `auto`'s comparison. When a scored class keeps a single shot in the fold (two
        shots per class: every fold), the fold alone has no within-class spread for that class and
        a plain refit's covariance is empty for all of them (GDA would score as zero-shot while the
        task it stands for has a covariance). Then the means still come from the fold's shots only
        (so every method meets each class through the same shots), and each scored class's
        covariance from the whole support's residuals WITHOUT that class (`CovarianceWithout`; only the
        shrinkage scalar keeps its full-support value, as in leave-one-out)."""
        train_support = make_support(support.keys[train], support.labels[train], support.text, support.groups[train])
        scored = np.unique(support.labels[test])
        if int(train_support.shots_per_class()[scored].min()) >= 2:
            return super().held_out_fold(support, train, test, retune=retune)
        means, _ = class_means(train_support)
        queries = support.keys[test]
        labels = support.labels[test]
        term = np.empty((queries.shape[0], support.n_classes), dtype=np.float64)
        covariance = CovarianceWithout(support, means)
        for label in scored:
            rows = labels == label
            weights, bias = covariance.weights(int(label))
            term[rows] = queries[rows].astype(np.float64) @ weights.T + bias
        zero_shot = self.scale * (queries @ support.text.T)
        return (zero_shot + float(self._hp["alpha"]) * term).astype(np.float32)

    def few_shot_rule(self, support: Support, temperature: float) -> dict[str, float]:
        return {"alpha": FEW_SHOT_ALPHA_PER_TEMPERATURE * temperature}

    def _loo_scorer(self, support: Support, rows: IntArray) -> LooScorer:
        return _GdaScorer(support, rows, self.scale)
