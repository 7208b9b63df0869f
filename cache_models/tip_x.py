"""Tip-X (SuS-X, Udandarao et al., ICCV 2023), service variant:

    p(x)     = softmax(x W^T / tau)
    KL[q, j] = sum_c p(f_q)_c (log p(f_q)_c - log p(F_j)_c)
    logits   = Z + alpha * exp(-beta * (1 - A)) @ L - gamma * psi(KL) @ L

psi rescales KL linearly into the cosine range. The paper takes its constants from the query batch;
here they are frozen at fit time from the support set (support x support KL and cosine, diagonal
excluded), so a query's logits never depend on the other queries in its request.

KL is computed in rank d, not N: log p(x)_c = x.w_c / tau - lse(x), so with u_q = p(f_q) W,
    KL[q, j] = (u_q . f_q - u_q . F_j) / tau + lse(F_j) - lse(f_q),
one [Q, d] x [d, M] product (the same shape as the affinity) instead of [Q, N] x [N, M], and no
[M, N] matrix of key log-probabilities to store. The lse offsets are centred on a constant so the
float32 sum does not cancel large numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ._validation import FloatArray, IntArray, Support, scatter_sums, segment_sums
from .base import DEFAULT_SCALE, HyperValue
from .key_cache import IncrementalCacheMethod
from .key_index import KeyIndex
from .tip_adapter import BETA_GRID, TipAdapterScorer, alpha_grid, cache_weights
from .tuning import ROW_CHUNK, LooScorer, log_grid, own_class_rescale, own_group_entries

GAMMA_GRID = (0.0, *log_grid(1e-2, 1e3, 2))  # relative to scale/100, like alpha
_POSTERIOR_BLOCK = 1024  # rows per posterior block: [block, N] float64


@dataclass(frozen=True)
class PsiRange:
    """The frozen constants of psi: the KL range mapped linearly onto the cosine range.

    With fewer than two keys there is no off-diagonal pair: every constant is 0 and psi == 0 (the
    KL term vanishes). With no KL spread (or one within float32 round-off, `KL_SPREAD_FLOOR`) psi maps
    everything to cos_min: there is no ordering to keep.
    """

    kl_min: float
    kl_max: float
    cos_min: float
    cos_max: float

    def __call__(self, kl: FloatArray) -> FloatArray:
        """psi(KL), elementwise. Overwrites and returns `kl` (a fresh [Q, M] matrix is not kept)."""
        kl -= np.float32(self.kl_min)
        kl *= np.float32(self.slope)
        kl += np.float32(self.cos_min)
        return kl

    @property
    def slope(self) -> float:
        span = self.kl_max - self.kl_min
        return (self.cos_max - self.cos_min) / span if span > 0 else 0.0

    def as_array(self) -> np.ndarray:
        return np.array([self.kl_min, self.kl_max, self.cos_min, self.cos_max], dtype=np.float64)


@dataclass(frozen=True)
class Posterior:
    """What KL needs of p(x) = softmax(x W^T / tau) for a set of rows x.

    mixed [n, d] = p(x) W;  offset [n] = lse(x) - c;  self_term [n] = u . x / tau - (lse(x) - c),
    so that KL(p(x_q) || p(x_j)) = self_term_q + offset_j - mixed_q . x_j / tau.
    """

    mixed: FloatArray
    offset: FloatArray
    self_term: FloatArray


def posterior(features: FloatArray, text: FloatArray, tau: float, centre: float) -> Posterior:
    """Posterior summaries of `features` [n, d], in row blocks so no [n, N] float64 matrix is held."""
    n = features.shape[0]
    mixed = np.empty((n, text.shape[1]), dtype=np.float32)
    offset = np.empty(n, dtype=np.float32)
    self_term = np.empty(n, dtype=np.float32)
    text64 = text.astype(np.float64)
    for start in range(0, n, _POSTERIOR_BLOCK):
        rows = slice(start, start + _POSTERIOR_BLOCK)
        x = features[rows].astype(np.float64)
        logits = (x @ text64.T) / tau
        top = logits.max(axis=1, keepdims=True)
        probs = np.exp(logits - top)
        total = probs.sum(axis=1, keepdims=True)
        probs /= total
        lse = (top + np.log(total))[:, 0]
        block_mixed = probs @ text64
        mixed[rows] = block_mixed
        offset[rows] = lse - centre
        self_term[rows] = np.einsum("nd,nd->n", block_mixed, x) / tau - (lse - centre)
    return Posterior(mixed, offset, self_term)


def kl_from_cross(cross: FloatArray, self_term: FloatArray, key_offset: FloatArray, tau: float) -> FloatArray:
    """KL[q, j] = self_term_q + offset_j - cross[q, j] / tau, computed in place in `cross`.

    `key_offset` is [M] (all keys) or shaped like `cross` (each query's own top-k keys).
    """
    cross /= np.float32(-tau)
    cross += self_term[:, None]
    cross += key_offset
    return cross


def kl_divergence(query: Posterior, keys: FloatArray, key_offset: FloatArray, tau: float) -> FloatArray:
    """KL(p_q || p_j) for every query q and key j, [Q, M]."""
    return kl_from_cross(query.mixed @ keys.T, query.self_term, key_offset, tau)


def _off_diagonal_range(values: FloatArray, diagonal: tuple[IntArray, IntArray]) -> tuple[float, float]:
    """(min, max) of a chunk without its diagonal entries (overwritten in place, cheaper than a mask)."""
    values[diagonal] = np.inf
    low = float(values.min())
    values[diagonal] = -np.inf
    return low, float(values.max())


# A support KL spread at or below this many float32 epsilons of 1/tau is round-off, not an ordering
# (see support_psi_range). Measured float32-vs-float64 KL error on the stand-in's real features:
# <= 4.3e-8 at tau 0.5 (0.2 eps/tau), so the floor sits ~350x above the noise; the smallest real
# spread seen, 2.1e-4 (textile-defects, 2 shots, class names the text tower barely tells apart),
# sits 14x above the floor.
KL_SPREAD_FLOOR = 64 * float(np.finfo(np.float32).eps)


def support_psi_range(keys: FloatArray, post: Posterior, tau: float) -> PsiRange:
    """min/max of support x support KL and cosine, diagonal excluded, in row chunks (bounded memory).

    The cosine matrix is symmetric, so each chunk of rows only meets the keys from its own first
    row on; KL is not, so it takes the full [chunk, M] product.
    """
    m = keys.shape[0]
    if m < 2:
        return PsiRange(0.0, 0.0, 0.0, 0.0)
    kmin = cmin = np.inf
    kmax = cmax = -np.inf
    for start in range(0, m, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, m)
        local = np.arange(stop - start)
        chunk = Posterior(post.mixed[start:stop], post.offset[start:stop], post.self_term[start:stop])
        kl = kl_divergence(chunk, keys, post.offset, tau)
        k_low, k_high = _off_diagonal_range(kl, (local, local + start))
        cos = keys[start:stop] @ keys[start:].T
        c_low, c_high = _off_diagonal_range(cos, (local, local))
        kmin, kmax = min(kmin, k_low), max(kmax, k_high)
        cmin, cmax = min(cmin, c_low), max(cmax, c_high)
    if kmax - kmin <= KL_SPREAD_FLOOR / tau:
        # A spread this small is float32 round-off (KL is a sum of terms of size ~1/tau), not an
        # ordering: mapping it onto the cosine range would multiply that noise by up to 1e7, and the
        # logits would depend on the order of the keys (one class: every KL is 0 in exact math).
        kmax = kmin
    return PsiRange(kmin, kmax, cmin, cmax)


class _Frozen:
    """Everything Tip-X derives from a support set at one tau (psi constants included)."""

    def __init__(self, support: Support, tau: float, psi: PsiRange | None = None) -> None:
        self.support, self.tau = support, tau
        lse_centre = float(np.log(support.n_classes))  # any constant works; this keeps offsets O(1/tau)
        self.centre = lse_centre
        self.keys = posterior(support.keys, support.text, tau, lse_centre)
        self.psi = psi if psi is not None else support_psi_range(support.keys, self.keys, tau)
        # Per-class sums that make the penalty's class sum exact in O(N d) per query (`penalty_sums`).
        self.class_counts = np.bincount(support.labels, minlength=support.n_classes).astype(np.float64)
        self.class_key_sums = support.class_sums()  # [N, d] float64
        self.class_offset_sums = np.bincount(
            support.labels, weights=self.keys.offset.astype(np.float64), minlength=support.n_classes
        )

    def dropped_votes(self, queries: FloatArray, affinity: FloatArray, ids: IntArray, beta: float) -> FloatArray:
        """The cache votes of the keys top-k dropped, imputed per class, [Q, N].

        The class's dropped keys are replaced by their mean cosine: n_dropped * exp(-beta * (1 - mean)).
        Their cosine sum is exact (the class's key sum minus the kept cosines), so this is O(N d) per
        query. Without it, truncation removes votes from the classes whose keys are all far but many,
        while the (full) penalty still counts every key of them.
        """
        labels = self.support.labels[ids]
        n = self.support.n_classes
        kept = scatter_sums(np.ones_like(affinity), labels, n).astype(np.float64)
        kept_cosine = scatter_sums(affinity, labels, n).astype(np.float64)
        dropped = self.class_counts - kept
        cosine = (queries.astype(np.float64) @ self.class_key_sums.T - kept_cosine) / np.maximum(dropped, 1.0)
        out: FloatArray = np.where(dropped > 0, dropped * np.exp(-beta * (1.0 - cosine)), 0.0).astype(np.float32)
        return out

    def penalty_sums(self, query: Posterior) -> FloatArray:
        """sum over each class's keys of psi(KL[q, j]), exactly, [Q, N].

        KL[q, j] = self_term_q + offset_j - mixed_q . F_j / tau is affine in the key, and psi is
        affine, so a class's sum needs only its key count, key sum and offset sum: no [Q, M] matrix.
        This is what `top_k` uses, so that truncating the cache's affinity term leaves the penalty
        whole (dropping far keys from it would drop the largest penalties: measured on cifar10-mini,
        16 shots, accuracy fell from 59% exact to 1% at top_k = 32).
        """
        psi, n = self.psi, self.class_counts
        kl = (
            query.self_term.astype(np.float64)[:, None] * n
            + self.class_offset_sums
            - (query.mixed.astype(np.float64) @ self.class_key_sums.T) / self.tau
        )
        out: FloatArray = (psi.slope * (kl - n * psi.kl_min) + n * psi.cos_min).astype(np.float32)
        return out


class _TipXScorer(TipAdapterScorer):
    """LOO logits Z + alpha * C(beta) - gamma * K, with K's psi constants frozen from the FULL support
    (a range statistic, like the fitted model's), the scored shot's keys masked from K too, and K's
    own-class sum count-corrected like the cache term (without it, LOO rewards a huge gamma)."""

    def __init__(self, frozen: _Frozen, rows: IntArray, scale: float) -> None:
        s = frozen.support
        super().__init__(s, rows, scale)
        self._kl_term = np.empty((rows.size, s.n_classes), dtype=np.float32)
        post = frozen.keys
        for start in range(0, rows.size, ROW_CHUNK):
            chunk = slice(start, start + ROW_CHUNK)
            scored = rows[chunk]
            query = Posterior(post.mixed[scored], post.offset[scored], post.self_term[scored])
            penalty = frozen.psi(kl_divergence(query, s.keys, post.offset, frozen.tau))
            penalty[own_group_entries(s.groups[scored], s.groups)] = 0.0
            self._kl_term[chunk] = segment_sums(penalty, s.labels, s.n_classes)
        own_class, factor = own_class_rescale(s, rows)
        self._kl_term[np.arange(rows.size), own_class] *= factor  # count correction (tuning.py)

    def combine(self, params: Mapping[str, float], term: FloatArray) -> FloatArray:
        logits: FloatArray = self.zero_shot + params["alpha"] * term - params["gamma"] * self._kl_term
        return logits


class TipX(IncrementalCacheMethod):
    """Tip-X with support-frozen psi. Defaults alpha = 1, beta = 1, gamma = 0.1, tau = 0.5 (SuS-X).

    Default grid: alpha and beta as Tip-Adapter; gamma in {0} and 11 log-spaced values over
    [1e-2, 1e3] * scale/100. Staged: (alpha, beta), then (alpha, gamma), repeated until stable.
    tau is not tuned. Fitting costs one M x M pass (the psi constants), O(M^2 d).
    """

    name = "tip-x"
    defaults: ClassVar[Mapping[str, HyperValue]] = {
        "alpha": 1.0,
        "beta": 1.0,
        "gamma": 0.1,
        "tau": 0.5,
        "scale": DEFAULT_SCALE,
    }
    tunable = frozenset({"alpha", "beta", "gamma"})
    _frozen: _Frozen
    _pending: _Frozen | None = None  # derived by _loo_scorer, reused by the fit that ends tune()

    def few_shot_rule(self, support: Support, temperature: float) -> dict[str, float]:
        # Nothing measures the KL penalty's worth from one shot per class: leave it out.
        return {**super().few_shot_rule(support, temperature), "gamma": 0.0}

    def _derive(self, support: Support, psi: PsiRange | None = None) -> _Frozen:
        tau = float(self._hp["tau"])
        pending = self._pending
        if psi is None and pending is not None and pending.support is support and pending.tau == tau:
            return pending  # tune() already computed it for this very support
        return _Frozen(support, tau, psi)

    def _fit(self, support: Support, psi: PsiRange | None = None) -> None:
        frozen = copy.copy(self._derive(support, psi))
        # predict needs only the keys' offsets: their [M, d] posterior mix serves leave-one-out alone,
        # and keeping it would hold a second copy of the keys' size per task.
        empty = np.zeros((0, support.dim), dtype=np.float32)
        frozen.keys = Posterior(empty, frozen.keys.offset, frozen.keys.self_term)
        self._pending = None
        self._index = KeyIndex.from_keys(support.keys)
        self._frozen = frozen

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        hp, frozen = self._hp, self._frozen
        affinity, ids = self._neighbours(queries, top_k)
        query = posterior(queries, frozen.support.text, frozen.tau, frozen.centre)
        if ids is None:
            kl = kl_divergence(query, frozen.support.keys, frozen.keys.offset, frozen.tau)
            penalty = self._sum_by_class(frozen.psi(kl), None)
        else:  # top_k truncates the affinity term only; the penalty stays the full sum
            penalty = frozen.penalty_sums(query)
        beta = float(hp["beta"])
        cache = self._sum_by_class(cache_weights(affinity, beta), ids)
        if ids is not None:
            cache += frozen.dropped_votes(queries, affinity, ids, beta)
        logits: FloatArray = self.zero_shot_logits(queries) + float(hp["alpha"]) * cache - float(hp["gamma"]) * penalty
        return logits

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        relative = self.scale / DEFAULT_SCALE
        return {
            "alpha": alpha_grid(self.scale),
            "beta": BETA_GRID,
            "gamma": tuple(g * relative for g in GAMMA_GRID),
        }

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha", "beta"), ("alpha", "gamma")]

    def _loo_scorer(self, support: Support, rows: IntArray) -> LooScorer:
        self._pending = self._derive(support)
        return _TipXScorer(self._pending, rows, self.scale)

    @property
    def psi_range(self) -> PsiRange:
        """The psi constants in use (frozen from the fitted support)."""
        self._require_fitted()
        return self._frozen.psi

    def _extra_state(self) -> dict[str, np.ndarray]:
        # Recomputing psi is O(M^2 d); store it with the tau it belongs to.
        return {**super()._extra_state(), "psi": np.append(self._frozen.psi.as_array(), self._frozen.tau)}

    def _restore(self, support: Support, state: Mapping[str, np.ndarray]) -> None:
        stored = np.asarray(state.get("psi", np.zeros(0)), dtype=np.float64)
        psi = None
        if stored.shape == (5,) and np.all(np.isfinite(stored)) and stored[4] == float(self._hp["tau"]):
            psi = PsiRange(*(float(v) for v in stored[:4]))
        self._fit(support, psi)
