"""The cache's keys, held in a FAISS inner-product index.

Exact prediction needs the affinity of a query with every key, which is one GEMM against the index's
own storage (no copy, no sort). `top_k` search is FAISS's exact k-NN, used when only the nearest keys
should count.
"""

from __future__ import annotations

import faiss
import numpy as np

from ._validation import FloatArray, IntArray


class KeyIndex:
    """An `IndexFlatIP` over L2-normalised keys; inner product == cosine similarity."""

    def __init__(self, dim: int) -> None:
        self._index = faiss.IndexFlatIP(dim)

    @classmethod
    def from_keys(cls, keys: FloatArray) -> KeyIndex:
        out = cls(int(keys.shape[1]))
        out.add(keys)
        return out

    def to_bytes(self) -> np.ndarray:
        """The index serialised by FAISS (uint8), for the caller to persist."""
        blob: np.ndarray = faiss.serialize_index(self._index)
        return blob

    @classmethod
    def from_bytes(cls, blob: np.ndarray, *, dim: int, count: int) -> KeyIndex:
        """An index from `to_bytes` output; ValueError unless it is a flat IP index of [count, dim]."""
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        except RuntimeError as exc:  # FAISS reports unreadable data as RuntimeError
            raise ValueError(f"stored FAISS index is unreadable: {exc}") from None
        if not isinstance(index, faiss.IndexFlatIP) or index.d != dim or index.ntotal != count:
            raise ValueError(
                f"stored FAISS index is a {type(index).__name__} of {index.ntotal} x {index.d}, "
                f"expected IndexFlatIP of {count} x {dim}"
            )
        out = cls(dim)
        out._index = index
        return out

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, keys: FloatArray) -> None:
        if keys.shape[0]:
            self._index.add(np.ascontiguousarray(keys, dtype=np.float32))

    def vectors(self) -> FloatArray:
        """A read-only view of the stored keys [M, d] (FAISS's own buffer, no copy)."""
        n, d = len(self), self.dim
        if n == 0:
            return np.zeros((0, d), dtype=np.float32)
        view: FloatArray = faiss.rev_swig_ptr(self._index.get_xb(), n * d).reshape(n, d)
        view.flags.writeable = False
        return view

    def affinity(self, queries: FloatArray) -> FloatArray:
        """Cosine of every query with every key, [Q, M]."""
        return queries @ self.vectors().T

    def search(self, queries: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        """The k largest affinities per query and their key ids (exact search, k <= M)."""
        k = min(k, len(self))
        sims, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims.astype(np.float32), ids.astype(np.int64)
