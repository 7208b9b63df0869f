"""Glue between encoded shots and the cache methods, shared by the service and `shotcache eval`.

Shots are encoded under V views (methods.md). A method declares what it needs (`CacheMethod.per_view`):
most cache one key per shot, the re-normalised mean of its views; a per-view method (GDA) keeps each
view as a sample of its own, grouped by shot so leave-one-out masks all of a shot's views together.

A task builds each support once (`TaskSupports`) and fits every method on it: the methods hold
references to one read-only support, not copies, so a task's keys are in memory once (twice with
V > 1: the views and their per-shot means).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cache_models import CacheMethod, get_method
from cache_models.base import Support, make_support

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class TaskSupports:
    """The supports of one task's shots: per view, and per shot (the same object when views == 1)."""

    per_view: Support
    per_shot: Support
    views: int

    def for_method(self, method: type[CacheMethod]) -> Support:
        return self.per_view if method.per_view else self.per_shot

    def view_features(self) -> FloatArray:
        """[S * views, d] in shot order (rows s*views .. of shot s): a fresh array from the support."""
        support = self.per_view
        out = np.empty_like(support.keys)
        out[support.source_rows] = support.keys
        return out

    def shot_labels(self) -> IntArray:
        support = self.per_shot
        out = np.empty_like(support.labels)
        out[support.source_rows] = support.labels
        return out

    @property
    def text(self) -> FloatArray:
        return self.per_view.text

    @property
    def nbytes(self) -> int:
        supports = {id(s): s for s in (self.per_view, self.per_shot)}.values()
        arrays = [a for s in supports for a in (s.keys, s.labels, s.groups, s.source_rows)]
        if self.per_shot.text is not self.per_view.text:
            arrays.append(self.per_shot.text)
        return sum(int(a.nbytes) for a in [*arrays, self.per_view.text])


def method_inputs(
    method: str, view_features: FloatArray, shot_labels: IntArray, views: int
) -> tuple[FloatArray, IntArray, IntArray]:
    """(keys, labels, groups) for `method` from [S * views, d] view features of S shots."""
    shots = shot_labels.shape[0]
    if view_features.shape[0] != shots * views:
        raise ValueError(f"{view_features.shape[0]} view rows for {shots} shots x {views} views")
    if get_method(method).per_view:
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


def make_supports(view_features: FloatArray, shot_labels: IntArray, text: FloatArray, views: int) -> TaskSupports:
    """Validate and label-sort the shots once, for every method of a task."""
    shots = shot_labels.shape[0]
    if view_features.shape[0] != shots * views:
        raise ValueError(f"{view_features.shape[0]} view rows for {shots} shots x {views} views")
    groups = np.repeat(np.arange(shots, dtype=np.int64), views)
    per_view = make_support(view_features, np.repeat(shot_labels, views), text, groups)
    if views == 1:
        return TaskSupports(per_view, per_view, views)
    mean = view_features.reshape(shots, views, -1).mean(axis=1)
    keys = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
    per_shot = make_support(keys, shot_labels, per_view.text, np.arange(shots, dtype=np.int64))
    return TaskSupports(per_view, per_shot, views)


def fit_method(
    method: str,
    supports: TaskSupports,
    *,
    scale: float,
    hyperparams: Mapping[str, float | int] | None = None,
) -> CacheMethod:
    """A method fitted on the task's shared support: tuned by leave-one-out when `hyperparams` is
    None, else fitted with them."""
    cls = get_method(method)
    support = supports.for_method(cls)
    if hyperparams is None:
        instance = cls(scale=scale)
        instance.tune_support(support)
    else:
        instance = cls(**{**dict(hyperparams), "scale": scale})
        instance.fit_support(support)
    return instance


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
    """One method on its own support (`shotcache eval` fits methods one at a time this way)."""
    supports = make_supports(view_features, shot_labels, text, views)
    return fit_method(method, supports, scale=scale, hyperparams=hyperparams)
