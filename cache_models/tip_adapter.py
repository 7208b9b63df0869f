"""Tip-Adapter (Zhang et al., ECCV 2022), training-free:

logits = Z + alpha * exp(-beta * (1 - A)) @ L
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._validation import FloatArray, Support, segment_sums
from .base import DEFAULT_SCALE
from .key_cache import IncrementalCacheMethod
from .key_index import KeyIndex
from .tuning import LooScorer, log_grid, masked_affinity_chunks

# Default search. alpha spans six decades (log-spaced, relative to the model's logit scale) because
# the right mix of cache and text depends on how good the text prior is: ~1 for CLIP, thousands for
# a weak text tower. beta covers the sharpness values used across the Tip-Adapter/APE configs.
ALPHA_GRID = log_grid(1e-2, 1e4, 3)
BETA_GRID = (0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0)


def cache_weights(affinity: FloatArray, beta: float) -> FloatArray:
    """exp(-beta * (1 - A)): each key's vote, 1 for an identical key, decaying with distance."""
    return np.exp(-beta * (1.0 - affinity)).astype(np.float32)  # type: ignore[no-any-return]


def alpha_grid(scale: float) -> tuple[float, ...]:
    return tuple(a * scale / DEFAULT_SCALE for a in ALPHA_GRID)


class TipAdapterScorer:
    """LOO logits Z + alpha * C(beta); C is computed once per beta and reused across alphas."""

    def __init__(self, support: Support, rows: np.ndarray, scale: float) -> None:
        self._support = support
        self._rows = rows
        self._zero_shot = scale * (support.keys[rows] @ support.text.T)
        self._cache: dict[float, FloatArray] = {}

    def cache_term(self, beta: float) -> FloatArray:
        if beta not in self._cache:
            s, rows = self._support, self._rows
            out = np.empty((rows.size, s.n_classes), dtype=np.float32)
            for sl, aff, mask in masked_affinity_chunks(s.keys[rows], s.keys, s.groups[rows], s.groups):
                weights = cache_weights(aff, beta)
                weights[mask] = 0.0  # leave the scored shot (all its rows) out of its own cache
                out[sl] = segment_sums(weights, s.labels, s.n_classes)
            self._cache[beta] = out
        return self._cache[beta]

    def logits(self, params: Mapping[str, float]) -> FloatArray:
        return self._zero_shot + params["alpha"] * self.cache_term(params["beta"])  # type: ignore[no-any-return]


class TipAdapter(IncrementalCacheMethod):
    """Default grid: alpha in 19 log-spaced values over [1e-2, 1e4] * scale/100, beta in
    {0.5, 1, 2, 3, 5, 7, 10}; searched as one joint product."""

    name = "tip-adapter"
    defaults = {"alpha": 1.0, "beta": 1.0, "scale": DEFAULT_SCALE}

    def _fit(self, support: Support) -> None:
        self._index = KeyIndex.from_keys(support.keys)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        aff, ids = self._neighbours(queries, top_k)
        cache = self._sum_by_class(cache_weights(aff, float(self._hp["beta"])), ids)
        return self.zero_shot_logits(queries) + float(self._hp["alpha"]) * cache  # type: ignore[no-any-return]

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        return {"alpha": alpha_grid(self.scale), "beta": BETA_GRID}

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha", "beta")]

    def _loo_scorer(self, support: Support, rows: np.ndarray) -> LooScorer:
        return TipAdapterScorer(support, rows, self.scale)
