"""Leave-one-out hyper-parameter selection on the support set itself.

A service has only the shots, so each shot is scored by the cache built from all OTHER shots (every
row of its group masked out of the affinity), over a grid of hyper-parameters. Grid points are
compared by *calibrated* cross-entropy: each point's LOO logits get their own fitted temperature
before the cross-entropy is taken. Raw cross-entropy punishes over-confident logits so hard that it
prefers a weak cache (small alpha) even when a strong one ranks classes better; after calibration
the score measures how well a point ranks the classes, not how its logits happen to be scaled.
Ties (equal to 1e-6) go to the higher LOO accuracy, then to the earlier grid point.

Two corrections keep leave-one-out honest about what a real query meets:

- *Count correction.* A held-out shot's class has one shot fewer in the masked cache than any
  class has for a real query. For terms that SUM over a class's keys (Tip-Adapter's cache, APE's,
  Tip-X's KL penalty) that asymmetry alone moves the scores: the cache sum of the own class
  shrinks (LOO then prefers a weak cache, i.e. alpha too small), and Tip-X's penalty shrinks
  (LOO then rewards a huge gamma, 100% LOO accuracy with chance-level test accuracy, measured).
  The own class's sum is therefore rescaled by R_c / (R_c - g): its masked keys are imputed by the
  mean of the class's remaining ones. (`own_class_rescale`.)
- *Smoothed temperature.* Calibrating against one-hot targets sends the temperature to zero when
  the scored shots are all right, claiming certainty from a handful of images. The temperature is
  fitted against targets smoothed by LABEL_SMOOTHING (1% spread uniformly over the classes), so a
  perfectly separated support still gets a finite temperature (top probability about 0.99).

Cost: the affinity of the scored rows with all keys (at most `MAX_SCORED_ROWS` x M, computed in
`ROW_CHUNK` row blocks, so M = 16,000 keys stay in bounded memory), one exp per distinct cache
term (e.g. per beta), and one [rows, N] product plus a temperature fit per grid point. The cache
is never refitted per point.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._validation import FloatArray, IntArray, Support, segment_sums
from .tune_report import Hyperparams as Hyperparams
from .tune_report import TuneReport as TuneReport  # re-exported: the report of a search
from .tune_report import report_from_logits

Params = dict[str, float]
TermKey = tuple[float, ...]

MAX_SCORED_ROWS = 2048  # LOO rows scored per grid point; beyond this a fixed random subset is used
ROW_CHUNK = 256  # rows of the [rows, M] affinity matrix held at once
TERM_BUDGET_BYTES = 64 << 20  # cache terms ([rows, N] each) computed in one pass over the affinity
_MAX_LOG_STEP = float(np.log(8.0))  # temperature fit: at most a factor 8 per Newton step
_SEED = 0  # row subsampling is deterministic: the same support always picks the same rows
LABEL_SMOOTHING = 0.01  # of the temperature fit's targets (see the module docstring)


def scored_rows(support: Support, *, min_shots: int = 2, max_rows: int | None = None) -> IntArray:
    """Rows that leave-one-out can score: their class keeps >= 1 shot once their own shot is masked.

    At most `max_rows` (default MAX_SCORED_ROWS) rows, a fixed-seed random subset beyond that.
    """
    limit = MAX_SCORED_ROWS if max_rows is None else max_rows
    shots = support.shots_per_class()
    rows = np.flatnonzero(shots[support.labels] >= min_shots).astype(np.int64)
    if rows.size > limit:
        rng = np.random.default_rng(_SEED)
        rows = np.sort(rng.choice(rows, size=limit, replace=False))
    return rows


def own_group_entries(query_groups: IntArray, key_groups: IntArray) -> tuple[IntArray, IntArray]:
    """(row, key) index pairs where query row and key share a group, without a [rows, M] mask.

    A group holds a shot's few views, so there are ~rows * V pairs, found by binary search.
    """
    order = np.argsort(key_groups, kind="stable")
    sorted_groups = key_groups[order]
    first = np.searchsorted(sorted_groups, query_groups, side="left")
    counts = np.searchsorted(sorted_groups, query_groups, side="right") - first
    rows = np.repeat(np.arange(query_groups.size), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, order[np.repeat(first, counts) + offsets]


def own_class_rescale(support: Support, rows: IntArray) -> tuple[IntArray, FloatArray]:
    """(class, factor) per scored row: R_c / (R_c - g), R_c the rows of its class, g of its group.

    Multiplying the own-class sum of a masked cache term by the factor imputes the masked keys by
    the mean of the class's other keys, so the held-out shot meets a class of the same size as a real
    query does. Rows whose group is its whole class get factor 1 (nothing left to impute from; such
    rows are not scored anyway).
    """
    class_rows = np.bincount(support.labels, minlength=support.n_classes).astype(np.float64)
    _, group_index, group_rows = np.unique(support.groups, return_inverse=True, return_counts=True)
    own = support.labels[rows]
    remaining = class_rows[own] - group_rows[group_index[rows]]
    factor = np.where(remaining > 0, class_rows[own] / np.maximum(remaining, 1.0), 1.0)
    return own, factor.astype(np.float32)


def masked_affinity_chunks(
    queries: FloatArray, keys: FloatArray, query_groups: IntArray, key_groups: IntArray
) -> Iterator[tuple[slice, FloatArray, tuple[IntArray, IntArray]]]:
    """Yield (row slice, affinity chunk [r, M], own-group entries of the chunk) over the query rows."""
    for start in range(0, queries.shape[0], ROW_CHUNK):
        rows = slice(start, min(start + ROW_CHUNK, queries.shape[0]))
        affinity = queries[rows] @ keys.T
        yield rows, affinity, own_group_entries(query_groups[rows], key_groups)


def masked_cache_terms(
    support: Support,
    rows: IntArray,
    keys: FloatArray,
    specs: Sequence[tuple[float, FloatArray | None]],
) -> list[FloatArray]:
    """LOO cache terms exp(-beta * (1 - A)) @ (w * L) for each (beta, per-key weights w or None).

    A is the affinity of the scored `rows` with every row of `keys` (the support keys, or APE's
    re-normalised channel selection of them), computed once per row chunk and shared by all specs.
    Every key of a scored row's own group is zeroed, so a shot never votes for itself, and the own
    class's sum is count-corrected (`own_class_rescale`). Per chunk
    at most three [chunk, M] float32 arrays are alive (distance, decay, weighted decay).
    """
    out = [np.empty((rows.size, support.n_classes), dtype=np.float32) for _ in specs]
    betas = sorted({beta for beta, _ in specs})
    own_class, factor = own_class_rescale(support, rows)
    for chunk, affinity, own in masked_affinity_chunks(keys[rows], keys, support.groups[rows], support.groups):
        distance = np.subtract(np.float32(1.0), affinity, out=affinity)
        decay = np.empty_like(distance)
        weighted = None
        for beta in betas:
            np.exp(np.multiply(distance, np.float32(-beta), out=decay), out=decay)
            decay[own] = 0.0  # the scored shot's keys: out of its cache for every spec
            for term, (spec_beta, key_weights) in zip(out, specs, strict=True):
                if spec_beta != beta:
                    continue
                weights = decay
                if key_weights is not None:
                    weighted = np.empty_like(decay) if weighted is None else weighted
                    weights = np.multiply(decay, key_weights[None, :], out=weighted)
                term[chunk] = segment_sums(weights, support.labels, support.n_classes)
    positions = np.arange(rows.size)
    for term in out:
        term[positions, own_class] *= factor
    return out


class LooScorer(ABC):
    """A method's leave-one-out logits for the scored rows: Z + alpha * term(params) by default.

    A *term* is the expensive [rows, N] part (e.g. the cache sum for one beta). Terms that share a
    pass over the affinity (same `pass_key`) are computed together, at most TERM_BUDGET_BYTES at a
    time, and dropped once their grid points are scored, so memory does not grow with the grid.
    """

    def __init__(self, zero_shot: FloatArray) -> None:
        self.zero_shot = zero_shot

    def term_key(self, params: Mapping[str, float]) -> TermKey:
        return ()

    def pass_key(self, term: TermKey) -> Hashable:
        return ()

    @abstractmethod
    def compute_terms(self, terms: Sequence[TermKey]) -> list[FloatArray]: ...

    def combine(self, params: Mapping[str, float], term: FloatArray) -> FloatArray:
        return self.zero_shot + params["alpha"] * term

    def iter_logits(self, candidates: Sequence[Mapping[str, float]]) -> Iterator[tuple[int, FloatArray]]:
        """Yield (candidate index, LOO logits) for every candidate, in an order that shares work."""
        by_term: dict[TermKey, list[int]] = {}
        for i, params in enumerate(candidates):
            by_term.setdefault(self.term_key(params), []).append(i)
        by_pass: dict[Hashable, list[TermKey]] = {}
        for term_key in by_term:
            by_pass.setdefault(self.pass_key(term_key), []).append(term_key)
        per_batch = max(1, TERM_BUDGET_BYTES // max(1, self.zero_shot.nbytes))
        for term_keys in by_pass.values():
            for start in range(0, len(term_keys), per_batch):
                batch = term_keys[start : start + per_batch]
                for term_key, term in zip(batch, self.compute_terms(batch), strict=True):
                    for i in by_term[term_key]:
                        yield i, self.combine(candidates[i], term)

    def logits(self, params: Mapping[str, float]) -> FloatArray:
        return next(self.iter_logits([params]))[1]


def fit_temperature(
    logits: FloatArray, labels: IntArray, *, initial_temperature: float = 1.0, smoothing: float = LABEL_SMOOTHING
) -> tuple[float, float]:
    """Fit s > 0 minimising mean cross-entropy of softmax(s * logits) against the labels smoothed by
    `smoothing` (0: plain one-hot); return (1/s, that cross-entropy).

    The loss is convex in s; a bracketed Newton iteration on log s converges in 2-4 softmaxes from
    a nearby start (the search starts each fit at the previous grid point's temperature). The
    softmaxes run in float32 (7x faster than float64 exp; row sums and the loss are accumulated in
    float64), which moves the cross-entropy by far less than the 1e-6 the search compares at.
    s is kept within [1e-4, 1e4] / (mean logit spread): separable logits stop at the upper end.
    """
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)
    # The smoothed target's expected logit: (1 - eps) z_y + eps * mean_c z_c (module docstring).
    zy = (1.0 - smoothing) * z[np.arange(z.shape[0]), labels].astype(np.float64) + smoothing * z.mean(
        axis=1, dtype=np.float64
    )
    spread = float(np.mean(-z.min(axis=1))) or 1.0
    floor, ceiling = 1e-4 / spread, 1e4 / spread  # s * spread in [1e-4, 1e4] covers any sensible temperature

    buffer = np.empty_like(z)

    def loss_grad_hess(s: float) -> tuple[float, float, float]:
        e = np.exp(np.multiply(z, np.float32(s), out=buffer), out=buffer)
        total = e.sum(axis=1, dtype=np.float64)
        mean_z = np.einsum("ij,ij->i", e, z) / total
        second = np.einsum("ij,ij->i", np.multiply(e, z, out=e), z) / total
        loss = float(np.mean(np.log(total) - s * zy))
        return loss, float(np.mean(mean_z - zy)), float(np.mean(second - mean_z**2))

    # Newton on log s: the loss is far closer to quadratic in log s than in s (Newton in s
    # overshoots to negative s on confident logits), and a log step is scale-free.
    log_floor, log_ceiling = np.log(floor), np.log(ceiling)
    t = float(np.clip(-np.log(initial_temperature), log_floor, log_ceiling))
    loss, grad, hess = loss_grad_hess(float(np.exp(t)))
    lo, hi = -np.inf, np.inf  # bracket of the minimiser's log s, from the signs of evaluated slopes
    for _ in range(60):
        s = float(np.exp(t))
        slope, curvature = s * grad, s * s * hess + s * grad  # d/dt and d2/dt2 of the loss
        # Newton's predicted remaining decrease below 1e-10: the loss is final to far better than
        # the 1e-6 the search compares at (and than the float32 noise of the gradient).
        if curvature > 0 and slope * slope < 2e-10 * curvature:
            break
        if slope > 0:
            hi = t
        else:
            lo = t
        step = -slope / curvature if curvature > 0 else (-_MAX_LOG_STEP if slope > 0 else _MAX_LOG_STEP)
        t_new = float(np.clip(t + np.clip(step, -_MAX_LOG_STEP, _MAX_LOG_STEP), log_floor, log_ceiling))
        if not lo < t_new < hi and np.isfinite(lo) and np.isfinite(hi):
            t_new = 0.5 * (lo + hi)  # Newton left the bracket: bisect it
        if abs(t_new - t) <= 1e-7:
            break  # converged, or pinned at a bound (separable logits want s -> infinity)
        t = t_new
        loss, grad, hess = loss_grad_hess(float(np.exp(t)))
    s = float(np.exp(t))
    return 1.0 / s, loss


@dataclass(frozen=True)
class Score:
    nll: float
    accuracy: float
    temperature: float

    def key(self) -> tuple[float, float]:
        return (round(self.nll, 6), -self.accuracy)


def score_logits(logits: FloatArray, labels: IntArray, initial_temperature: float) -> Score:
    """Calibrated cross-entropy (own fitted temperature) and accuracy of one grid point's LOO logits."""
    temperature, nll = fit_temperature(logits, labels, initial_temperature=initial_temperature)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    return Score(nll=nll, accuracy=accuracy, temperature=temperature)


def _params_key(params: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(params.items()))


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

    Parameters start at `start`; each stage moves its parameters to the stage's best grid point
    (so every searched parameter ends on the grid); among equal scores the earlier grid point wins.
    Stages repeat for `rounds` passes or until a pass changes nothing. A single stage naming every
    grid parameter is an exhaustive product search. With nothing to search, `start` is scored.
    """
    seen: dict[tuple[tuple[str, float], ...], Score] = {}
    warm = 1.0  # temperature of the previous point: the next fit starts there

    def best_of(candidates: list[Params]) -> tuple[Params, Score, FloatArray | None]:
        """Score every candidate; return the best, its score, and its logits (None if scored before)."""
        nonlocal warm
        unique = list({_params_key(c): c for c in candidates}.values())
        todo = [i for i, c in enumerate(unique) if _params_key(c) not in seen]
        fresh_logits: dict[int, FloatArray] = {}
        best_index = -1
        for j, logits in scorer.iter_logits([unique[i] for i in todo]):
            score = score_logits(logits, labels, warm)
            warm = score.temperature
            seen[_params_key(unique[todo[j]])] = score
            if best_index < 0 or _rank(seen, unique, todo[j]) < _rank(seen, unique, best_index):
                best_index = todo[j]
                fresh_logits = {best_index: logits}  # hold one [rows, N] array, not one per point
        for i in range(len(unique)):
            if best_index < 0 or _rank(seen, unique, i) < _rank(seen, unique, best_index):
                best_index = i
        best = unique[best_index]
        return best, seen[_params_key(best)], fresh_logits.get(best_index)

    current: Params = dict(start)
    current_score: Score | None = None
    current_logits: FloatArray | None = None
    for _ in range(rounds):
        before = dict(current)
        for stage in stages:
            names = [n for n in stage if n in grid]
            if not names:
                continue
            candidates = [
                {**current, **dict(zip(names, values, strict=True))}
                for values in itertools.product(*(grid[n] for n in names))
            ]
            current, current_score, logits = best_of(candidates)
            current_logits = logits
        if current == before:
            break
    if current_score is None:
        current, current_score, current_logits = best_of([current])
    if current_logits is None:
        current_logits = scorer.logits(current)

    return report_from_logits(
        current,
        current_score.nll,
        current_score.accuracy,
        current_score.temperature,
        current_logits,
        labels,
        len(seen),
    )


def _rank(
    seen: Mapping[tuple[tuple[str, float], ...], Score], candidates: Sequence[Params], i: int
) -> tuple[float, float, int]:
    """Sort key of candidate i: lowest calibrated NLL (to 1e-6), then highest accuracy, then grid order."""
    nll, negative_accuracy = seen[_params_key(candidates[i])].key()
    return nll, negative_accuracy, i


def log_grid(low: float, high: float, per_decade: int) -> tuple[float, ...]:
    """Log-spaced values from low to high inclusive, `per_decade` steps per factor of ten."""
    n = round(float(np.log10(high / low)) * per_decade) + 1
    return tuple(float(v) for v in np.geomspace(low, high, n))
