"""A task: one tenant's few-shot classifier, immutable once built.

An update builds a new `Task` beside the old one and swaps the reference, so a classify call that took
the reference sees one version whole, never a mix.

Every method is tuned at build (the task reports them all), but only the one classify uses by default
is kept fitted; another is fitted on first use from what its `MethodFit` keeps (its hyper-parameters
and own stored arrays, exactly as a restore fits it), and then kept. A fitted method's derived arrays
(APE's channel keys, GDA's discriminant, ...) cost about as much as a task's keys, and GDA's fit is most
of a restore's time, so a task costs memory and restore time for the methods it serves, not for all six.
`Task.nbytes` counts what is fitted at the time; the registry is told when that grows (`on_resize`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from app import thumbnails
from app.encoder import ClassPrompts
from app.errors import AppError, ErrorCode
from app.fewshot import TaskSupports
from app.heap import release_freed_memory
from cache_models import CacheMethod, get_method
from cache_models.base import HyperValue
from cache_models.evidence import nearest_shots
from cache_models.selection import Ranked, blend_hyperparams, calibrated_probabilities

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

# Abstain when the calibrated top probability is below what 95% of the correctly classified
# leave-one-out shots reached: in-distribution answers are kept at roughly that rate.
ABSTAIN_KEEP_FRACTION = 0.95
MIN_CORRECT_FOR_THRESHOLD = 5
# The fit `method=auto` makes when it blends methods (cache_models.selection.choose): classify averages its
# members' calibrated probabilities. Not a method of its own: it has no hyper-parameters or arrays.
ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class MethodFit:
    """A tuned method: its hyper-parameters, its own arrays (`CacheMethod.extra_state`: what fitting it
    again on the task's support needs, e.g. ProKeR's coefficients) and what leave-one-out said about it.

    The ENSEMBLE fit has `members` instead (the methods whose calibrated probabilities it averages, each a
    fit of the task) and no hyper-parameters or state; its report is the blend's own on `auto`'s shared
    shot folds, not a leave-one-out, and its temperature is 1 (its members are calibrated)."""

    name: str
    hyperparams: Mapping[str, HyperValue]
    state: Mapping[str, np.ndarray]
    loo_accuracy: float | None
    loo_nll: float | None
    temperature: float  # calibrated probabilities are softmax(logits / temperature)
    abstain_threshold: float | None
    n_scored: int
    fallback: str | None
    # Leave-one-out's scored rows: true and predicted class (the confusion matrix; empty if none scored).
    loo_labels: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    loo_predicted: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))
    members: tuple[str, ...] = ()  # the ENSEMBLE's methods; empty for a method

    def confusion(self, n_classes: int) -> IntArray:
        """[N, N]: [i, j] scored shots of class i that leave-one-out classified as j."""
        out = np.zeros((n_classes, n_classes), dtype=np.int64)
        np.add.at(out, (self.loo_labels, self.loo_predicted), 1)
        return out

    def fit(self, supports: TaskSupports) -> CacheMethod:
        """The method fitted on the task's support, as restore fits it (`restore_support`)."""
        if self.members:
            raise ValueError(f"{self.name} is fitted as its members {', '.join(self.members)}")
        cls = get_method(self.name)
        return cls(**self.hyperparams).restore_support(supports.for_method(cls), self.state)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "members": list(self.members),
            "hyperparams": dict(self.hyperparams),
            "loo_accuracy": self.loo_accuracy,
            "loo_nll": self.loo_nll,
            "temperature": self.temperature,
            "abstain_threshold": self.abstain_threshold,
            "loo_scored_shots": self.n_scored,
            "fallback": self.fallback,
        }


def abstain_threshold(confidence: FloatArray, correct: npt.NDArray[np.bool_]) -> float | None:
    right = np.sort(confidence[correct])
    if right.size < MIN_CORRECT_FOR_THRESHOLD:
        return None
    return float(np.quantile(right, 1.0 - ABSTAIN_KEEP_FRACTION))


