"""Response bodies (and the JSON parts of multipart requests), as pydantic models for OpenAPI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. labels_mismatch, task_not_found.")
    message: str = Field(description="What was wrong, in words.")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ClassOut(BaseModel):
    name: str
    shots: int
    prompts: list[str]
    templates: bool


class MethodOut(BaseModel):
    method: str
    members: list[str] = Field(
        default_factory=list,
        description="For `ensemble` (what `auto` serves from a few shots per class on): the methods whose calibrated "
        "probabilities it averages; its leave-one-out figures are then the blend's on auto's shot folds (over "
        "at most 64 of the task's classes, a fixed subset beyond). Empty for a method.",
    )
    hyperparams: dict[str, float | int]
    loo_accuracy: float | None = Field(description="Leave-one-out accuracy on the shots (None if impossible).")
    loo_nll: float | None
    temperature: float = Field(description="Calibration temperature fitted on the leave-one-out logits.")
    abstain_threshold: float | None
    loo_scored_shots: int
    fallback: str | None


class ClassLooOut(BaseModel):
    name: str
    scored: int = Field(description="Shots of this class that leave-one-out scored.")
    correct: int = Field(description="Of those, how many leave-one-out classified as this class.")
    accuracy: float | None = Field(description="correct / scored (None when no shot was scored).")


class ConfusionCount(BaseModel):
    actual: str = Field(description="The shots' class.")
    predicted: str = Field(description="What leave-one-out classified them as.")
    count: int


class LooOut(BaseModel):
    """What leave-one-out said about the task's method, per class."""

    method: str
    classes: list[ClassLooOut] = Field(description="Per class, in the task's class order.")
    confusion: list[ConfusionCount] = Field(
        description="The confusion matrix's non-zero cells: scored shots of class `actual` that leave-one-out "
        "classified as `predicted` (the diagonal included)."
    )


class RankedMethodOut(BaseModel):
    method: str
    fold_accuracy: float = Field(description="Accuracy on the held-out shots, the method refitted without each fold.")
    fold_nll: float = Field(description="Calibrated cross-entropy on the same held-out shots; ranks, lowest first.")


class SelectionOut(BaseModel):
    """How `method=auto` chose: every cache method refitted on the same shot folds and ranked, best first."""

    rule: Literal["blend", "best", "one-shot", "default"] = Field(
        description="`blend`: the mean of the calibrated probabilities of the two ranked first (from 3 shots per "
        "class); `best`: the first alone (2 shots per class); `one-shot`: no class has two shots, nothing can be "
        "held out, the one-shot choice is taken; `default`: nothing to choose from, the model's default."
    )
    ranking: list[RankedMethodOut] = Field(description="Best first; zero-shot takes no part. Empty for one-shot.")
    folds: int = Field(description="Shot folds: each class's shots dealt round-robin, each fold held out once.")
    compared_classes: int = Field(description="Classes compared: all, or a fixed subset of 64 for a larger task.")
    scored_shots: int
    retuned: bool = Field(description="Each method's search re-run inside every fold (at 4 shots per class).")


class TaskOut(BaseModel):
    id: str
    status: Literal["ready"] = "ready"
    name: str | None
    version: int
    created_at: float
    updated_at: float
    model: str = Field(description="Identity of the model the task's features come from.")
    backend: str
    views: int
    templates: list[str]
    classes: list[ClassOut]
    method: str = Field(description="The method classify uses by default.")
    method_requested: str
    hyperparams: dict[str, float | int]
    loo_accuracy: float | None = Field(description="Leave-one-out accuracy estimate of `method`.")
    loo: LooOut | None = Field(
        default=None, description="Per-class leave-one-out accuracy and confusion matrix of `method`."
    )
    methods: dict[str, MethodOut]
    selection: SelectionOut | None = Field(
        default=None,
        description="For a task created with method=auto: why `method` was chosen (null for a named method, and for "
        "a task stored before this field existed until PATCH method=auto ranks it). Each method's own "
        "`loo_accuracy` above is not comparable across methods (APE's and GDA's statistics see the held-out shot); "
        "this ranking is, every method scored on the same held-out shots.",
    )


class TaskUpdate(BaseModel):
    """PATCH /v1/tasks/{id}: what to change; a field left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(
        default=None,
        description="A method name or `auto`: every method is tuned again on the stored shots (nothing is "
        "re-encoded) and this one serves; `auto` ranks them again (`selection`).",
    )
    name: str | None = Field(default=None, description="A new name; null clears it.")


class BuildOut(BaseModel):
    id: str
    status: Literal["building", "failed"]
    done: int = Field(description="Shots encoded so far.")
    total: int
    error: ErrorBody | None = None


class TaskList(BaseModel):
    tasks: list[TaskOut]
    building: list[BuildOut]


class LabelProbability(BaseModel):
    label: str
    probability: float


class EvidenceOut(BaseModel):
    shot: int = Field(description="The shot's id in its task (thumbnail: /v1/tasks/{id}/shots/{shot}/thumbnail).")
    label: str = Field(description="The shot's class.")
    similarity: float = Field(description="Cosine similarity of the image's and the shot's features.")


class ImageResult(BaseModel):
    filename: str | None
    label: str | None = Field(description="Best class, or null when abstaining.")
    top_k: list[LabelProbability]
    method: str
    model: str
    reason: str | None = None
    evidence: list[EvidenceOut] | None = Field(
        default=None, description="The nearest support shots (`evidence=k`), most similar first."
    )


class ClassifyOut(BaseModel):
    task_id: str
    task_version: int
    model: str
    results: list[ImageResult]


class Health(BaseModel):
    status: str


class Info(BaseModel):
    version: str
    model: dict[str, Any]
    methods: list[str]
    default_method: str
    limits: dict[str, float | int]
    tasks: int
    damaged_tasks: list[dict[str, Any]]
    queue: dict[str, int]
    store: str = Field(description="Where tasks live: a local directory, or a PostgreSQL URL without its password.")
    auth: Literal["open", "api-keys"]


class Usage(BaseModel):
    tenants: dict[str, dict[str, int]]
