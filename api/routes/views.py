"""Service objects -> response schemas."""

from __future__ import annotations

from collections.abc import Sequence

from app.service import AutoSelection, BuildStatus, Classification, Task, UploadedImage

from ..schemas import (
    BuildOut,
    ClassifyOut,
    ClassLooOut,
    ClassOut,
    ConfusionCount,
    ErrorBody,
    EvidenceOut,
    ImageResult,
    LabelProbability,
    LooOut,
    MethodOut,
    RankedMethodOut,
    SelectionOut,
    TaskOut,
)


def task_out(task: Task) -> TaskOut:
    counts = task.shot_counts()
    fit = task.fits[task.method]
    return TaskOut(
        id=task.task_id,
        name=task.name,
        version=task.version,
        created_at=task.created_at,
        updated_at=task.updated_at,
        model=task.model_id,
        backend=task.backend,
        views=task.views,
        templates=list(task.templates),
        classes=[
            ClassOut(name=c.name, shots=n, prompts=list(c.prompts), templates=c.templates)
            for c, n in zip(task.classes, counts, strict=True)
        ],
        method=task.method,
        method_requested=task.method_requested,
        hyperparams=task.hyperparams(),
        loo_accuracy=fit.loo_accuracy,
        loo=loo_out(task),
        methods={name: MethodOut(**f.summary()) for name, f in task.fits.items()},
        selection=selection_out(task.selection),
    )


def selection_out(selection: AutoSelection | None) -> SelectionOut | None:
    if selection is None:
        return None
    return SelectionOut(
        rule=selection.rule,
        ranking=[RankedMethodOut(method=r.method, fold_accuracy=r.accuracy, fold_nll=r.nll) for r in selection.ranking],
        folds=selection.folds,
        compared_classes=selection.compared_classes,
        scored_shots=selection.scored_shots,
        retuned=selection.retuned,
    )


def loo_out(task: Task) -> LooOut:
    """Per-class leave-one-out of the task's method, and its confusion matrix's non-zero cells."""
    names = task.class_names
    matrix = task.fits[task.method].confusion(len(names))
    scored = matrix.sum(axis=1)
    return LooOut(
        method=task.method,
        classes=[
            ClassLooOut(
                name=name,
                scored=int(scored[i]),
                correct=int(matrix[i, i]),
                accuracy=float(matrix[i, i] / scored[i]) if scored[i] else None,
            )
            for i, name in enumerate(names)
        ],
        confusion=[
            ConfusionCount(actual=names[i], predicted=names[j], count=int(matrix[i, j]))
            for i, j in zip(*matrix.nonzero(), strict=True)
        ],
    )


def build_out(status: BuildStatus) -> BuildOut:
    error = None
    if status.error_code is not None:
        error = ErrorBody(code=status.error_code, message=status.error_message or "")
    return BuildOut(id=status.task_id, status=status.state, done=status.done, total=status.total, error=error)


def classify_out(answer: Classification, uploads: Sequence[UploadedImage]) -> ClassifyOut:
    task = answer.task
    return ClassifyOut(
        task_id=task.task_id,
        task_version=task.version,
        model=task.model_id,
        results=[
            ImageResult(
                filename=upload.filename,
                label=p.label,
                top_k=[LabelProbability(label=name, probability=prob) for name, prob in p.top_k],
                method=p.method,
                model=task.model_id,
                reason=p.reason,
                evidence=None
                if p.evidence is None
                else [EvidenceOut(shot=s, label=label, similarity=c) for s, label, c in p.evidence],
            )
            for upload, p in zip(uploads, answer.predictions, strict=True)
        ],
    )
