"""The interface every method shares: hyper-parameters, fit, predict, tune, state."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Self

import numpy as np

from ._validation import BoolArray, FloatArray, IntArray, as_features
from ._validation import Support as Support  # re-exported: callers share one support among methods
from ._validation import make_support as make_support
from .few_shot import few_shot_choice
from .tuning import LooScorer, TuneReport, scored_rows, search

HyperValue = float | int

# CLIP's learned exp(logit_scale); a model that carries its own scale passes it as `scale`.
DEFAULT_SCALE = 100.0
# Queries scored at once by predict: bounds the [chunk, M] affinity (1024 x 16,000 floats = 64 MB).
PREDICT_CHUNK = 1024
# The arrays of a fitted method's support, always in its state (callers persisting many methods store them once).
SUPPORT_ARRAYS = ("keys", "labels", "text", "groups")


class CacheMethod(ABC):
    """A training-free classifier over a key/value cache of support features.

    Subclasses declare `name`, `defaults` (every hyper-parameter with its paper default),
    `tunable` (what leave-one-out may search) and implement `_fit`, `_predict`, `_loo_scorer`
    and, when they have something to tune, `_default_grid` and `_stages`.

    Hyper-parameters are numbers: `scale` (logit scale) and `tau` must be positive, integers in
    `integer_params` are >= 0, every other value is >= 0.

    `per_view` says what support the method wants when shots are encoded under several augmented
    views: False (most methods) one key per shot, the re-normalised mean of its views; True (GDA)
    every view a row of its own, grouped by shot. Callers build the support accordingly (app/fewshot.py)
    and may fit many methods on one `Support` (`fit_support`, `tune_support`): a fitted method keeps a
    reference to it, never a copy.
    """

    name: ClassVar[str]
    per_view: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, HyperValue]]
    tunable: ClassVar[frozenset[str]] = frozenset()
    integer_params: ClassVar[frozenset[str]] = frozenset()
    positive_params: ClassVar[frozenset[str]] = frozenset({"scale", "tau"})

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
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{cls.name}: hyper-parameter {key} must be a number, got {value!r}")
            number = float(value)
            if not np.isfinite(number):
                raise ValueError(f"{cls.name}: hyper-parameter {key} must be finite, got {value!r}")
            if key in cls.positive_params and number <= 0:
                raise ValueError(f"{cls.name}: hyper-parameter {key} must be positive, got {value!r}")
            if number < 0:
                raise ValueError(f"{cls.name}: hyper-parameter {key} must be non-negative, got {value!r}")
            if key in cls.integer_params:
                if number != int(number):
                    raise ValueError(f"{cls.name}: hyper-parameter {key} must be an integer, got {value!r}")
                out[key] = int(number)
            else:
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
        """Build the cache from support keys [M, d], labels [M] in [0, N), class text weights [N, d].

        `groups` [M] says which shot each row comes from (views of one shot share a group); it only
        matters to leave-one-out, which masks a whole group at once.
        """
        return self.fit_support(make_support(keys, labels, text, groups))

    def fit_support(self, support: Support) -> Self:
        """`fit` on an already validated (possibly shared, read-only) support."""
        self._fit(support)
        self._support = support
        return self

    def predict(self, queries: object, *, top_k: int | None = None) -> FloatArray:
        """Logits float32 [Q, N] for L2-normalised queries [Q, d].

        `top_k` keeps only each query's k largest key affinities in the cache terms (exact FAISS
        k-NN over the keys; Tip-X's KL penalty stays the exact full sum), so it approximates the full
        sum over keys by dropping the keys whose weights exp(-beta * (1 - cos)) are smallest; with
        k >= M it is exact. It bounds which keys vote, not the cost: the k-NN search still meets
        every key. Methods without a key cache (zero-shot, gda, proker) ignore it. Queries are scored in
        blocks of PREDICT_CHUNK, so a large batch never holds a [Q, M] matrix.
        """
        support = self._require_fitted()
        q = as_features(queries, "queries", dim=support.dim, allow_empty=True)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        k = None if top_k is None else int(top_k)
        out = np.empty((q.shape[0], support.n_classes), dtype=np.float32)
        for start in range(0, q.shape[0], PREDICT_CHUNK):
            chunk = slice(start, start + PREDICT_CHUNK)
            out[chunk] = self._predict(q[chunk], k)
        return out

    def zero_shot_logits(self, queries: FloatArray) -> FloatArray:
        """Z = scale * f W^T, float32."""
        support = self._require_fitted()
        return self.scale * (queries @ support.text.T)

    @property
    def support(self) -> Support:
        """The support the method was fitted on (read-only, possibly shared with other methods)."""
        return self._require_fitted()

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

        `grid` maps tunable hyper-parameter names to candidate values and is searched exhaustively
        (one joint product); by default the method's own staged grid (see each class) is searched,
        starting from the current values. Only rows whose class has two or more shots (groups) are
        scored; when no row can be (one shot per class), the method's single-shot rule applies
        (`_single_shot_fallback`: the key caches scale alpha by the zero-shot temperature, others keep
        their current values) and `tune_report.fallback` says so. With two shots or fewer in some
        class, the method's few-shot rule competes with the search's pick (cache_models.few_shot).
        The report is `tune_report`.
        """
        return self.tune_support(make_support(keys, labels, text, groups), grid)

    def tune_support(
        self, support: Support, grid: Mapping[str, Sequence[HyperValue]] | None = None
    ) -> dict[str, HyperValue]:
        """`tune` on an already validated (possibly shared, read-only) support."""
        if grid is not None:
            search_grid = self._checked_grid(grid)
            stages: Sequence[Sequence[str]] = [list(search_grid)]
        else:
            search_grid = {k: list(v) for k, v in self._default_grid(support).items()}
            stages = self._stages()
        rows = self._scored_rows(support)
        if rows.size == 0:
            report = self._single_shot_fallback(support) if grid is None else None
            if report is None:
                report = TuneReport(
                    hyperparams=self._float_params(),
                    accuracy=None,
                    nll=None,
                    temperature=1.0,
                    n_scored=0,
                    fallback="no class has two or more shots, so leave-one-out cannot score the cache; "
                    "the starting values were kept",
                )
        else:
            scorer = self._loo_scorer(support, rows)
            report = search(scorer, support.labels[rows], self._float_params(), search_grid, stages)
            if grid is None:
                report = few_shot_choice(self, support, scorer, rows, report)
            report = dataclasses.replace(report, rows=support.source_rows[rows])
        self._hp.update(self._checked(report.hyperparams))
        self.tune_report = dataclasses.replace(report, hyperparams=self.hyperparams)
        self._fit(support)
        self._support = support
        return self.hyperparams

    def search_space(
        self, keys: object, labels: object, text: object, groups: object | None = None
    ) -> tuple[dict[str, list[float]], list[list[str]]]:
        """The default grid and its search stages for this support (what `tune` searches), so callers
        can run other searches over the same space (e.g. the test-tuned "oracle" of an evaluation)."""
        support = make_support(keys, labels, text, groups)
        grid = {k: [float(v) for v in values] for k, values in self._default_grid(support).items()}
        return grid, [list(stage) for stage in self._stages()]

    def few_shot_rule(self, support: Support, temperature: float) -> dict[str, float] | None:
        """Hyper-parameters for one or two shots per class from the shots' zero-shot temperature (and,
        where a rule needs it, the shots' geometry; cache_models.few_shot); None: leave-one-out's pick stands."""
        return None

    def held_out_fold(self, support: Support, train: BoolArray, test: BoolArray, *, retune: bool = False) -> FloatArray:
        """Logits of `support`'s `test` rows by this method refitted on the `train` rows alone: one fold
        of `auto`'s shared-fold comparison (cache_models.selection). The refit keeps this method's
        hyper-parameters, or with `retune` chooses its own on the fold exactly as `tune` does (from the
        defaults, untuned values such as the scale kept), so the fold scores the method's whole
        recipe, its hyper-parameter search included. A method whose fit needs more than the fold
        leaves it overrides this (GDA)."""
        fold = make_support(support.keys[train], support.labels[train], support.text, support.groups[train])
        if retune:
            refit = type(self)(**{k: v for k, v in self.hyperparams.items() if k not in self.tunable})
            refit.tune_support(fold)
        else:
            refit = type(self)(**self.hyperparams)
            refit.fit_support(fold)
        return refit.predict(support.keys[test])

    def _single_shot_fallback(self, support: Support) -> TuneReport | None:
        """Hyper-parameters when leave-one-out cannot score anything; None keeps the current values."""
        return None

    def loo_logits(
        self, keys: object, labels: object, text: object, groups: object | None = None
    ) -> tuple[IntArray, FloatArray]:
        """Leave-one-out logits at the current hyper-parameters, as `tune` scores them.

        Returns (rows, logits): the scored rows as indices into the caller's arrays, and for each
        the logits [len(rows), N] of the method built without that row's whole group.
        """
        support = make_support(keys, labels, text, groups)
        rows = self._scored_rows(support)
        if rows.size == 0:
            return np.zeros(0, np.int64), np.zeros((0, support.n_classes), np.float32)
        logits = self._loo_scorer(support, rows).logits(self._float_params())
        return support.source_rows[rows], logits

    def _checked_grid(self, grid: Mapping[str, Sequence[HyperValue]]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for key, values in grid.items():
            self._checked({key: self.defaults.get(key, 0)})  # unknown names fail here, listing the valid
            if key not in self.tunable:
                valid = ", ".join(sorted(self.tunable)) or "none"
                raise ValueError(f"{self.name}: {key!r} cannot be tuned by leave-one-out; tunable: {valid}")
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
                raise ValueError(f"{self.name}: grid[{key!r}] must be a sequence of values, got {values!r}")
            if len(values) == 0:
                raise ValueError(f"{self.name}: grid[{key!r}] is empty; every grid entry needs a value")
            out[key] = [float(self._checked({key: v})[key]) for v in values]
        return out

    def _float_params(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._hp.items()}

    def _scored_rows(self, support: Support) -> IntArray:
        return scored_rows(support)

    def _default_grid(self, support: Support) -> Mapping[str, Sequence[float]]:
        return {}

    def _stages(self) -> Sequence[Sequence[str]]:
        return []

    @abstractmethod
    def _loo_scorer(self, support: Support, rows: IntArray) -> LooScorer: ...

    @abstractmethod
    def _fit(self, support: Support) -> None: ...

    @abstractmethod
    def _predict(self, queries: FloatArray, top_k: int | None) -> FloatArray: ...

    # ---- state (for persistence by the caller; no I/O here) ---------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """Arrays from which `set_state` rebuilds the fitted method exactly.

        Always "keys", "labels", "text", "groups" (label-sorted support); methods may add derived
        arrays that are expensive to recompute. Hyper-parameters are not included: restore into an
        instance constructed with the same `hyperparams`.
        """
        support = self._require_fitted()
        state: dict[str, np.ndarray] = {name: getattr(support, name) for name in SUPPORT_ARRAYS}
        return {**state, **self._extra_state()}

    def set_state(self, state: Mapping[str, np.ndarray]) -> Self:
        missing = sorted(set(SUPPORT_ARRAYS) - set(state))
        if missing:
            raise ValueError(f"{self.name}: state lacks {missing}")
        return self.restore_support(make_support(state["keys"], state["labels"], state["text"], state["groups"]), state)

    def restore_support(self, support: Support, state: Mapping[str, np.ndarray]) -> Self:
        """`set_state` on an already validated support: `state` needs only the method's own arrays
        (`extra_state`), not the support's."""
        self._restore(support, state)
        self._support = support
        return self

    def held_arrays(self) -> list[np.ndarray]:
        """Every array this fitted method holds beyond its support's: its derived state (e.g. APE's channel
        keys, GDA's discriminant) and its tuning report. What fitting it adds to a caller's memory; the
        support's arrays are shared by every method fitted on it, so the caller counts them once."""
        support = self._require_fitted()
        shared = [getattr(support, name) for name in (*SUPPORT_ARRAYS, "source_rows")]
        return [
            array for array in _reachable_arrays(self) if not any(np.may_share_memory(array, other) for other in shared)
        ]

    def extra_state(self) -> dict[str, np.ndarray]:
        """The arrays of `get_state` that are the method's own (not its support's)."""
        self._require_fitted()
        return self._extra_state()

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {}

    def _restore(self, support: Support, state: Mapping[str, np.ndarray]) -> None:
        self._fit(support)


def _reachable_arrays(root: object) -> list[np.ndarray]:
    """The arrays reachable from `root` through this package's objects and plain containers (a `Support` is
    not entered: it is shared)."""
    found: list[np.ndarray] = []
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, Support):
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif type(item).__module__.startswith(__package__ or "cache_models") and hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return found
