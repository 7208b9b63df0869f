"""Leave-one-out hyper-parameter selection on the support set itself.

A service has only the shots, so each shot is scored by the cache built from all OTHER shots (every
row of its group masked out of the affinity), over a grid of hyper-parameters. Grid points are
compared by *calibrated* cross-entropy: each point's LOO logits get their own fitted temperature
before the cross-entropy is taken. Raw cross-entropy punishes over-confident logits so hard that it
prefers a weak cache (small alpha) even when a strong one ranks classes better; after calibration
the score measures how well a point ranks the classes, not how its logits happen to be scaled.
Ties (equal to 1e-6) go to the higher LOO accuracy.

Cost: the affinity of the scored rows with all keys (at most `max_rows` x M, computed in row chunks,
so M = 16,000 keys stay in bounded memory) plus one [rows, N] product per grid point. The cache is
never refitted per point.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ._validation import FloatArray, IntArray, Support

Params = dict[str, float]
Hyperparams = dict[str, float | int]

MAX_SCORED_ROWS = 2048  # LOO rows scored per grid point; beyond this a fixed random subset is used
ROW_CHUNK = 256  # rows of the affinity matrix held at once
_SEED = 0  # row subsampling is deterministic: the same support always picks the same rows


class LooScorer(Protocol):
    """A method's leave-one-out logits for the scored rows at given hyper-parameters."""

    def logits(self, params: Mapping[str, float]) -> FloatArray: ...


@dataclass(frozen=True)
class TuneReport:
    """What leave-one-out selection found; the service reports it and calibrates with it."""

    hyperparams: Hyperparams
    accuracy: float | None  # LOO accuracy at the chosen point (None when LOO was impossible)
    nll: float | None  # calibrated LOO cross-entropy at the chosen point
    temperature: float  # divide logits by this to calibrate them (1.0 when not fitted)
    n_scored: int  # rows that were scored
    fallback: str | None = None  # why defaults were used instead of a search, if they were
    confidence: FloatArray = field(default_factory=lambda: np.zeros(0, np.float32))  # max calibrated prob per row
    correct: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))  # argmax == label per row

    def to_dict(self) -> dict[str, object]:
        return {
            "hyperparams": dict(self.hyperparams),
            "loo_accuracy": self.accuracy,
            "loo_nll": self.nll,
            "temperature": self.temperature,
            "n_scored": self.n_scored,
            "fallback": self.fallback,
        }


def scored_rows(support: Support, *, min_shots: int = 2, max_rows: int = MAX_SCORED_ROWS) -> IntArray:
    """Rows that leave-one-out can score: their class keeps >= 1 shot once their own shot is masked."""
    shots = support.shots_per_class()
    rows = np.flatnonzero(shots[support.labels] >= min_shots).astype(np.int64)
    if rows.size > max_rows:
        rng = np.random.default_rng(_SEED)
        rows = np.sort(rng.choice(rows, size=max_rows, replace=False))
    return rows


def masked_affinity_chunks(
    queries: FloatArray, keys: FloatArray, query_groups: IntArray, key_groups: IntArray
) -> Iterator[tuple[slice, FloatArray, npt.NDArray[np.bool_]]]:
    """Yield (row slice, affinity chunk [r, M], own-group mask [r, M]) over the query rows."""
    for start in range(0, queries.shape[0], ROW_CHUNK):
        sl = slice(start, min(start + ROW_CHUNK, queries.shape[0]))
        aff = queries[sl] @ keys.T
        mask = query_groups[sl, None] == key_groups[None, :]
        yield sl, aff, mask


def log_softmax(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # type: ignore[no-any-return]


def fit_temperature(logits: FloatArray, labels: IntArray) -> tuple[float, float]:
    """Fit s > 0 minimising mean cross-entropy of softmax(s * logits); return (1/s, that cross-entropy).

    The loss is convex in s, so a safeguarded Newton iteration converges in a handful of softmaxes.
    """
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    zy = z[np.arange(z.shape[0]), labels]
    spread = float(z.std()) or 1.0
    lo, hi = 1e-4 / spread, 1e4 / spread  # s * spread in [1e-4, 1e4] covers any sensible temperature

    def loss_grad_hess(s: float) -> tuple[float, float, float]:
        e = np.exp(s * z)
        tot = e.sum(axis=1)
        p = e / tot[:, None]
        mean_z = (p * z).sum(axis=1)
        var_z = (p * z * z).sum(axis=1) - mean_z**2
        loss = float(np.mean(np.log(tot) - s * zy))
        return loss, float(np.mean(mean_z - zy)), float(np.mean(var_z))

    s = min(max(1.0, lo), hi)
    loss, grad, hess = loss_grad_hess(s)
    for _ in range(50):
        if grad > 0:
            hi = s
        else:
            lo = s
        step = s - grad / hess if hess > 1e-12 else np.inf
        s_new = step if lo < step < hi else (np.sqrt(lo * hi) if hi / lo > 1.0 + 1e-9 else s)
        if abs(s_new - s) <= 1e-6 * s:
            break
        s = float(s_new)
        loss, grad, hess = loss_grad_hess(s)
    return 1.0 / s, loss


@dataclass(frozen=True)
class _Score:
    nll: float
    accuracy: float
    temperature: float

    def key(self) -> tuple[float, float]:
        return (round(self.nll, 6), -self.accuracy)


def _score(logits: FloatArray, labels: IntArray) -> _Score:
    temperature, nll = fit_temperature(logits, labels)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    return _Score(nll=nll, accuracy=accuracy, temperature=temperature)


def search(
    scorer: LooScorer,
    labels: IntArray,
    start: Mapping[str, float],
    grid: Mapping[str, Sequence[float]],
    stages: Sequence[Sequence[str]],
    *,
    rounds: int = 2,
) -> TuneReport:
    """Coordinate search: each stage searches the product grid of its parameters, others held fixed.

    Stages repeat for `rounds` passes or until a pass changes nothing. A single stage naming every
    grid parameter is an exhaustive product search.
    """
    current: Params = dict(start)
    seen: dict[tuple[tuple[str, float], ...], _Score] = {}

    def evaluate(params: Params) -> _Score:
        key = tuple(sorted(params.items()))
        if key not in seen:
            seen[key] = _score(scorer.logits(params), labels)
        return seen[key]

    best = evaluate(current)
    for _ in range(rounds):
        before = dict(current)
        for stage in stages:
            names = [n for n in stage if n in grid]
            for values in itertools.product(*(grid[n] for n in names)):
                candidate = {**current, **dict(zip(names, values, strict=True))}
                score = evaluate(candidate)
                if score.key() < best.key():
                    best, current = score, candidate
        if current == before:
            break

    logits = scorer.logits(current) / best.temperature
    probs = np.exp(log_softmax(logits))
    return TuneReport(
        hyperparams=current,
        accuracy=best.accuracy,
        nll=best.nll,
        temperature=best.temperature,
        n_scored=int(labels.size),
        confidence=probs.max(axis=1).astype(np.float32),
        correct=np.argmax(logits, axis=1) == labels,
    )


def log_grid(low: float, high: float, per_decade: int) -> tuple[float, ...]:
    """Log-spaced values from low to high inclusive, `per_decade` steps per factor of ten."""
    n = int(round(np.log10(high / low) * per_decade)) + 1
    return tuple(float(v) for v in np.geomspace(low, high, n))
