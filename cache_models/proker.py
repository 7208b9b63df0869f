"""ProKeR (Bendou et al., CVPR 2025), training-free: kernel ridge regression on the zero-shot residual.

    K = exp(-beta * (1 - F F^T))        R = L - F W^T  (raw cosines)
    A = (K / lam + I)^-1 R              logits = scale * (f W^T + exp(-beta * (1 - f F^T)) A)

lam both regularises and scales the cache: the fitted support predictions are K A = lam * H R with
H = K (K + lam I)^-1, so lam -> 0 is zero-shot and lam >> the kernel's eigenvalues interpolates the
residual scaled by lam.

Leave-one-out without refits (methods.md): with K = U diag(e) U^T, I - H = U diag(lam / (e + lam)) U^T,
and the prediction for a held-out group g (all rows of one shot) of the ridge fitted without it is
R_g - E_g with E_g = ((I - H)_gg)^-1 ((I - H) R)_g. One eigendecomposition per beta; every lam is then
matrix products ([rows, M] x [M, N]) and one g x g solve per multi-view group.

Cost and what the service does at scale (measured in docs/benchmarks.md, "Tune time"; 2 shared cores):
- tune: an [M, M] float64 eigendecomposition per beta (8 betas), O(M^3). At M = 16,000 (1000 classes
  x 16 shots) that is about 10 minutes per beta (extrapolated from 73 s measured at M = 8,192) and
  2 GB per matrix, so leave-one-out runs on at most TUNE_MAX_KEYS rows: whole classes, a fixed-seed
  random subset of them (every shot of a chosen class is kept, so each held-out shot still meets its
  class's other shots; the ridge's target columns are independent per class, so the chosen
  (beta, lam) transfers to the full support). Measured at d = 1280: 0.27 s (N = 10), 8.1 s
  (N = 100), 16.8 s (N = 1000, fit included).
- fit: exact (one [M, M] float64 solve) up to EXACT_MAX_KEYS rows. Above, a Nystrom
  (subset-of-regressors) ridge on NYSTROM_LANDMARKS fixed-seed landmark keys Z:
  A_Z = lam * (K_ZS K_SZ + lam K_ZZ)^-1 K_ZS R, logits = scale * (f W^T + k(f, Z) A_Z),
  accumulated over key blocks: O(M m^2) time and [m, m] memory instead of O(M^3) and [M, M] (the
  exact fit at M = 16,000 would hold a 2 GB float64 matrix; its float32 Cholesky alone took 13 s).
  Measured: 7.2 s at M = 16,000, d = 1280.
- predict: M * d + M * N per query (m instead of M under Nystrom). `top_k` does not apply: the
  coefficients A are signed, so dropping keys is not an approximation from below; it is ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from ._validation import FloatArray, IntArray, Support, make_support
from .base import DEFAULT_SCALE, CacheMethod, HyperValue
from .few_shot import single_shot_report, typical_distance
from .tuning import LooScorer, TermKey, TuneReport, log_grid

F64 = npt.NDArray[np.float64]

# beta: the official searches span 0.1-10 (DTD) and 0.5-3 (Caltech); ImageNet's transferred values are
# 1.5-3. lam: the official searches are linear over [0.001, 1] and [0.001, 10]; log-spaced here
# (lam scales the cache as well as regularising it) and extended to 100 for weak text priors.
BETA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0)
LAM_GRID = log_grid(1e-3, 1e2, 3)
TUNE_MAX_KEYS = 1024  # leave-one-out rows beyond this: a class subset (module docstring)
EXACT_MAX_KEYS = 2048  # exact ridge solve up to this many keys, Nystrom above
NYSTROM_LANDMARKS = 2048
# The few-shot rule (cache_models.few_shot), chosen on simulated 1- and 2-shot tasks from the TRAIN splits
# of both shared data sets (10 draws each, docs/benchmarks.md); the paper's defaults stay at zero-shot where
# the text prior is weak (textile-defects with the stand-in: 33.5% at 1 shot, chance).
# - lam = FEW_SHOT_LAM_PER_TEMPERATURE x the shots' zero-shot temperature / scale (the cache weighs more the
#   less the text knows), at most FEW_SHOT_MAX_LAM. K has a unit diagonal, so its mean eigenvalue is 1: far
#   above it A -> R, the cache's weight no longer grows and only the ridge's decorrelation is lost (on
#   textile-defects, temperature ~3e4, the uncapped rule gave lam ~ 2e4: 61.7% at 2 shots, capped 65.2%).
# - beta = FEW_SHOT_BETA_PER_DISTANCE / the shots' median cosine distance (the median heuristic of kernel
#   bandwidths): ~1 on cifar10-mini's photos (distance ~0.5), ~15 on textile-defects' fabric (~0.03).
#   A fixed beta had to trade one data set against the other (beta = 1 fell to 43% on textile at 1 shot).
#   Without a pair of distinct shots, FEW_SHOT_BETA.
FEW_SHOT_LAM_PER_TEMPERATURE = 30.0
FEW_SHOT_MAX_LAM = 3.0
FEW_SHOT_BETA_PER_DISTANCE = 0.5
FEW_SHOT_BETA = 5.0
MIN_DISTANCE = 1e-3  # near-duplicate shots: beta stays at most FEW_SHOT_BETA_PER_DISTANCE / 1e-3 = 500
_SEED = 0
_BLOCK = 2048  # key rows per kernel block of the Nystrom fit

# ImageNet-transferred (beta, lam) per shot count, from the paper's released configuration.
TRANSFERRED = {1: (3.0, 0.05), 2: (2.6, 0.05), 4: (1.5, 0.05), 8: (1.66, 0.07), 16: (1.7, 0.1)}


def kernel(x: npt.NDArray[np.floating], y: npt.NDArray[np.floating], beta: float) -> F64:
    """exp(-beta * (1 - x y^T)) in float64, in place on the product (one [n, m] array)."""
    out: F64 = x.astype(np.float64) @ y.astype(np.float64).T
    out -= 1.0
    out *= beta
    return np.exp(out, out=out)


def residual_targets(support: Support) -> F64:
    """R = L - F W^T, [M, N] float64."""
    residual = -(support.keys.astype(np.float64) @ support.text.astype(np.float64).T)
    residual[np.arange(support.n_rows), support.labels] += 1.0
    return residual


def class_subset(support: Support, max_rows: int) -> IntArray | None:
    """Rows (label-sorted indices) of a fixed-seed random subset of whole classes holding at most
    `max_rows` rows, or None when the support is small enough already. At least two classes."""
    if support.n_rows <= max_rows:
        return None
    counts = np.bincount(support.labels, minlength=support.n_classes)
    order = np.random.default_rng(_SEED).permutation(support.n_classes)
    kept: list[int] = []
    total = 0
    for c in order:
        if total + counts[c] > max_rows and len(kept) >= 2:
            continue
        kept.append(int(c))
        total += int(counts[c])
    return np.flatnonzero(np.isin(support.labels, kept)).astype(np.int64)


class _ProkerScorer(LooScorer):
    """Closed-form leave-group-out logits for every (beta, lam); one eigendecomposition per beta."""

    def __init__(self, support: Support, rows: IntArray, scale: float) -> None:
        super().__init__(scale * (support.keys[rows] @ support.text.T))
        self.support, self.rows, self.scale = support, rows, scale
        self.residual = residual_targets(support)
        keys = support.keys.astype(np.float64)
        self.cosine = keys @ keys.T
        # Every group that holds a scored row: all of its rows (positions in the support).
        position = np.full(support.n_rows, -1, dtype=np.int64)
        position[rows] = np.arange(rows.size)
        order = np.argsort(support.groups, kind="stable")
        bounds = np.flatnonzero(np.diff(support.groups[order])) + 1
        singles, blocks = [], []
        for members in np.split(order, bounds):
            if np.all(position[members] < 0):
                continue
            if members.size == 1:
                singles.append(int(members[0]))
            else:
                blocks.append(members)
        self.singles = np.array(singles, dtype=np.int64)
        self.blocks = blocks
        self.position = position

    def term_key(self, params: Mapping[str, float]) -> TermKey:
        return (params["beta"], params["lam"])

    def pass_key(self, term: TermKey) -> Hashable:
        return term[0]

    def compute_terms(self, terms: Sequence[TermKey]) -> list[FloatArray]:
        beta = terms[0][0]
        eigenvalues, vectors = np.linalg.eigh(np.exp(-beta * (1.0 - self.cosine)))
        eigenvalues = np.maximum(eigenvalues, 0.0)  # K is PSD; round-off below 0 is not a direction
        projected = vectors.T @ self.residual  # U^T R, [M, N]
        squared_singles = vectors[self.singles] ** 2
        out = []
        for _, lam in terms:
            weights = lam / (eigenvalues + lam)  # eigenvalues of I - H
            held_out = np.empty((self.rows.size, self.support.n_classes), dtype=np.float64)
            if self.singles.size:
                smoothed = vectors[self.singles] @ (weights[:, None] * projected)  # ((I - H) R)_g
                diagonal = squared_singles @ weights  # (I - H)_gg
                error = smoothed / diagonal[:, None]
                held_out[self.position[self.singles]] = self.residual[self.singles] - error
            for members in self.blocks:
                u = vectors[members]
                smoothed = u @ (weights[:, None] * projected)
                error = np.linalg.solve((u * weights) @ u.T, smoothed)
                scored = self.position[members] >= 0
                held_out[self.position[members[scored]]] = self.residual[members[scored]] - error[scored]
            out.append((self.scale * lam * held_out).astype(np.float32))
        return out

    def combine(self, params: Mapping[str, float], term: FloatArray) -> FloatArray:
        return self.zero_shot + term


class ProKeR(CacheMethod):
    """ProKeR. Defaults beta = 1.7, lam = 0.1 (the paper's ImageNet-transferred 16-shot values).

    Default grid: beta in BETA_GRID (8 values over the official 0.5-10), lam in 16 log-spaced values
    over [1e-3, 1e2]; one joint product (128 points), one eigendecomposition per beta.
    """

    name = "proker"
    defaults: ClassVar[Mapping[str, HyperValue]] = {"beta": 1.7, "lam": 0.1, "scale": DEFAULT_SCALE}
    tunable = frozenset({"beta", "lam"})
    positive_params = frozenset({"scale", "beta", "lam"})

    _landmark_rows: IntArray  # support rows the cache term is expanded over: all, or the Nystrom landmarks
    _landmarks: FloatArray  # those keys (the support's own array when exact: no copy)
    _coefficients: FloatArray  # A, [len(landmarks), N]

    def _fit(self, support: Support) -> None:
        beta, lam = float(self._hp["beta"]), float(self._hp["lam"])
        residual = residual_targets(support)
        if support.n_rows <= EXACT_MAX_KEYS:
            system = kernel(support.keys, support.keys, beta) / lam
            system[np.diag_indices_from(system)] += 1.0
            self._landmark_rows = np.arange(support.n_rows, dtype=np.int64)
            self._landmarks = support.keys
            self._coefficients = np.linalg.solve(system, residual).astype(np.float32)
            return
        picked = np.sort(np.random.default_rng(_SEED).choice(support.n_rows, NYSTROM_LANDMARKS, replace=False))
        landmarks = np.ascontiguousarray(support.keys[picked])
        # K_ZS K_SZ and K_ZS R accumulated over key blocks: never an [M, m] matrix.
        gram = kernel(landmarks, landmarks, beta)
        gram *= lam
        rhs = np.zeros((landmarks.shape[0], support.n_classes), dtype=np.float64)
        for start in range(0, support.n_rows, _BLOCK):
            block = slice(start, start + _BLOCK)
            cross = kernel(support.keys[block], landmarks, beta)  # K_SZ rows, [block, m]
            gram += cross.T @ cross
            rhs += cross.T @ residual[block]
        gram[np.diag_indices_from(gram)] += 1e-9 * float(np.trace(gram)) / gram.shape[0]  # K_ZZ may be singular
        self._landmark_rows = picked.astype(np.int64)
        self._landmarks = landmarks
        self._coefficients = (lam * np.linalg.solve(gram, rhs)).astype(np.float32)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        beta = float(self._hp["beta"])
        cache = np.exp(np.float32(-beta) * (np.float32(1.0) - queries @ self._landmarks.T)) @ self._coefficients
        logits: FloatArray = self.zero_shot_logits(queries) + np.float32(self.scale) * cache
        return logits

    def tune_support(
        self, support: Support, grid: Mapping[str, Sequence[HyperValue]] | None = None
    ) -> dict[str, HyperValue]:
        """`CacheMethod.tune_support` (what `tune` and the service's shared-support fits both call), with
        leave-one-out on a class subset above TUNE_MAX_KEYS rows (module docstring); the chosen values
        are then fitted on the whole support."""
        subset = class_subset(support, TUNE_MAX_KEYS)
        if subset is None:
            return super().tune_support(support, grid)
        classes, sub_labels = np.unique(support.labels[subset], return_inverse=True)
        sub = make_support(support.keys[subset], sub_labels, support.text[classes], support.groups[subset])
        super().tune_support(sub, grid)
        report = self.tune_report
        if report is not None:  # rows of the subset -> the caller's indexing
            self.tune_report = dataclasses.replace(report, rows=support.source_rows[subset[report.rows]])
        self._fit(support)
        self._support = support
        return self.hyperparams

    def few_shot_rule(self, support: Support, temperature: float) -> dict[str, float]:
        distance = typical_distance(support)
        beta = FEW_SHOT_BETA if distance is None else FEW_SHOT_BETA_PER_DISTANCE / max(distance, MIN_DISTANCE)
        lam = min(FEW_SHOT_LAM_PER_TEMPERATURE * temperature / self.scale, FEW_SHOT_MAX_LAM)
        return {"beta": beta, "lam": lam}

    def _single_shot_fallback(self, support: Support) -> TuneReport | None:
        return single_shot_report(self, support)

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        return {"beta": BETA_GRID, "lam": LAM_GRID}

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("beta", "lam")]

    def _loo_scorer(self, support: Support, rows: IntArray) -> LooScorer:
        return _ProkerScorer(support, rows, self.scale)

    def _extra_state(self) -> dict[str, np.ndarray]:
        # The solve is O(M^3) (or O(M m^2)): store its result, and which keys it expands over.
        return {"coefficients": self._coefficients, "landmark_rows": self._landmark_rows}

    def _restore(self, support: Support, state: Mapping[str, np.ndarray]) -> None:
        coefficients, rows = state.get("coefficients"), state.get("landmark_rows")
        if (
            coefficients is None
            or rows is None
            or rows.ndim != 1
            or coefficients.shape != (rows.size, support.n_classes)
            or (rows.size and (rows.min() < 0 or rows.max() >= support.n_rows))
        ):
            self._fit(support)  # older or partial state: refit
            return
        self._landmark_rows = np.asarray(rows, dtype=np.int64)
        exact = rows.size == support.n_rows and np.array_equal(rows, np.arange(support.n_rows))
        self._landmarks = support.keys if exact else np.ascontiguousarray(support.keys[self._landmark_rows])
        self._coefficients = np.ascontiguousarray(coefficients, dtype=np.float32)
