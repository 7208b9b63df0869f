"""Service objects -> response schemas."""

from __future__ import annotations

from app.service import BuildStatus, Task

from ..schemas import BuildOut, ClassLooOut, ClassOut, ConfusionCount, ErrorBody, LooOut, MethodOut, TaskOut


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
        hyperparams=fit.method.hyperparams,
        loo_accuracy=fit.loo_accuracy,
        loo=loo_out(task),
        methods={name: MethodOut(**f.summary()) for name, f in task.fits.items()},
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
    error = ErrorBody(**status.error) if status.error else None
    return BuildOut(id=status.task_id, status=status.state, done=status.done, total=status.total, error=error)
