"""Shared machinery of the methods whose cache is a set of keys searched by affinity."""

from __future__ import annotations

from typing import Self

import numpy as np

from ._validation import FloatArray, IntArray, Support, as_features, make_support, scatter_sums, segment_sums
from .base import CacheMethod
from .key_index import KeyIndex


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
        sims, ids = self._index.search(queries, top_k)
        return sims, ids

    def _sum_by_class(self, values: FloatArray, ids: IntArray | None) -> FloatArray:
        support = self._require_fitted()
        if ids is None:
            return segment_sums(values, support.labels, support.n_classes)
        return scatter_sums(values, support.labels[ids], support.n_classes)

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {"index": self._index.to_bytes()}


class IncrementalCacheMethod(KeyCacheMethod):
    """A key cache that grows by new shots or classes without the caller re-supplying old keys."""

    def add(self, keys: object, labels: object, text: object | None = None, groups: object | None = None) -> Self:
        """Add keys [m, d] with labels [m]; `text` holds rows [n_new, d] for NEW classes only,
        which take label ids N, N+1, ... after the existing ones. `groups` default to new shots.

        The fitted state afterwards equals a fresh `fit` on the old keys followed by the new ones.
        """
        old = self._require_fitted()
        new_keys = as_features(keys, "keys", dim=old.dim)
        text_all = old.text
        if text is not None:
            text_all = np.concatenate([old.text, as_features(text, "text", dim=old.dim)])
        if groups is None:
            first = int(old.groups.max()) + 1 if old.n_rows else 0
            groups = np.arange(first, first + new_keys.shape[0], dtype=np.int64)
        new_labels = np.asarray(labels)
        if new_labels.ndim != 1 or new_labels.shape[0] != new_keys.shape[0]:
            raise ValueError(f"labels must be 1-D with {new_keys.shape[0]} entries (one per new key)")
        groups_arr = np.asarray(groups)
        if groups_arr.ndim != 1 or groups_arr.shape[0] != new_keys.shape[0]:
            raise ValueError(f"groups must be 1-D with {new_keys.shape[0]} entries (one per new key)")
        merged = make_support(
            np.concatenate([old.keys, new_keys]),
            np.concatenate([old.labels, new_labels]),
            text_all,
            np.concatenate([old.groups, groups_arr]),
        )
        self._grow(old, merged)
        self._support = merged
        return self

    def _grow(self, old: Support, merged: Support) -> None:
        """Refit on the merged support; subclasses may reuse what `old` already computed."""
        self._fit(merged)
