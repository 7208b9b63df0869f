"""The interface every method shares: hyper-parameters, fit, predict, tune, state."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Self

import numpy as np

from ._validation import FloatArray, Support, as_features, make_support
from .tuning import LooScorer, TuneReport, scored_rows, search

HyperValue = float | int

# CLIP's learned exp(logit_scale); a model that carries its own scale passes it as `scale`.
DEFAULT_SCALE = 100.0


class CacheMethod(ABC):
    """A training-free classifier over a key/value cache of support features.

    Subclasses declare `name`, `defaults` (every hyper-parameter with its paper default) and
    implement `_fit`, `_predict` and, when they have something to tune, `_default_grid`,
    `_stages` and `_loo_scorer`.
    """

    name: ClassVar[str]
    defaults: ClassVar[Mapping[str, HyperValue]]
    integer_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **hyperparams: HyperValue) -> None:
        self._hp: dict[str, HyperValue] = dict(self.defaults)
        self._hp.update(self._checked(hyperparams))
        self._support: Support | None = None
        self.tune_report: TuneReport | None = None

    # ---- hyper-parameters -------------------------------------------------------------------
    @classmethod
    def _checked(cls, hyperparams: Mapping[str, object]) -> dict[str, HyperValue]:
        out: dict[str, HyperValue] = {}
        for key, value in hyperparams.items():
            if key not in cls.defaults:
                valid = ", ".join(sorted(cls.defaults)) or "none"
                raise ValueError(f"{cls.name}: unknown hyper-parameter {key!r}; valid: {valid}")
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{cls.name}: {key} must be a number, got {value!r}")
            number = float(value)
            if not np.isfinite(number):
                raise ValueError(f"{cls.name}: {key} must be finite, got {value!r}")
            if key in cls.integer_params:
                if number != int(number) or number < 1:
                    raise ValueError(f"{cls.name}: {key} must be a positive integer, got {value!r}")
                out[key] = int(number)
            else:
                if key == "scale" and number <= 0:
                    raise ValueError(f"{cls.name}: scale must be positive, got {value!r}")
                out[key] = number
        return out

    @property
    def hyperparams(self) -> dict[str, HyperValue]:
        """The values in use (JSON-serialisable)."""
        return dict(self._hp)

    @property
    def scale(self) -> float:
        return float(self._hp["scale"])

    # ---- fit / predict ----------------------------------------------------------------------
    def fit(self, keys: object, labels: object, text: object, groups: object | None = None) -> Self:
        """Build the cache from support keys [M, d], labels [M], class text weights [N, d]."""
        support = make_support(keys, labels, text, groups)
        self._fit(support)
        self._support = support
        return self

    def predict(self, queries: object, *, top_k: int | None = None) -> FloatArray:
        """Logits [Q, N] for L2-normalised queries [Q, d].

        `top_k` keeps only each query's k largest key affinities in the cache term (exact FAISS
        k-NN search). It approximates the full sum by dropping the keys whose weights
        exp(-beta * (1 - cos)) are smallest; with k >= M it is exact. Methods without a key cache
        (zero-shot, gda) ignore it.
        """
        support = self._require_fitted()
        q = as_features(queries, "queries", dim=support.dim, allow_empty=True)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        if q.shape[0] == 0:
            return np.zeros((0, support.n_classes), dtype=np.float32)
        return self._predict(q, top_k).astype(np.float32, copy=False)

    def zero_shot_logits(self, queries: FloatArray) -> FloatArray:
        support = self._require_fitted()
        return (self.scale * (queries @ support.text.T)).astype(np.float32)  # type: ignore[no-any-return]

    @property
    def n_classes(self) -> int:
        return self._require_fitted().n_classes

    @property
    def n_keys(self) -> int:
        return self._require_fitted().n_rows

    def _require_fitted(self) -> Support:
        if self._support is None:
            raise ValueError(f"{self.name}: call fit() or tune() before predict()")
        return self._support

    # ---- tuning -----------------------------------------------------------------------------
    def tune(
        self,
        keys: object,
        labels: object,
        text: object,
        groups: object | None = None,
        grid: Mapping[str, Sequence[HyperValue]] | None = None,
    ) -> dict[str, HyperValue]:
        """Choose hyper-parameters by leave-one-out on the support set, set them, fit, return them.

        `grid` maps hyper-parameter names to candidate values and is searched exhaustively;
        by default the method's own staged grid (see each class) is searched. Rows whose class has
        fewer than two shots cannot be scored; if no row can, the current values are kept and the
        report says why.
        """
        support = make_support(keys, labels, text, groups)
        if grid is not None:
            grid = {k: [self._checked({k: v})[k] for v in vals] for k, vals in grid.items()}
            if any(len(v) == 0 for v in grid.values()):
                raise ValueError(f"{self.name}: every grid entry needs at least one value")
            stages: Sequence[Sequence[str]] = [list(grid)]
        else:
            grid = self._default_grid(support)
            stages = self._stages()
        rows = self._scored_rows(support)
        if not grid:
            report = self._report_without_search(support, rows)
        elif rows.size == 0:
            report = TuneReport(
                hyperparams=self._float_params(),
                accuracy=None,
                nll=None,
                temperature=1.0,
                n_scored=0,
                fallback="no class has two or more shots, so leave-one-out cannot score the cache; defaults kept",
            )
        else:
            scorer = self._loo_scorer(support, rows)
            report = search(scorer, support.labels[rows], self._float_params(), grid, stages)
        self._hp.update(self._checked(report.hyperparams))
        self.tune_report = dataclasses.replace(report, hyperparams=self.hyperparams)
        self._fit(support)
        self._support = support
        return self.hyperparams

    def _float_params(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._hp.items()}

    def _scored_rows(self, support: Support) -> np.ndarray:
        return scored_rows(support)

    def _report_without_search(self, support: Support, rows: np.ndarray) -> TuneReport:
        """Nothing to tune: still report the LOO score of the fixed values where rows allow."""
        if rows.size == 0:
            return TuneReport(self._float_params(), None, None, 1.0, 0, fallback="no scorable rows")
        scorer = self._loo_scorer(support, rows)
        return search(scorer, support.labels[rows], self._float_params(), {}, [])

    def _default_grid(self, support: Support) -> dict[str, Sequence[float]]:
        return {}

    def _stages(self) -> Sequence[Sequence[str]]:
        return []

    @abstractmethod
    def _loo_scorer(self, support: Support, rows: np.ndarray) -> LooScorer: ...

    @abstractmethod
    def _fit(self, support: Support) -> None: ...

    @abstractmethod
    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray: ...

    # ---- state (for persistence by the caller; no I/O here) ---------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """Arrays from which `set_state` rebuilds the fitted method exactly."""
        support = self._require_fitted()
        return {
            "keys": support.keys,
            "labels": support.labels,
            "text": support.text,
            "groups": support.groups,
            **self._extra_state(),
        }

    def set_state(self, state: Mapping[str, np.ndarray]) -> Self:
        missing = {"keys", "labels", "text", "groups"} - set(state)
        if missing:
            raise ValueError(f"{self.name}: state lacks {sorted(missing)}")
        support = make_support(state["keys"], state["labels"], state["text"], state["groups"])
        self._restore(support, state)
        self._support = support
        return self

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {}

    def _restore(self, support: Support, state: Mapping[str, np.ndarray]) -> None:
        self._fit(support)
