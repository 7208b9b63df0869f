"""Shared machinery of the methods whose cache is a set of keys searched by affinity."""

from __future__ import annotations

from typing import Self

import numpy as np

from ._validation import (
    FloatArray,
    IntArray,
    Support,
    as_features,
    as_index_vector,
    make_support,
    scatter_sums,
    segment_sums,
)
from .base import CacheMethod
from .key_index import KeyIndex
from .tuning import TuneReport, fit_temperature

# The single-shot rule (one shot per class, so leave-one-out has nothing to score). The cache should
# weigh more the less the text knows, and the zero-shot temperature fitted on the shots themselves
# measures exactly that (zero-shot needs no held-out cache, so it can always be fitted): near the
# logit scale's own units for an informative text prior, thousands when the class names mean nothing
# to the model. alpha = 16 * that temperature and beta = 3 were chosen by simulating 1-shot tasks on
# the TRAIN splits of the benchmark data sets (docs/benchmarks.md), never on their test splits.
SINGLE_SHOT_ALPHA_PER_TEMPERATURE = 16.0
SINGLE_SHOT_BETA = 3.0


class KeyCacheMethod(CacheMethod):
    """A method whose cache term sums per-key weights by class over (all or the top-k) keys.

    `_index` holds the keys the method searches (the support keys, or APE's selected channels)
    in the support's label-sorted order, so a key id is also a row of `support.labels`.
    """

    _index: KeyIndex

    def _neighbours(self, queries: FloatArray, top_k: int | None) -> tuple[FloatArray, IntArray | None]:
        """Affinities with all keys ([Q, M], ids None) or with each query's top-k keys ([Q, k], ids)."""
        if top_k is None or top_k >= len(self._index):
            return self._index.affinity(queries), None
        return self._index.search(queries, top_k)

    def _single_shot_fallback(self, support: Support) -> TuneReport:
        zero_shot = (self.scale * (support.keys @ support.text.T)).astype(np.float32)
        temperature, _ = fit_temperature(zero_shot, support.labels)
        rule = self.few_shot_rule(support, temperature)
        params = {**self._float_params(), **rule}
        others = "".join(f", {k} = {v:g}" for k, v in rule.items() if k not in ("alpha", "beta"))
        return TuneReport(
            hyperparams=params,
            accuracy=None,
            nll=None,
            # logits / T keep the zero-shot part calibrated; the cache's share cannot be measured.
            temperature=temperature,
            n_scored=0,
            fallback=f"one shot per class: leave-one-out cannot score the cache, so alpha = "
            f"{SINGLE_SHOT_ALPHA_PER_TEMPERATURE:g} x the zero-shot temperature fitted on the shots "
            f"({temperature:.4g}) and beta = {SINGLE_SHOT_BETA:g}{others} (the single-shot rule)",
        )

    def few_shot_rule(self, support: Support, temperature: float) -> dict[str, float]:
        """The key caches' single-shot rule, also their few-shot rule at two shots (cache_models.few_shot)."""
        return {"alpha": SINGLE_SHOT_ALPHA_PER_TEMPERATURE * temperature, "beta": SINGLE_SHOT_BETA}

    def _sum_by_class(self, values: FloatArray, ids: IntArray | None) -> FloatArray:
        """values [Q, M or k] summed per class of their key -> [Q, N]."""
        support = self._require_fitted()
        if ids is None:
            return segment_sums(values, support.labels, support.n_classes)
        return scatter_sums(values, support.labels[ids], support.n_classes)


class IncrementalCacheMethod(KeyCacheMethod):
    """A key cache that grows by new shots or classes without the caller re-supplying old keys."""

    def add(self, keys: object, labels: object, text: object | None = None, groups: object | None = None) -> Self:
        """Add keys [m, d] with labels [m]; `text` holds rows [n_new, d] for NEW classes only,
        which take label ids N, N+1, ... after the existing ones. `keys` may be empty when only
        classes are added. `groups` (shot ids, same id space as the fitted ones) default to new
        shots numbered after the largest existing group.

        The fitted state afterwards equals a fresh `fit` on the old keys followed by the new ones
        (with the old and new groups), because it is one: the cache keeps its own copy of the
        support, so only the new rows are needed from the caller.
        """
        old = self._require_fitted()
        new_keys = as_features(keys, "keys", dim=old.dim, allow_empty=text is not None)
        text_all = old.text
        if text is not None:
            text_all = np.concatenate([old.text, as_features(text, "text", dim=old.dim)])
        new_labels = as_index_vector(labels, "labels", length=new_keys.shape[0], upper=text_all.shape[0])
        if groups is None:
            first = int(old.groups.max()) + 1 if old.n_rows else 0
            new_groups = np.arange(first, first + new_keys.shape[0], dtype=np.int64)
        else:
            new_groups = as_index_vector(groups, "groups", length=new_keys.shape[0])
        merged = make_support(
            np.concatenate([old.keys, new_keys]),
            np.concatenate([old.labels, new_labels]),
            text_all,
            np.concatenate([old.groups, new_groups]),
        )
        self._fit(merged)
        self._support = merged
        return self
