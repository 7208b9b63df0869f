"""APE, training-free (Zhu et al., ICCV 2023): a cache over the most informative channels.

1. Channel criterion J = -lambda1 * S + lambda2 * V (S: mean inter-class product per channel over
   text rows and keys; V: variance of the text weights over classes); keep the n_channels largest.
2. f', F', W': those channels, rows re-normalised.
3. Per-key prior: P = softmax(F' W'^T); D_j = sum_c L_jc log2((L_jc + 1e-6) / (P_jc + 1e-6));
   omega_j = exp(gamma * D_j).
4. logits = Z + alpha * exp(-beta * (1 - f' F'^T)) @ (omega * L)   (Z on the FULL features).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ._validation import FloatArray, IntArray, Support, segment_sums
from .base import DEFAULT_SCALE
from .key_cache import KeyCacheMethod
from .key_index import KeyIndex
from .tip_adapter import BETA_GRID, alpha_grid, cache_weights
from .tuning import LooScorer, masked_affinity_chunks

GAMMA_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # the official search range, [0, 0.5]
CHANNEL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of d; 1.0 keeps every channel


def channel_criterion(support: Support, lambda1: float, lambda2: float) -> FloatArray:
    """J_k = -lambda1 * S_k + lambda2 * V_k for every channel k, [d]."""
    n = support.n_classes
    # Each class's samples: its text row plus its keys. Class sums via one segment sum.
    class_sums = support.text.astype(np.float64).copy()
    np.add.at(class_sums, support.labels, support.keys.astype(np.float64))
    counts = 1 + np.bincount(support.labels, minlength=n)
    # Sum over ordered pairs of samples from different classes of x_k * y_k:
    # (sum_i s_i)^2 - sum_i s_i^2, with s_i class i's sample sum.
    cross = class_sums.sum(axis=0) ** 2 - (class_sums**2).sum(axis=0)
    n_pairs = float(counts.sum()) ** 2 - float((counts**2).sum())
    similarity = cross / n_pairs if n_pairs > 0 else np.zeros(support.dim)
    variance = support.text.astype(np.float64).var(axis=0, ddof=1 if n > 1 else 0)
    return (-lambda1 * similarity + lambda2 * variance).astype(np.float32)  # type: ignore[no-any-return]


def select_channels(criterion: FloatArray, n_channels: int) -> IntArray:
    """Indices of the n_channels largest criterion values, ascending (ties: lower index first)."""
    order = np.argsort(-criterion, kind="stable")[:n_channels]
    return np.sort(order).astype(np.int64)


def renormalise(x: FloatArray) -> FloatArray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)  # type: ignore[no-any-return]


def key_divergence(keys_sel: FloatArray, text_sel: FloatArray, labels: IntArray) -> FloatArray:
    """D_j: bits by which the text prior P = softmax(F' W'^T) misses key j's own label, [M]."""
    logits = keys_sel @ text_sel.T
    logits = logits - logits.max(axis=1, keepdims=True)
    prior = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    own = prior[np.arange(labels.size), labels]
    # Only the label's own term survives: L_jc = 0 elsewhere makes those terms zero.
    return np.log2((1.0 + 1e-6) / (own + 1e-6)).astype(np.float32)  # type: ignore[no-any-return]


class _ApeScorer:
    def __init__(self, method: APE, support: Support, rows: IntArray) -> None:
        self._method, self._support, self._rows = method, support, rows
        self._zero_shot = method.scale * (support.keys[rows] @ support.text.T)
        self._criterion = channel_criterion(
            support, float(method.hyperparams["lambda1"]), float(method.hyperparams["lambda2"])
        )
        self._terms: dict[tuple[int, float, float], FloatArray] = {}

    def _cache_term(self, n_channels: int, beta: float, gamma: float) -> FloatArray:
        key = (n_channels, beta, gamma)
        if key not in self._terms:
            s, rows = self._support, self._rows
            channels = select_channels(self._criterion, self._method.resolve_channels(n_channels, s.dim))
            keys_sel = renormalise(s.keys[:, channels])
            omega = np.exp(gamma * key_divergence(keys_sel, renormalise(s.text[:, channels]), s.labels))
            out = np.empty((rows.size, s.n_classes), dtype=np.float32)
            for sl, aff, mask in masked_affinity_chunks(keys_sel[rows], keys_sel, s.groups[rows], s.groups):
                weights = cache_weights(aff, beta) * omega[None, :]
                weights[mask] = 0.0
                out[sl] = segment_sums(weights.astype(np.float32), s.labels, s.n_classes)
            self._terms[key] = out
        return self._terms[key]

    def logits(self, params: Mapping[str, float]) -> FloatArray:
        term = self._cache_term(int(params["n_channels"]), params["beta"], params["gamma"])
        return self._zero_shot + params["alpha"] * term  # type: ignore[no-any-return]


class APE(KeyCacheMethod):
    """Defaults are the official training-free ones (alpha 2, beta 1, gamma 0.1, lambda 0.7/0.3);
    n_channels = 0 means half of d. Default grid: alpha and beta as Tip-Adapter, gamma in
    {0, 0.1, ..., 0.5}, n_channels in {1/4, 1/2, 3/4, 1} of d. Staged: (alpha, beta), then
    (gamma, n_channels), repeated until stable. The channel criterion uses the full support."""

    name = "ape"
    defaults = {
        "alpha": 2.0,
        "beta": 1.0,
        "gamma": 0.1,
        "n_channels": 0,
        "lambda1": 0.7,
        "lambda2": 0.3,
        "scale": DEFAULT_SCALE,
    }
    integer_params = frozenset({"n_channels"})

    @staticmethod
    def resolve_channels(n_channels: int, dim: int) -> int:
        if n_channels > dim:
            raise ValueError(f"ape: n_channels={n_channels} exceeds the feature dimension {dim}")
        return n_channels if n_channels > 0 else max(1, dim // 2)

    def _fit(self, support: Support) -> None:
        hp = self._hp
        n = self.resolve_channels(int(hp["n_channels"]), support.dim)
        criterion = channel_criterion(support, float(hp["lambda1"]), float(hp["lambda2"]))
        self._channels = select_channels(criterion, n)
        keys_sel = renormalise(support.keys[:, self._channels])
        self._index = KeyIndex.from_keys(keys_sel)
        divergence = key_divergence(keys_sel, renormalise(support.text[:, self._channels]), support.labels)
        self._omega = np.exp(float(hp["gamma"]) * divergence).astype(np.float32)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        queries_sel = renormalise(queries[:, self._channels])
        aff, ids = self._neighbours(queries_sel, top_k)
        weights = cache_weights(aff, float(self._hp["beta"]))
        weights *= self._omega[None, :] if ids is None else self._omega[ids]
        cache = self._sum_by_class(weights, ids)
        return self.zero_shot_logits(queries) + float(self._hp["alpha"]) * cache  # type: ignore[no-any-return]

    @property
    def channels(self) -> IntArray:
        self._require_fitted()
        return self._channels

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        channels = sorted({max(1, int(round(f * support.dim))) for f in CHANNEL_FRACTIONS})
        return {
            "alpha": alpha_grid(self.scale),
            "beta": BETA_GRID,
            "gamma": GAMMA_GRID,
            "n_channels": tuple(float(c) for c in channels),
        }

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha", "beta"), ("gamma", "n_channels")]

    def _loo_scorer(self, support: Support, rows: np.ndarray) -> LooScorer:
        return _ApeScorer(self, support, rows)
