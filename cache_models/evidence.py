"""Evidence for a prediction: the support shots nearest to the query, by cosine similarity."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def nearest_shots(queries: FloatArray, shots: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """For each L2-normalised query [Q, d], the k most similar of the L2-normalised shots [S, d].

    Returns (indices [Q, min(k, S)], cosines [Q, min(k, S)]), most similar first; ties keep the lower index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sims = np.asarray(queries, dtype=np.float32) @ np.asarray(shots, dtype=np.float32).T
    index = np.argsort(-sims, axis=1, kind="stable")[:, : min(k, sims.shape[1])].astype(np.int64)
    return index, np.take_along_axis(sims, index, axis=1).astype(np.float32)
