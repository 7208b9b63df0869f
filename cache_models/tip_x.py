"""Tip-X (SuS-X, Udandarao et al., ICCV 2023), service variant:

    p(x)     = softmax(x W^T / tau)
    KL[q, j] = sum_c p(f_q)_c (log p(f_q)_c - log p(F_j)_c)
    logits   = Z + alpha * exp(-beta * (1 - A)) @ L - gamma * psi(KL) @ L

psi rescales KL linearly into the cosine range. The paper takes its constants from the query batch;
here they are frozen at fit time from the support set (support x support KL and cosine, diagonal
excluded), so a query's logits never depend on the other queries in its request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ._validation import FloatArray, IntArray, Support, segment_sums
from .base import DEFAULT_SCALE
from .key_cache import IncrementalCacheMethod
from .key_index import KeyIndex
from .tip_adapter import BETA_GRID, TipAdapterScorer, alpha_grid, cache_weights
from .tuning import ROW_CHUNK, LooScorer, log_grid, log_softmax, masked_affinity_chunks

GAMMA_GRID = (0.0, *log_grid(1e-2, 1e3, 2))  # relative to scale/100, like alpha


@dataclass(frozen=True)
class PsiRange:
    """The frozen constants of psi: KL range mapped linearly onto the cosine range."""

    kl_min: float
    kl_max: float
    cos_min: float
    cos_max: float

    def __call__(self, kl: FloatArray) -> FloatArray:
        span = self.kl_max - self.kl_min
        # A support with no KL spread (e.g. one key) maps every KL to cos_min: no ordering to keep.
        slope = (self.cos_max - self.cos_min) / span if span > 0 else 0.0
        return ((kl - self.kl_min) * slope + self.cos_min).astype(np.float32)  # type: ignore[no-any-return]

    def as_array(self) -> FloatArray:
        return np.array([self.kl_min, self.kl_max, self.cos_min, self.cos_max], dtype=np.float64)  # type: ignore[return-value]


def text_log_probs(features: FloatArray, text: FloatArray, tau: float) -> FloatArray:
    """log softmax(x W^T / tau) per row: the class distribution Tip-X compares images by."""
    return log_softmax((features @ text.T) / tau).astype(np.float32)


def kl_divergence(log_p_query: FloatArray, log_p_keys: FloatArray) -> FloatArray:
    """KL(p_q || p_j) for every query q and key j, [Q, M]."""
    p_query = np.exp(log_p_query)
    neg_entropy = np.sum(p_query * log_p_query, axis=1, keepdims=True)
    return (neg_entropy - p_query @ log_p_keys.T).astype(np.float32)  # type: ignore[no-any-return]


def support_psi_range(keys: FloatArray, log_p: FloatArray) -> PsiRange:
    """min/max of support x support KL and cosine, diagonal excluded, in row chunks (bounded memory)."""
    m = keys.shape[0]
    if m < 2:
        return PsiRange(0.0, 0.0, 0.0, 0.0)
    kmin = cmin = np.inf
    kmax = cmax = -np.inf
    for start in range(0, m, ROW_CHUNK):
        stop = min(start + ROW_CHUNK, m)
        off_diagonal = np.ones((stop - start, m), dtype=bool)
        off_diagonal[np.arange(stop - start), np.arange(start, stop)] = False
        kl = kl_divergence(log_p[start:stop], log_p)[off_diagonal]
        cos = (keys[start:stop] @ keys.T)[off_diagonal]
        kmin, kmax = min(kmin, float(kl.min())), max(kmax, float(kl.max()))
        cmin, cmax = min(cmin, float(cos.min())), max(cmax, float(cos.max()))
    return PsiRange(kmin, kmax, cmin, cmax)


class _TipXScorer(TipAdapterScorer):
    def __init__(self, support: Support, rows: IntArray, scale: float, tau: float) -> None:
        super().__init__(support, rows, scale)
        s = support
        log_p = text_log_probs(s.keys, s.text, tau)
        psi = support_psi_range(s.keys, log_p)
        self._kl_term = np.empty((rows.size, s.n_classes), dtype=np.float32)
        for sl, _, mask in masked_affinity_chunks(s.keys[rows], s.keys, s.groups[rows], s.groups):
            penalty = psi(kl_divergence(log_p[rows[sl]], log_p))
            penalty[mask] = 0.0  # the scored shot's own keys are out of the cache for this term too
            self._kl_term[sl] = segment_sums(penalty, s.labels, s.n_classes)

    def logits(self, params: Mapping[str, float]) -> FloatArray:
        return super().logits(params) - params["gamma"] * self._kl_term  # type: ignore[no-any-return]


class TipX(IncrementalCacheMethod):
    """Default grid: alpha and beta as Tip-Adapter; gamma in {0} and 11 log-spaced values over
    [1e-2, 1e3] * scale/100. Staged: (alpha, beta), then (alpha, gamma), repeated until stable."""

    name = "tip-x"
    defaults = {"alpha": 1.0, "beta": 1.0, "gamma": 0.1, "tau": 0.5, "scale": DEFAULT_SCALE}

    def _fit(self, support: Support) -> None:
        tau = float(self._hp["tau"])
        if tau <= 0:
            raise ValueError(f"tip-x: tau must be positive, got {tau}")
        self._index = KeyIndex.from_keys(support.keys)
        self._log_p_keys = text_log_probs(support.keys, support.text, tau)
        self._psi = support_psi_range(support.keys, self._log_p_keys)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        hp = self._hp
        aff, ids = self._neighbours(queries, top_k)
        log_p_query = text_log_probs(queries, self._require_fitted().text, float(hp["tau"]))
        if ids is None:
            kl = kl_divergence(log_p_query, self._log_p_keys)
        else:  # only the same top-k keys' KL, gathered per query
            p_query = np.exp(log_p_query)
            neg_entropy = np.sum(p_query * log_p_query, axis=1, keepdims=True)
            kl = neg_entropy - np.einsum("qc,qkc->qk", p_query, self._log_p_keys[ids])
        cache = self._sum_by_class(cache_weights(aff, float(hp["beta"])), ids)
        penalty = self._sum_by_class(self._psi(kl.astype(np.float32)), ids)
        return self.zero_shot_logits(queries) + float(hp["alpha"]) * cache - float(hp["gamma"]) * penalty  # type: ignore[no-any-return]

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        rel = self.scale / DEFAULT_SCALE
        return {"alpha": alpha_grid(self.scale), "beta": BETA_GRID, "gamma": tuple(g * rel for g in GAMMA_GRID)}

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha", "beta"), ("alpha", "gamma")]

    def _loo_scorer(self, support: Support, rows: np.ndarray) -> LooScorer:
        return _TipXScorer(support, rows, self.scale, float(self._hp["tau"]))

    @property
    def psi_range(self) -> PsiRange:
        self._require_fitted()
        return self._psi
