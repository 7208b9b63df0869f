"""Boundary checks: every array entering the library is validated here, once.

Like faiss's python layer, the public entry points accept anything array-like and convert it to the
exact dtype and layout the math needs, raising a ValueError that names the argument and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Rows must be unit length; float32 encoders land within ~1e-6, so 1e-3 only catches real mistakes
# (an un-normalised feature, a row of zeros) without rejecting honest rounding.
NORM_TOLERANCE = 1e-3
_SUM_BLOCK = 4096  # key rows converted to float64 at once


def as_features(x: object, name: str, *, dim: int | None = None, allow_empty: bool = False) -> FloatArray:
    """Return `x` as a C-contiguous float32 [n, d] array of finite, L2-normalised rows."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d], got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: at least one row is needed")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero columns")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, expected {dim}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if out.shape[0]:
        norms = np.linalg.norm(out, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
        if bad.size:
            raise ValueError(
                f"{name} rows must be L2-normalised; row {int(bad[0])} has norm {float(norms[bad[0]]):.4g}"
            )
    return out


def as_index_vector(x: object, name: str, *, length: int, upper: int | None = None) -> IntArray:
    """Return `x` as an int64 [length] vector of non-negative integers (< upper when given)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {length} (one per key row)")
    is_integer = np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_
    is_whole_float = np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.isfinite(arr) & (np.mod(arr, 1) == 0)))
    if arr.size and not (is_integer or is_whole_float):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    out = arr.astype(np.int64, copy=True)
    if out.size and out.min() < 0:
        raise ValueError(f"{name} must be non-negative, found {int(out.min())}")
    if upper is not None and out.size and out.max() >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}) (one id per class), found {int(out.max())}")
    return out


def _frozen(arr: npt.NDArray[np.generic]) -> None:
    arr.flags.writeable = False


@dataclass(frozen=True)
class Support:
    """A validated support set, rows sorted by label (stable) so class segments are contiguous.

    Sorting once lets every method turn `E @ L` (E: affinities, L: one-hot labels) into a
    segment sum over columns, which costs M per query instead of M * N. The arrays are private
    read-only copies: mutating the caller's arrays later cannot change a fitted model.
    """

    keys: FloatArray  # [M, d]
    labels: IntArray  # [M], non-decreasing
    text: FloatArray  # [N, d]
    groups: IntArray  # [M], shot id of each row
    source_rows: IntArray  # [M], index of each row in the arrays the caller passed

    @property
    def n_classes(self) -> int:
        return int(self.text.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.keys.shape[0])

    def class_sums(self) -> npt.NDArray[np.float64]:
        """Sum of each class's key rows, [N, d] in float64, in row blocks (no float64 copy of all keys)."""
        sums = np.zeros((self.n_classes, self.dim), dtype=np.float64)
        for start in range(0, self.n_rows, _SUM_BLOCK):
            labels = self.labels[start : start + _SUM_BLOCK]
            present, first = np.unique(labels, return_index=True)
            block = self.keys[start : start + _SUM_BLOCK].astype(np.float64)
            sums[present] += np.add.reduceat(block, first, axis=0)  # labels are sorted: segments
        return sums

    def shots_per_class(self) -> IntArray:
        """Number of distinct groups (shots) per class."""
        counts = np.zeros(self.n_classes, dtype=np.int64)
        if self.n_rows:
            pairs = np.unique(np.stack([self.labels, self.groups]), axis=1)
            np.add.at(counts, pairs[0], 1)
        return counts


def make_support(
    keys: object, labels: object, text: object, groups: object | None, *, allow_no_keys: bool = False
) -> Support:
    """Validate a support set (keys [M, d], labels [M] in [0, N), text [N, d], groups [M] or None)."""
    text_arr = as_features(text, "text").copy()
    n_classes, dim = text_arr.shape
    keys_arr = as_features(keys, "keys", dim=dim, allow_empty=allow_no_keys)
    m = keys_arr.shape[0]
    labels_arr = as_index_vector(labels, "labels", length=m, upper=n_classes)
    if groups is None:
        groups_arr = np.arange(m, dtype=np.int64)
    else:
        groups_arr = as_index_vector(groups, "groups", length=m)
        _check_groups_single_label(groups_arr, labels_arr)
    order = np.argsort(labels_arr, kind="stable")
    support = Support(
        keys=np.ascontiguousarray(keys_arr[order]),
        labels=labels_arr[order],
        text=text_arr,
        groups=groups_arr[order],
        source_rows=order.astype(np.int64),
    )
    for arr in (support.keys, support.labels, support.text, support.groups, support.source_rows):
        _frozen(arr)
    return support


def _check_groups_single_label(groups: IntArray, labels: IntArray) -> None:
    if groups.size == 0:
        return
    pairs = np.unique(np.stack([groups, labels]), axis=1)
    if np.unique(pairs[0]).size != pairs.shape[1]:
        dup = pairs[0][np.flatnonzero(np.diff(pairs[0]) == 0)[0]]
        raise ValueError(f"groups: group {int(dup)} holds rows of different labels; a group is one shot")


def segment_sums(values: FloatArray, labels: IntArray, n_classes: int) -> FloatArray:
    """Sum the columns of `values` [Q, M] per class, given non-decreasing `labels` [M] -> [Q, N].

    Equivalent to `values @ one_hot(labels)` but linear in M.
    """
    out = np.zeros((values.shape[0], n_classes), dtype=np.float32)
    if labels.size == 0:
        return out
    present, starts = np.unique(labels, return_index=True)
    out[:, present] = np.add.reduceat(values, starts, axis=1)
    return out


def scatter_sums(values: FloatArray, columns: IntArray, n_classes: int) -> FloatArray:
    """Sum `values` [Q, k] into [Q, N] by per-entry class `columns` [Q, k] (top-k search results)."""
    n_queries = values.shape[0]
    flat = (np.arange(n_queries, dtype=np.int64)[:, None] * n_classes + columns).ravel()
    summed = np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=n_queries * n_classes)
    return summed.reshape(n_queries, n_classes).astype(np.float32)
