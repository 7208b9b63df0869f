"""Zero-shot CLIP: logits = scale * f W^T. The baseline every cache method adds to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np

from ._validation import FloatArray, IntArray, Support
from .base import DEFAULT_SCALE, CacheMethod, HyperValue
from .tuning import MAX_SCORED_ROWS, LooScorer, TermKey


class _ZeroShotScorer(LooScorer):
    def compute_terms(self, terms: Sequence[TermKey]) -> list[FloatArray]:
        return [self.zero_shot for _ in terms]

    def combine(self, params: Mapping[str, float], term: FloatArray) -> FloatArray:
        return self.zero_shot


class ZeroShot(CacheMethod):
    """Ignores the cache. Nothing to tune; `tune` still reports the zero-shot accuracy on the shots
    and the temperature that calibrates its logits."""

    name = "zero-shot"
    defaults: ClassVar[Mapping[str, HyperValue]] = {"scale": DEFAULT_SCALE}

    def _fit(self, support: Support) -> None:
        pass

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        return self.zero_shot_logits(queries)

    def _scored_rows(self, support: Support) -> IntArray:
        # No cache to leave out: every row is a fair test of the text classifier.
        rows = np.arange(support.n_rows, dtype=np.int64)
        if rows.size > MAX_SCORED_ROWS:
            rows = np.sort(np.random.default_rng(0).choice(rows, MAX_SCORED_ROWS, replace=False))
        return rows

    def _loo_scorer(self, support: Support, rows: IntArray) -> LooScorer:
        return _ZeroShotScorer(self.scale * (support.keys[rows] @ support.text.T))
