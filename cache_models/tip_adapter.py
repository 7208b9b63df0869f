"""Tip-Adapter (Zhang et al., ECCV 2022), training-free:

    logits = Z + alpha * exp(-beta * (1 - A)) @ L

Z = scale * f W^T, A = f F^T (query-key cosines), L the one-hot labels of the keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from ._validation import FloatArray, IntArray, Support
from .base import DEFAULT_SCALE, HyperValue
from .key_cache import IncrementalCacheMethod
from .key_index import KeyIndex
from .tuning import LooScorer, TermKey, log_grid, masked_cache_terms

# Default search. alpha spans six decades (log-spaced, relative to the model's logit scale) because
# the right mix of cache and text depends on how good the text prior is: ~1 for CLIP, thousands for
# a weak text tower. beta reaches 50, the top of the official Tip-Adapter / Tip-X / APE searches
# (most of the 11 official dataset configs search beta above 10; ImageNet's stays below 7). Every
# beta costs one exp over the [rows, M] affinity in leave-one-out, every alpha only a [rows, N] axpy.
ALPHA_GRID = log_grid(1e-2, 1e4, 3)
BETA_GRID = (0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 14.0, 20.0, 30.0, 50.0)


def cache_weights(affinity: FloatArray, beta: float) -> FloatArray:
    """exp(-beta * (1 - A)): each key's vote, 1 for an identical key, decaying with distance."""
    weights: FloatArray = np.exp(-beta * (1.0 - affinity))
    return weights


def alpha_grid(scale: float) -> tuple[float, ...]:
    """ALPHA_GRID relative to the logit scale: the cache competes with Z, which scales with it."""
    return tuple(a * scale / DEFAULT_SCALE for a in ALPHA_GRID)


class TipAdapterScorer(LooScorer):
    """LOO logits Z + alpha * C(beta); every C(beta) of a grid comes from one pass over the affinity."""

    def __init__(self, support: Support, rows: IntArray, scale: float) -> None:
        super().__init__(scale * (support.keys[rows] @ support.text.T))
        self.support, self.rows = support, rows

    def term_key(self, params: Mapping[str, float]) -> TermKey:
        return (params["beta"],)

    def compute_terms(self, terms: Sequence[TermKey]) -> list[FloatArray]:
        specs = [(beta, None) for (beta,) in terms]
        return masked_cache_terms(self.support, self.rows, self.support.keys, specs)


class TipAdapter(IncrementalCacheMethod):
    """Tip-Adapter. Paper defaults alpha = 1, beta = 1.

    Default grid: alpha in 19 log-spaced values over [1e-2, 1e4] * scale/100, beta in
    {0.5, 1, 2, 3, 5, 7, 10, 14, 20, 30, 50}; searched as one joint product (209 points).
    """

    name = "tip-adapter"
    defaults: ClassVar[Mapping[str, HyperValue]] = {"alpha": 1.0, "beta": 1.0, "scale": DEFAULT_SCALE}
    tunable = frozenset({"alpha", "beta"})

    def _fit(self, support: Support) -> None:
        self._index = KeyIndex.from_keys(support.keys)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        affinity, ids = self._neighbours(queries, top_k)
        cache = self._sum_by_class(cache_weights(affinity, float(self._hp["beta"])), ids)
        return self.zero_shot_logits(queries) + float(self._hp["alpha"]) * cache

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        return {"alpha": alpha_grid(self.scale), "beta": BETA_GRID}

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha", "beta")]

    def _loo_scorer(self, support: Support, rows: IntArray) -> LooScorer:
        return TipAdapterScorer(support, rows, self.scale)
