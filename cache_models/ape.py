"""APE, training-free (Zhu et al., ICCV 2023): a cache over the most informative channels.

1. Channel criterion J = -lambda1 * S + lambda2 * V (S: mean inter-class product per channel over
   text rows and keys; V: unbiased variance of the text weights over classes); keep the n_channels
   channels with the largest J.
2. f', F', W': those channels, rows re-normalised.
3. Per-key prior: P = softmax(F' W'^T) (no temperature, no scale);
   D_j = sum_c L_jc log2((L_jc + 1e-6) / (P_jc + 1e-6)); omega_j = exp(gamma * D_j).
4. logits = Z + alpha * exp(-beta * (1 - f' F'^T)) @ (omega * L)   (Z on the FULL features).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from ._validation import FloatArray, IntArray, Support
from .base import DEFAULT_SCALE, HyperValue
from .key_cache import KeyCacheMethod
from .key_index import KeyIndex
from .tip_adapter import BETA_GRID, alpha_grid, cache_weights
from .tuning import LooScorer, TermKey, masked_cache_terms

# gamma sharpens the per-key weight exp(gamma * D); the official searches reach about 1.5.
GAMMA_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.25, 1.5)
CHANNEL_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of d; 1.0 keeps every channel
# APE's few-shot rule (one or two shots per class, cache_models.few_shot): the key caches' alpha and beta,
# with gamma = FEW_SHOT_GAMMA and FEW_SHOT_CHANNEL_FRACTION of the channels. On 1- and 2-shot tasks simulated
# from the TRAIN splits of both shared data sets (10 draws each; docs/benchmarks.md) three quarters of the
# channels beat half (the paper's default) on both: textile-defects 64.3 -> 65.8 (1 shot) and 61.7 -> 65.2
# (2 shots), cifar10-mini 50.8 -> 51.3 and 55.3 -> 55.4; gamma = 0 (no key weighting: nothing at one shot
# measures its worth, as for Tip-X's penalty) was at least as good as 0.1 there.
FEW_SHOT_GAMMA = 0.0
FEW_SHOT_CHANNEL_FRACTION = 0.75
_EPS = 1e-6  # the official smoothing inside D's log2
_BLOCK = 1024  # key rows per block of the [M, N] prior


def channel_criterion(support: Support, lambda1: float, lambda2: float) -> npt.NDArray[np.float64]:
    """J_k = -lambda1 * S_k + lambda2 * V_k for every channel k, [d] (float64, so selection is exact)."""
    n = support.n_classes
    # Each class's samples: its text row plus its keys. s_i = class i's sample sum.
    class_sums = support.text.astype(np.float64) + support.class_sums()
    counts = 1 + np.bincount(support.labels, minlength=n)
    # Sum over ordered pairs of samples from different classes of x_k * y_k = (sum_i s_i)^2 - sum_i s_i^2,
    # divided by the number of such pairs: the mean, with no loop over pairs.
    cross = class_sums.sum(axis=0) ** 2 - (class_sums**2).sum(axis=0)
    n_pairs = float(counts.sum()) ** 2 - float((counts**2).sum())
    similarity = cross / n_pairs if n_pairs > 0 else np.zeros(support.dim)
    # Unbiased over classes; a single class has no spread (0 instead of NaN).
    variance = support.text.astype(np.float64).var(axis=0, ddof=1) if n > 1 else np.zeros(support.dim)
    criterion: npt.NDArray[np.float64] = -lambda1 * similarity + lambda2 * variance
    return criterion


def select_channels(criterion: npt.NDArray[np.float64], n_channels: int) -> IntArray:
    """Indices of the n_channels largest criterion values, ascending (ties: lower index first)."""
    order = np.argsort(-criterion, kind="stable")[:n_channels]
    return np.sort(order).astype(np.int64)


def select_renormalised(x: FloatArray, channels: IntArray) -> FloatArray:
    """The `channels` columns of x, rows scaled to unit length (a row with no energy there stays 0).

    Works in place on the (fresh) selection: no second [n, channels] array.
    """
    out: FloatArray = np.take(x, channels, axis=1)  # C order: the key search uses it without a copy
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
    return out


def key_divergence(keys_sel: FloatArray, text_sel: FloatArray, labels: IntArray) -> npt.NDArray[np.float64]:
    """D_j: bits by which the text prior P = softmax(F' W'^T) misses key j's own label, [M].

    L_jc = 0 off the label makes those terms 0 * log2(1e-6 / (P + 1e-6)) = 0: only the own-label
    term stays, which needs P_jy = exp(logit_jy - lse_j), not the whole [M, N] softmax. The logits
    are cosines in [-1, 1], so float32 exp is exact to ~1e-7 and lse is accumulated in float64.
    """
    own = np.empty(labels.size, dtype=np.float64)
    for start in range(0, labels.size, _BLOCK):  # row blocks: no [M, N] matrix is held
        rows = slice(start, start + _BLOCK)
        logits = keys_sel[rows] @ text_sel.T
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0].astype(np.float64) + np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64))
        own[rows] = np.exp(logits[np.arange(logits.shape[0]), labels[rows]].astype(np.float64) - lse)
    divergence: npt.NDArray[np.float64] = np.log2((1.0 + _EPS) / (own + _EPS))
    return divergence


class _Channels:
    """The selected channels and the support projected on them (divergence reusable across calls)."""

    def __init__(self, support: Support, channels: IntArray, divergence: npt.NDArray[np.float64] | None = None) -> None:
        self.channels = channels
        self.keys = select_renormalised(support.keys, channels)
        if divergence is None:
            divergence = key_divergence(self.keys, select_renormalised(support.text, channels), support.labels)
        self.divergence = divergence

    def omega(self, gamma: float) -> FloatArray:
        return np.exp(gamma * self.divergence).astype(np.float32)


class _ApeScorer(LooScorer):
    """LOO logits Z + alpha * C(n_channels, beta, gamma). The channel criterion uses the full support
    (a statistic of the text and all keys, not the cache); one affinity pass per channel count."""

    def __init__(self, method: APE, support: Support, rows: IntArray) -> None:
        super().__init__(method.scale * (support.keys[rows] @ support.text.T))
        self.method, self.support, self.rows = method, support, rows
        hp = method.hyperparams
        self.criterion = channel_criterion(support, float(hp["lambda1"]), float(hp["lambda2"]))
        self._divergence: dict[int, npt.NDArray[np.float64]] = {}  # per channel count; [M] each

    def term_key(self, params: Mapping[str, float]) -> TermKey:
        n = self.method.resolve_channels(int(params["n_channels"]), self.support.dim)
        return (float(n), params["beta"], params["gamma"])

    def pass_key(self, term: TermKey) -> Hashable:
        return term[0]

    def compute_terms(self, terms: Sequence[TermKey]) -> list[FloatArray]:
        n_channels = int(terms[0][0])
        channels = select_channels(self.criterion, n_channels)
        projected = _Channels(self.support, channels, self._divergence.get(n_channels))
        self._divergence[n_channels] = projected.divergence
        specs = [(beta, projected.omega(gamma)) for _, beta, gamma in terms]
        return masked_cache_terms(self.support, self.rows, projected.keys, specs)


class APE(KeyCacheMethod):
    """APE. Defaults are the official training-free ones (alpha 2, beta 1, gamma 0.1, lambda1 0.7,
    lambda2 0.3); n_channels = 0 means half of d.

    Default grid: alpha and beta as Tip-Adapter, gamma in {0, 0.1, ..., 0.5, 0.75, ..., 1.5}, n_channels in
    {1/4, 1/2, 3/4, 1} of d. Staged: (alpha, beta), then (gamma, n_channels), then alpha again,
    repeated until stable (at most twice). lambda1/lambda2 are not tuned. The channel criterion uses
    the full support.
    """

    name = "ape"
    defaults: ClassVar[Mapping[str, HyperValue]] = {
        "alpha": 2.0,
        "beta": 1.0,
        "gamma": 0.1,
        "n_channels": 0,
        "lambda1": 0.7,
        "lambda2": 0.3,
        "scale": DEFAULT_SCALE,
    }
    tunable = frozenset({"alpha", "beta", "gamma", "n_channels"})
    integer_params = frozenset({"n_channels"})
    _projected: _Channels

    @staticmethod
    def resolve_channels(n_channels: int, dim: int) -> int:
        """n_channels, with 0 meaning half of d; more than d is an error."""
        if n_channels > dim:
            raise ValueError(f"ape: n_channels={n_channels} exceeds the feature dimension {dim}")
        return n_channels if n_channels > 0 else max(1, dim // 2)

    def _fit(self, support: Support) -> None:
        hp = self._hp
        n = self.resolve_channels(int(hp["n_channels"]), support.dim)
        criterion = channel_criterion(support, float(hp["lambda1"]), float(hp["lambda2"]))
        self._projected = _Channels(support, select_channels(criterion, n))
        self._omega = self._projected.omega(float(hp["gamma"]))
        self._index = KeyIndex.from_keys(self._projected.keys)

    def _extra_state(self) -> dict[str, np.ndarray]:
        # The channel criterion and the keys' divergence (one [M, N] text prior over the selected channels,
        # O(M N n_channels): most of a restore's time at 1000 classes) are stored; the projection is a copy.
        return {"channels": self._projected.channels, "divergence": self._projected.divergence}

    def _restore(self, support: Support, state: Mapping[str, np.ndarray]) -> None:
        channels, divergence = state.get("channels"), state.get("divergence")
        n = self.resolve_channels(int(self._hp["n_channels"]), support.dim)
        if (
            channels is None
            or divergence is None
            or channels.shape != (n,)
            or divergence.shape != (support.n_rows,)
            or not np.issubdtype(channels.dtype, np.integer)
            or channels.min() < 0
            or channels.max() >= support.dim
            or np.any(np.diff(channels) <= 0)
            or not np.all(np.isfinite(divergence))
        ):
            self._fit(support)  # older or partial state: refit
            return
        self._projected = _Channels(
            support, np.asarray(channels, dtype=np.int64), np.asarray(divergence, dtype=np.float64)
        )
        self._omega = self._projected.omega(float(self._hp["gamma"]))
        self._index = KeyIndex.from_keys(self._projected.keys)

    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray:
        queries_sel = select_renormalised(queries, self._projected.channels)
        affinity, ids = self._neighbours(queries_sel, top_k)
        weights = cache_weights(affinity, float(self._hp["beta"]))
        weights *= self._omega[None, :] if ids is None else self._omega[ids]
        cache = self._sum_by_class(weights, ids)
        return self.zero_shot_logits(queries) + float(self._hp["alpha"]) * cache

    @property
    def channels(self) -> IntArray:
        """The selected channel indices, ascending."""
        self._require_fitted()
        return self._projected.channels

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        channels = sorted({max(1, round(f * support.dim)) for f in CHANNEL_FRACTIONS})
        return {
            "alpha": alpha_grid(self.scale),
            "beta": BETA_GRID,
            "gamma": GAMMA_GRID,
            "n_channels": tuple(float(c) for c in channels),
        }

    def _stages(self) -> Sequence[Sequence[str]]:
        return [("alpha", "beta"), ("gamma", "n_channels"), ("alpha",)]

    def few_shot_rule(self, support: Support, temperature: float) -> dict[str, float]:
        channels = max(1, round(FEW_SHOT_CHANNEL_FRACTION * support.dim))
        return {**super().few_shot_rule(support, temperature), "gamma": FEW_SHOT_GAMMA, "n_channels": float(channels)}

    def _loo_scorer(self, support: Support, rows: IntArray) -> LooScorer:
        return _ApeScorer(self, support, rows)