class FittedMethods:
    """A task's fitted methods: made on first use, then kept for the task's life (one lock per task)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._methods: dict[str, CacheMethod] = {}
        self.on_resize: Callable[[], None] | None = None  # called after a fit made the task bigger

    def get(self, name: str, fit: Callable[[], CacheMethod]) -> CacheMethod:
        method = self._methods.get(name)
        if method is not None:
            return method
        with self._lock:  # concurrent first uses fit once
            method = self._methods.get(name)
            if method is None:
                method = self._methods[name] = fit()
                made = True
            else:
                made = False
        if made:
            release_freed_memory()  # the fit's temporaries (e.g. GDA's [d, d] scatter)
            listener = self.on_resize
            if listener is not None:
                listener()
        return method

    def has(self, name: str) -> bool:
        """Whether `name` is fitted (`get` then fits nothing)."""
        return name in self._methods

    def keep(self, method: CacheMethod) -> None:
        with self._lock:
            self._methods[method.name] = method

    @property
    def names(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._methods)

    def arrays(self) -> list[np.ndarray]:
        with self._lock:
            methods = list(self._methods.values())
        return [a for m in methods for a in m.held_arrays()]


def unique_nbytes(arrays: Iterable[np.ndarray]) -> int:
    """Bytes of the memory behind `arrays`, each buffer counted once (views and repeats are not)."""
    owners: dict[int, int] = {}
    for array in arrays:
        owner: Any = array
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        owners[id(owner)] = max(owners.get(id(owner), 0), int(owner.nbytes))
    return sum(owners.values())


@dataclass(frozen=True)
class Prediction:
    label: str | None
    top_k: list[tuple[str, float]]
    method: str
    reason: str | None = None
    evidence: list[tuple[int, str, float]] | None = None  # (shot, its class, cosine), nearest first


# "blend" (the mean of the two best), "best", "one-shot" (no class has 2 shots), "default" (nothing to choose)
SelectionRule = Literal["blend", "best", "one-shot", "default"]
SELECTION_RULES: tuple[SelectionRule, ...] = ("blend", "best", "one-shot", "default")


@dataclass(frozen=True)
class AutoSelection:
    """How `method=auto` chose the task's method (cache_models.selection.choose), kept with the task to show
    why; a task built with a named method has none."""

    rule: SelectionRule
    ranking: tuple[Ranked, ...]  # best first (cache_models.selection); empty for "one-shot" and "default"
    folds: int  # shot folds of the comparison (0: none)
    compared_classes: int  # classes it refitted on (all, or a fixed subset of a large task)
    scored_shots: int
    retuned: bool  # every method re-tuned inside each fold (its search scored too), not only refitted


@dataclass(frozen=True)
class Task:
    tenant: str
    task_id: str
    name: str | None
    version: int
    created_at: float
    updated_at: float
    model_id: str
    backend: str
    views: int
    templates: tuple[str, ...]
    classes: tuple[ClassPrompts, ...]
    supports: TaskSupports  # the shots' features, labels and class text, shared read-only by every fit
    shot_seeds: IntArray  # [S], the augmentation seed of each shot
    fits: Mapping[str, MethodFit]
    method: str  # what classify uses unless told otherwise
    method_requested: str  # what the client asked for ("auto", a method name, or "default")
    # One small JPEG per shot (app.thumbnails' pack); empty for tasks stored before thumbnails existed.
    thumbnail_data: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros(0, np.uint8))
    thumbnail_offsets: IntArray = field(default_factory=lambda: np.zeros(1, np.int64))
    # Set when the task is created, kept by every later version: the store refuses an update built from
    # another task that had this id before (None: a task stored before incarnations existed).
    incarnation: str | None = None
    selection: AutoSelection | None = None  # method=auto: how it chose `method`
    # Not an init field: `dataclasses.replace` (a new version) starts with none fitted, never the old ones.
    fitted: FittedMethods = field(default_factory=FittedMethods, init=False, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.task_id)

    def members(self, name: str | None = None) -> tuple[str, ...]:
        """The methods that answer for `name` (default: the task's): the ENSEMBLE's members, else itself."""
        fit = self.fits[name or self.method]
        return fit.members or (fit.name,)

    def hyperparams(self, name: str | None = None) -> dict[str, HyperValue]:
        """The hyper-parameters of `name` (default: the task's); the ENSEMBLE's: its members', keyed
        `member.name`."""
        fit = self.fits[name or self.method]
        if not fit.members:
            return dict(fit.hyperparams)
        return blend_hyperparams({m: self.fits[m].hyperparams for m in fit.members})

    def model(self, name: str | None = None) -> CacheMethod:
        """The fitted method `name` (default: the task's; not the ENSEMBLE, whose members are each a
        model), fitted now if this is its first use: CPU work, call it from a worker thread. A stored
        state that no longer fits is `task_damaged`."""
        fit = self.fits[name or self.method]
        try:
            return self.fitted.get(fit.name, lambda: fit.fit(self.supports))
        except (ValueError, KeyError, TypeError) as exc:
            raise AppError(
                ErrorCode.TASK_DAMAGED, f"task {self.task_id}: method {fit.name} cannot be fitted: {exc}"
            ) from None

    def is_fitted(self, name: str | None = None) -> bool:
        """Whether the method `name` (default: the task's; the ENSEMBLE's: all its members) is fitted
        already: `model` and `classify` then fit nothing (cheap to call from any thread)."""
        return all(self.fitted.has(member) for member in self.members(name))

    @property
    def shot_features(self) -> FloatArray:
        """[S * views, d] in shot order (rows s*views .. of shot s); a fresh array on every call."""
        return self.supports.view_features()

    @property
    def shot_labels(self) -> IntArray:
        """[S] in shot order."""
        return self.supports.shot_labels()

    @property
    def text(self) -> FloatArray:
        """[N, d] class text weights."""
        return self.supports.text

    @property
    def nbytes(self) -> int:
        """Bytes of what the task holds now (what the memory budget counts): the shared support, the
        thumbnails, every method's stored state and leave-one-out labels, and the derived arrays of the
        methods fitted so far."""
        fits = [a for f in self.fits.values() for a in (*f.state.values(), f.loo_labels, f.loo_predicted)]
        own: list[np.ndarray] = [self.shot_seeds, self.thumbnail_data, self.thumbnail_offsets, *fits]
        own += self.fitted.arrays()
        return self.supports.nbytes + unique_nbytes(own)

    def thumbnail(self, shot: int) -> bytes | None:
        return thumbnails.thumbnail(self.thumbnail_data, self.thumbnail_offsets, shot)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def shot_counts(self) -> list[int]:
        return np.bincount(self.shot_labels, minlength=len(self.classes)).astype(int).tolist()  # type: ignore[no-any-return]

    def classify(
        self, features: FloatArray, *, method: str | None, top_k: int, abstain: bool, evidence: int = 0
    ) -> list[Prediction]:
        """Calibrated top-k per query row (the ENSEMBLE's: the mean of its members' calibrated
        probabilities, `calibrated_probabilities`). CPU work (cache math, softmax): call it from a worker
        thread."""
        fit = self.fits[method or self.method]
        near: list[list[tuple[int, str, float]] | None] = [None] * features.shape[0]
        if evidence > 0:
            # The per-shot support's keys are label-sorted; source_rows maps them back to shot ids.
            per_shot = self.supports.per_shot
            index, cosine = nearest_shots(features, per_shot.keys, evidence)
            names_of = self.class_names
            near = [
                [
                    (int(per_shot.source_rows[r]), names_of[int(per_shot.labels[r])], float(c))
                    for r, c in zip(rows, cos, strict=True)
                ]
                for rows, cos in zip(index, cosine, strict=True)
            ]
        members = self.members(fit.name)
        probs = calibrated_probabilities(
            [self.model(m).predict(features) for m in members], [self.fits[m].temperature for m in members]
        )
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        names = self.class_names
        out = []
        for row, idx, shots in zip(probs, order, near, strict=True):
            ranked = [(names[i], float(row[i])) for i in idx]
            label: str | None = ranked[0][0]
            reason = None
            if abstain:
                if fit.abstain_threshold is None:
                    reason = (
                        f"no abstain threshold: it needs {MIN_CORRECT_FOR_THRESHOLD} or more shots that "
                        "leave-one-out classifies correctly (add shots); answered anyway"
                    )
                elif ranked[0][1] < fit.abstain_threshold:
                    label = None
                    reason = (
                        f"top probability {ranked[0][1]:.3f} is below the task's threshold "
                        f"{fit.abstain_threshold:.3f} (what 95% of correctly classified shots reached)"
                    )
            out.append(Prediction(label, ranked, fit.name, reason, shots))
        return out
