"""Zero-shot CLIP: logits = scale * f W^T. The baseline every cache method adds to."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ._validation import FloatArray, Support
from .base import DEFAULT_SCALE, CacheMethod
from .tuning import MAX_SCORED_ROWS, LooScorer


class _ZeroShotScorer:
    def __init__(self, logits: FloatArray) -> None:
        self._logits = logits

    def logits(self, params: Mapping[str, float]) -> FloatArray:
        return self._logits


class ZeroShot(CacheMethod):
    """Ignores the cache; its "leave-one-out" score is simply zero-shot accuracy on the shots."""

    name = "zero-shot"
    defaults = {"scale": DEFAULT_SCALE}

    def _fit(self, support: Support) -> None:
        pass

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        return self.zero_shot_logits(queries)

    def _scored_rows(self, support: Support) -> np.ndarray:
        # No cache to leave out: every row is a fair test of the text classifier.
        rows = np.arange(support.n_rows, dtype=np.int64)
        if rows.size > MAX_SCORED_ROWS:
            rows = np.sort(np.random.default_rng(0).choice(rows, MAX_SCORED_ROWS, replace=False))
        return rows

    def _loo_scorer(self, support: Support, rows: np.ndarray) -> LooScorer:
        return _ZeroShotScorer(self.scale * (support.keys[rows] @ support.text.T))
