"""Glue between encoded shots and the cache methods, shared by the service and `shotcache eval`.

Shots are encoded under V views (methods.md). Every method but GDA caches one key per shot, the
re-normalised mean of its views; GDA keeps each view as a sample of its own, grouped by shot so
leave-one-out masks all of a shot's views together.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from cache_models import CacheMethod, get_method

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

PER_VIEW_METHODS = frozenset({"gda"})


def method_inputs(
    method: str, view_features: FloatArray, shot_labels: IntArray, views: int
) -> tuple[FloatArray, IntArray, IntArray]:
    """(keys, labels, groups) for `method` from [S * views, d] view features of S shots."""
    shots = shot_labels.shape[0]
    if view_features.shape[0] != shots * views:
        raise ValueError(f"{view_features.shape[0]} view rows for {shots} shots x {views} views")
    if method in PER_VIEW_METHODS:
        return (
            view_features,
            np.repeat(shot_labels, views),
            np.repeat(np.arange(shots, dtype=np.int64), views),
        )
    return shot_keys(view_features, shots, views), shot_labels, np.arange(shots, dtype=np.int64)


def shot_keys(view_features: FloatArray, shots: int, views: int) -> FloatArray:
    """One unit vector per shot from [shots * views, d]: its views' mean direction."""
    if views == 1:
        return view_features
    mean = view_features.reshape(shots, views, -1).mean(axis=1)
    keys: FloatArray = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
    return keys


def build_method(
    method: str,
    view_features: FloatArray,
    shot_labels: IntArray,
    text: FloatArray,
    views: int,
    *,
    scale: float,
    hyperparams: Mapping[str, float | int] | None = None,
) -> CacheMethod:
    """A fitted method: tuned by leave-one-out when `hyperparams` is None, else fitted with them."""
    keys, labels, groups = method_inputs(method, view_features, shot_labels, views)
    if hyperparams is None:
        instance = get_method(method)(scale=scale)
        instance.tune(keys, labels, text, groups)
    else:
        instance = get_method(method)(**{**dict(hyperparams), "scale": scale})
        instance.fit(keys, labels, text, groups)
    return instance
