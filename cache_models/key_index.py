"""The cache's keys and their exact nearest-neighbour search (FAISS), without a copy of the keys.

Exact prediction needs the affinity of a query with every key: one GEMM against the keys. `top_k`
search is FAISS's exact brute-force k-NN (`faiss.knn`, inner product), run directly on the keys
array: no `IndexFlatIP` is built, because a flat index only holds a second copy of the same floats.
So every method fitted on one support searches the support's own (read-only) keys, and a task's
keys are held in memory once, however many methods are fitted on them.
"""

from __future__ import annotations

import faiss
import numpy as np

from ._validation import FloatArray, IntArray


class KeyIndex:
    """Read-only L2-normalised keys [M, d]; inner product == cosine similarity."""

    def __init__(self, keys: FloatArray) -> None:
        self._keys = np.ascontiguousarray(keys, dtype=np.float32)  # no copy for a support's own keys

    @classmethod
    def from_keys(cls, keys: FloatArray) -> KeyIndex:
        return cls(keys)

    @property
    def dim(self) -> int:
        return int(self._keys.shape[1])

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def vectors(self) -> FloatArray:
        """A read-only view of the keys [M, d] (the array searched; no copy)."""
        view = self._keys.view()
        view.flags.writeable = False
        return view

    def affinity(self, queries: FloatArray) -> FloatArray:
        """Cosine of every query with every key, [Q, M]."""
        return queries @ self._keys.T

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        """The k largest affinities per query and their key ids (exact search, k <= M)."""
        k = min(k, len(self))
        sims, ids = faiss.knn(
            np.ascontiguousarray(queries, dtype=np.float32), self._keys, k, metric=faiss.METRIC_INNER_PRODUCT
        )
        return sims.astype(np.float32), ids.astype(np.int64)
