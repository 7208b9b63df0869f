"""Every operation's input, validated once.

The HTTP layer only parses: it hands over a raw request (`CreateTaskRequest`, `AddShotsRequest`,
`ClassifyRequest`) whose JSON-valued fields are parsed but unchecked. `RequestRules` knows the
settings (and, for operations on a task, the task) and turns a raw request into a checked one, or
raises `AppError` naming the first problem. Nothing downstream checks again: the builder and the
classifier trust a checked request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.encoder import ClassPrompts, check_templates
from app.errors import AppError, ErrorCode
from app.settings import MAX_VIEWS, Settings
from cache_models import METHODS, get_method

if TYPE_CHECKING:
    from .task import Task

AUTO = "auto"
DEFAULT = "default"  # the method_requested of a task whose client named none
MAX_LABEL_CHARS = 100
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class UploadedImage:
    filename: str | None
    data: bytes


# ---- raw requests (parsed, not checked) -----------------------------------------------------------
@dataclass(frozen=True)
class AddShotsRequest:
    images: Sequence[UploadedImage]
    labels: Sequence[str]
    classes: object = None  # parsed JSON: {"cat": ["prompt", ...], "dog": {"prompts": [...], "templates": false}}


@dataclass(frozen=True)
class CreateTaskRequest(AddShotsRequest):
    name: str | None = None
    method: str | None = None  # None: the model's default; "auto": best by leave-one-out
    views: int | None = None
    templates: object = None  # parsed JSON: a list of templates with one {}
    hyperparams: object = None  # parsed JSON: {name: number} for `method`
    wait: bool = True  # False: answer at once, build in the background


@dataclass(frozen=True)
class ClassifyRequest:
    images: Sequence[UploadedImage]
    top_k: int = 5
    method: str | None = None  # None: the task's own
    abstain: bool = False
    evidence: int = 0  # nearest shots to return per image


@dataclass(frozen=True)
class UpdateTaskRequest:
    """A change of a built task that needs no new shots (absent fields stay as they are)."""

    method: str | None = None  # a method name or "auto": chosen again from the stored shots
    name: str | None = None
    rename: bool = False  # `name` was given (None then clears it)


# ---- checked requests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckedShots:
    images: Sequence[UploadedImage]
    labels: tuple[str, ...]  # stripped
    new_classes: tuple[ClassPrompts, ...]  # classes no earlier version has, in first-appearance order


@dataclass(frozen=True)
class CheckedCreate(CheckedShots):
    name: str | None
    method_requested: str  # "auto", a method name, or "default"
    target: str  # the method to choose: "auto" or a method name (the model's default resolved)
    views: int
    templates: tuple[str, ...] | None  # None: the model's default templates
    hyperparams: Mapping[str, float] | None  # fit `target` with these instead of tuning it
    wait: bool


@dataclass(frozen=True)
class CheckedUpdate:
    method_requested: str | None  # None: the method stays
    name: str | None
    rename: bool


@dataclass(frozen=True)
class CheckedClassify:
    images: Sequence[UploadedImage]
    top_k: int
    method: str | None
    abstain: bool
    evidence: int


def _invalid(code: ErrorCode, message: str) -> AppError:
    return AppError(code, message)


class RequestRules:
    """The rules every request must meet: the settings' limits and the known methods."""

    def __init__(self, settings: Settings, *, default_method: str, methods: Sequence[str] = METHODS) -> None:
        self.settings = settings
        self.default_method = default_method
        self.methods = tuple(methods)

    # ---- operations ---------------------------------------------------------------------------
    def create(self, request: CreateTaskRequest) -> CheckedCreate:
        labels = self._shots(request.images, request.labels)
        names = list(dict.fromkeys(labels))
        if len(names) < 2:
            raise _invalid(
                ErrorCode.TOO_FEW_CLASSES, f"a task needs at least 2 classes; got {len(names)} ({', '.join(names)})"
            )
        self._class_count(len(names))
        self._name(request.name)
        method = request.method
        if method is not None:
            self.method_name(method, allow_auto=True)
        views = self.settings.views if request.views is None else request.views
        if not 1 <= views <= MAX_VIEWS:
            raise _invalid(ErrorCode.INVALID_VIEWS, f"views must be between 1 and {MAX_VIEWS}, got {views}")
        templates = None if request.templates is None else self._templates(request.templates)
        hyperparams = None
        if request.hyperparams is not None:
            if method is None or method == AUTO:
                raise _invalid(ErrorCode.HYPERPARAMS_WITHOUT_METHOD, "hyperparams need an explicit method (not auto)")
            hyperparams = self._hyperparams(method, request.hyperparams)
        specs = self._class_specs(request.classes)
        self._only_labelled(specs, set(names))
        return CheckedCreate(
            images=request.images,
            labels=labels,
            new_classes=tuple(self._class(n, specs) for n in names),
            name=request.name,
            method_requested=method or DEFAULT,
            target=method or self.default_method,
            views=views,
            templates=templates,
            hyperparams=hyperparams,
            wait=request.wait,
        )

    def add_shots(self, request: AddShotsRequest, task: Task) -> CheckedShots:
        labels = self._shots(request.images, request.labels)
        existing = task.class_names
        new_names = [n for n in dict.fromkeys(labels) if n not in existing]
        self._class_count(len(existing) + len(new_names), what="the task would have")
        specs = self._class_specs(request.classes)
        redefined = sorted(set(specs) & set(existing))
        if redefined:
            raise _invalid(
                ErrorCode.CLASS_EXISTS,
                f"`classes` may only describe new classes; {redefined} already exist in the task "
                "(their prompts are fixed)",
            )
        self._only_labelled(specs, set(new_names))
        return CheckedShots(request.images, labels, tuple(self._class(n, specs) for n in new_names))

    def update(self, request: UpdateTaskRequest) -> CheckedUpdate:
        if request.method is None and not request.rename:
            raise _invalid(ErrorCode.INVALID_REQUEST, "nothing to change: give `method` and/or `name`")
        if request.method is not None:
            self.method_name(request.method, allow_auto=True)
        if request.rename:
            self._name(request.name)
        return CheckedUpdate(request.method, request.name, request.rename)

    def classify(self, request: ClassifyRequest, task: Task) -> CheckedClassify:
        limit = self.settings.max_classify_files
        if len(request.images) > limit:
            raise _invalid(
                ErrorCode.TOO_MANY_FILES,
                f"{len(request.images)} images in one classify request; the limit is {limit}",
            )
        if not request.images:
            raise _invalid(ErrorCode.NO_IMAGES, "no images: send one or more `images` files")
        if not 1 <= request.top_k <= self.settings.max_top_k:
            raise _invalid(
                ErrorCode.INVALID_TOP_K, f"top_k must be between 1 and {self.settings.max_top_k}, got {request.top_k}"
            )
        if request.method == AUTO:  # /v1/info lists it among the methods: say where it applies
            raise _invalid(
                ErrorCode.UNKNOWN_METHOD,
                f"method 'auto' is chosen when a task is created (method=auto on create); at classify, leave "
                f"method out for this task's own ({task.method}) or name one of: {', '.join(task.fits)}",
            )
        if request.method is not None and request.method not in task.fits:
            raise _invalid(
                ErrorCode.UNKNOWN_METHOD, f"unknown method {request.method!r}; valid: {', '.join(task.fits)}"
            )
        if not 0 <= request.evidence <= self.settings.max_top_k:
            raise _invalid(
                ErrorCode.INVALID_EVIDENCE,
                f"evidence must be between 0 and {self.settings.max_top_k}, got {request.evidence}",
            )
        return CheckedClassify(request.images, request.top_k, request.method, request.abstain, request.evidence)

    def method_name(self, name: str, *, allow_auto: bool) -> str:
        valid = (AUTO, *self.methods) if allow_auto else self.methods
        if name not in valid:
            raise _invalid(ErrorCode.UNKNOWN_METHOD, f"unknown method {name!r}; valid: {', '.join(valid)}")
        return name

    # ---- parts --------------------------------------------------------------------------------
    def _name(self, name: str | None) -> None:
        if name is not None and len(name) > MAX_NAME_CHARS:
            raise _invalid(ErrorCode.NAME_TOO_LONG, f"name is longer than {MAX_NAME_CHARS} characters")

    def _shots(self, images: Sequence[UploadedImage], raw_labels: Sequence[str]) -> tuple[str, ...]:
        limit = self.settings.max_create_files
        if len(images) > limit:
            raise _invalid(ErrorCode.TOO_MANY_FILES, f"{len(images)} images in one request; the limit is {limit}")
        if not images:
            raise _invalid(ErrorCode.NO_IMAGES, "no images: send one or more `images` files with matching `labels`")
        if len(raw_labels) != len(images):
            raise _invalid(
                ErrorCode.LABELS_MISMATCH,
                f"{len(images)} images but {len(raw_labels)} labels: send one label per image, same order",
            )
        labels = tuple(label.strip() for label in raw_labels)
        for i, label in enumerate(labels):
            if not label:
                raise _invalid(ErrorCode.EMPTY_LABEL, f"label {i} is empty")
            if len(label) > MAX_LABEL_CHARS:
                raise _invalid(ErrorCode.LABEL_TOO_LONG, f"label {i} is longer than {MAX_LABEL_CHARS} characters")
        return labels

    def _class_count(self, count: int, *, what: str = "") -> None:
        if count > self.settings.max_classes:
            subject = f"{what} {count} classes" if what else f"{count} classes"
            raise _invalid(ErrorCode.TOO_MANY_CLASSES, f"{subject.strip()}; the limit is {self.settings.max_classes}")

    @staticmethod
    def _templates(value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise _invalid(
                ErrorCode.INVALID_TEMPLATES, '`templates` must be a JSON list of strings, e.g. ["a photo of a {}."]'
            )
        try:
            return tuple(check_templates(value))
        except ValueError as exc:
            raise _invalid(ErrorCode.INVALID_TEMPLATES, str(exc)) from None

    @staticmethod
    def _hyperparams(method: str, value: object) -> dict[str, float]:
        if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        ):
            raise _invalid(ErrorCode.INVALID_HYPERPARAMS, "`hyperparams` must be a JSON object of numbers")
        hyperparams = {str(k): float(v) for k, v in value.items()}
        try:
            get_method(method)(**hyperparams)  # the method's own checks: names, ranges, integers
        except ValueError as exc:
            raise _invalid(ErrorCode.INVALID_HYPERPARAMS, str(exc)) from None
        return hyperparams

    @staticmethod
    def _class_specs(value: object) -> dict[str, tuple[tuple[str, ...], bool]]:
        """`{"cat": ["a feline"], "dog": {"prompts": [...], "templates": false}}` -> name: (prompts, templates)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _invalid(ErrorCode.INVALID_CLASSES, "`classes` must be a JSON object mapping class names to prompts")
        out = {}
        for name, spec in value.items():
            if isinstance(spec, list):
                spec = {"prompts": spec}
            if not isinstance(spec, dict) or set(spec) - {"prompts", "templates"}:
                raise _invalid(
                    ErrorCode.INVALID_CLASSES,
                    f'`classes[{name!r}]` must be a list of prompts or {{"prompts": [...], "templates": bool}}',
                )
            prompts = spec.get("prompts", [])
            templates = spec.get("templates", True)
            if (
                not isinstance(prompts, list)
                or not all(isinstance(p, str) for p in prompts)
                or not isinstance(templates, bool)
            ):
                raise _invalid(
                    ErrorCode.INVALID_CLASSES, f"`classes[{name!r}]`: prompts must be strings, templates a boolean"
                )
            out[str(name).strip()] = (tuple(prompts), templates)
        return out

    @staticmethod
    def _only_labelled(specs: Mapping[str, object], labels: set[str]) -> None:
        unknown = sorted(set(specs) - labels)
        if unknown:
            raise _invalid(
                ErrorCode.UNKNOWN_CLASS_IN_CLASSES, f"`classes` names {unknown}, which no image is labelled with"
            )

    @staticmethod
    def _class(name: str, specs: Mapping[str, tuple[tuple[str, ...], bool]]) -> ClassPrompts:
        prompts, templates = specs.get(name, ((), True))
        try:
            return ClassPrompts(name, prompts, templates)
        except ValueError as exc:
            raise _invalid(ErrorCode.INVALID_CLASS_PROMPTS, str(exc)) from None
