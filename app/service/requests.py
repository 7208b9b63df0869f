"""What the HTTP layer hands the service: typed, size-checked requests. Semantics are checked here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from app.encoder import ClassPrompts, check_templates
from app.settings import Settings
from cache_models import METHODS

from .build import AUTO
from .errors import InvalidInput, PayloadTooLarge
from .task import ClassInfo

MAX_LABEL_CHARS = 100
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class UploadedImage:
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class ClassSpec:
    """Per-class text options: extra prompts/descriptions, and whether the templates apply too."""

    prompts: tuple[str, ...] = ()
    templates: bool = True


@dataclass(frozen=True)
class ShotsRequest:
    images: Sequence[UploadedImage]
    labels: Sequence[str]
    classes: Mapping[str, ClassSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class CreateTaskRequest(ShotsRequest):
    name: str | None = None
    method: str | None = None  # None: the model's default; "auto": best by leave-one-out
    views: int | None = None
    templates: Sequence[str] | None = None
    hyperparams: Mapping[str, float] | None = None


def check_shots(request: ShotsRequest, settings: Settings) -> list[str]:
    """Validate images/labels; returns the cleaned labels."""
    if len(request.images) > settings.max_create_files:
        raise PayloadTooLarge(
            f"{len(request.images)} images in one request; the limit is {settings.max_create_files}",
            code="too_many_files",
        )
    if not request.images:
        raise InvalidInput("no images: send one or more `images` files with matching `labels`", code="no_images")
    if len(request.labels) != len(request.images):
        raise InvalidInput(
            f"{len(request.images)} images but {len(request.labels)} labels: send one label per image, same order",
            code="labels_mismatch",
        )
    labels = [label.strip() for label in request.labels]
    for i, label in enumerate(labels):
        if not label:
            raise InvalidInput(f"label {i} is empty", code="empty_label")
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidInput(f"label {i} is longer than {MAX_LABEL_CHARS} characters", code="label_too_long")
    return labels


def check_create(request: CreateTaskRequest, settings: Settings) -> list[str]:
    labels = check_shots(request, settings)
    distinct = set(labels)
    if len(distinct) < 2:
        raise InvalidInput(
            f"a task needs at least 2 classes; got {len(distinct)} ({', '.join(sorted(distinct))})",
            code="too_few_classes",
        )
    if len(distinct) > settings.max_classes:
        raise InvalidInput(f"{len(distinct)} classes; the limit is {settings.max_classes}", code="too_many_classes")
    if request.name is not None and len(request.name) > MAX_NAME_CHARS:
        raise InvalidInput(f"name is longer than {MAX_NAME_CHARS} characters", code="name_too_long")
    if request.method is not None and request.method not in (AUTO, *METHODS):
        raise InvalidInput(
            f"unknown method {request.method!r}; valid: {AUTO}, {', '.join(METHODS)}", code="unknown_method"
        )
    if request.views is not None and not 1 <= request.views <= 32:
        raise InvalidInput(f"views must be between 1 and 32, got {request.views}", code="invalid_views")
    if request.templates is not None:
        try:
            check_templates(request.templates)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="invalid_templates") from None
    if request.hyperparams is not None and request.method in (None, AUTO):
        raise InvalidInput("hyperparams need an explicit method (not auto)", code="hyperparams_without_method")
    check_class_specs(request.classes, distinct)
    return labels


def check_class_specs(classes: Mapping[str, ClassSpec], labels: set[str]) -> None:
    unknown = sorted(set(classes) - labels)
    if unknown:
        raise InvalidInput(
            f"`classes` names {unknown}, which no image is labelled with", code="unknown_class_in_classes"
        )
    for name, spec in classes.items():
        try:
            ClassPrompts(name, spec.prompts, spec.templates)
        except ValueError as exc:
            raise InvalidInput(str(exc), code="invalid_class_prompts") from None


def class_info(name: str, classes: Mapping[str, ClassSpec]) -> ClassInfo:
    spec = classes.get(name, ClassSpec())
    return ClassInfo(name, tuple(spec.prompts), spec.templates)
