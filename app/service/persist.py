"""Task <-> store snapshot. The store is schema-agnostic; this module is the schema.

Loading fits only the task's own method (the ENSEMBLE's: its members); the others keep their stored state
and are fitted on first use (task.py).

The ENSEMBLE (`method=auto` from a few shots per class on) is stored beside the methods, not among them:
`meta["ensemble"]` holds its members and report, `meta["methods"]` only real methods, and `meta["method"]`
its first member. A replica running code from before the ensemble (a rolling upgrade on a shared store)
ignores the key it does not know and serves that best single method; a current one serves the ensemble.
`meta["selection"]` (how `auto` ranked the methods) is optional in the same way: absent in tasks stored
before it existed and in tasks built with a named method, and a malformed one is dropped, not the task.

The shots (features in shot order, labels, seeds) and the class text are stored once; each method adds
only the state that is its own (`CacheMethod.extra_state`, e.g. Tip-X's psi constants), since its
support is rebuilt from the shared arrays exactly as at build. Nothing else is stored: no FAISS index
(search runs on the support's keys), no derived copy of the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from app.encoder import ClassPrompts
from app.fewshot import make_supports
from app.store import TaskSnapshot
from cache_models import get_method
from cache_models.selection import Ranked

from .task import ENSEMBLE, SELECTION_RULES, AutoSelection, MethodFit, Task

log = logging.getLogger(__name__)

SCHEMA = 1


def to_snapshot(task: Task) -> TaskSnapshot:
    arrays: dict[str, np.ndarray] = {
        "shot_features": task.shot_features,
        "shot_labels": task.shot_labels,
        "shot_seeds": task.shot_seeds,
        "text": task.text,
        "thumbnails": task.thumbnail_data,
        "thumbnail_offsets": task.thumbnail_offsets,
    }
    methods_meta: dict[str, dict[str, Any]] = {}
    ensemble: dict[str, Any] | None = None
    for name, fit in task.fits.items():
        for key, value in fit.state.items():
            arrays[f"method/{name}/{key}"] = value
        arrays[f"loo/{name}/labels"] = fit.loo_labels
        arrays[f"loo/{name}/predicted"] = fit.loo_predicted
        info = {
            "hyperparams": dict(fit.hyperparams),
            "loo_accuracy": fit.loo_accuracy,
            "loo_nll": fit.loo_nll,
            "temperature": fit.temperature,
            "abstain_threshold": fit.abstain_threshold,
            "n_scored": fit.n_scored,
            "fallback": fit.fallback,
        }
        if fit.members:  # the ENSEMBLE: outside `methods` (module docstring); its members are stored there
            ensemble = {**info, "members": list(fit.members)}
        else:
            methods_meta[name] = info
    meta = {
        "schema": SCHEMA,
        "name": task.name,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "model_id": task.model_id,
        "backend": task.backend,
        "views": task.views,
        "templates": list(task.templates),
        "classes": [{"name": c.name, "prompts": list(c.prompts), "templates": c.templates} for c in task.classes],
        "method": task.members()[0],  # the ENSEMBLE's first member, for readers that do not know it
        "method_requested": task.method_requested,
        "methods": methods_meta,
    }
    if ensemble is not None:
        meta["ensemble"] = ensemble
    if task.selection is not None:
        meta["selection"] = selection_meta(task.selection)
    return TaskSnapshot(task.tenant, task.task_id, task.version, meta, arrays, task.incarnation)


def from_snapshot(snapshot: TaskSnapshot) -> Task:
    """Rebuild a task; ValueError/KeyError/TypeError mean the snapshot is not a usable task."""
    meta: dict[str, Any] = dict(snapshot.meta)
    if meta.get("schema") != SCHEMA:
        raise ValueError(f"task schema {meta.get('schema')!r} is not {SCHEMA}")
    arrays = snapshot.arrays
    features = np.asarray(arrays["shot_features"], dtype=np.float32)
    labels = np.asarray(arrays["shot_labels"], dtype=np.int64)
    text = np.asarray(arrays["text"], dtype=np.float32)
    views = int(meta["views"])
    supports = make_supports(features, labels, text, views)
    fits = {}
    for name, info in meta["methods"].items():
        hyperparams = get_method(name)(**info["hyperparams"]).hyperparams  # checked now, fitted on first use
        prefix = f"method/{name}/"
        state = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
        fits[name] = _fit(name, info, arrays, hyperparams=hyperparams, state=state)
    if meta["method"] not in fits:
        raise ValueError(f"task method {meta['method']!r} has no fitted state")
    method = str(meta["method"])
    if "ensemble" in meta:  # served instead of meta["method"], its first member (module docstring)
        info = meta["ensemble"]
        members = tuple(str(m) for m in info["members"])
        if len(set(members)) != len(members) or len(members) < 2 or set(members) - set(fits) or members[0] != method:
            raise ValueError(f"{ENSEMBLE}: members {members} are not methods of the task led by {method!r}")
        fits[ENSEMBLE] = _fit(ENSEMBLE, info, arrays, hyperparams={}, state={}, members=members)
        method = ENSEMBLE
    task = Task(
        tenant=snapshot.tenant,
        task_id=snapshot.task_id,
        name=meta["name"],
        version=snapshot.version,
        created_at=float(meta["created_at"]),
        updated_at=float(meta["updated_at"]),
        model_id=str(meta["model_id"]),
        backend=str(meta["backend"]),
        views=views,
        templates=tuple(meta["templates"]),
        classes=tuple(ClassPrompts(c["name"], tuple(c["prompts"]), bool(c["templates"])) for c in meta["classes"]),
        supports=supports,
        shot_seeds=np.asarray(arrays["shot_seeds"], dtype=np.int64),
        fits=fits,
        method=method,
        method_requested=str(meta["method_requested"]),
        thumbnail_data=np.asarray(arrays.get("thumbnails", np.zeros(0)), dtype=np.uint8),
        thumbnail_offsets=np.asarray(arrays.get("thumbnail_offsets", np.zeros(1)), dtype=np.int64),
        incarnation=snapshot.incarnation,
        selection=_selection(snapshot.task_id, meta.get("selection")),
    )
    # The method classify uses (the ENSEMBLE's: its members) is fitted now (a state it cannot use fails
    # the load here, not a request); the others on their first use.
    for name in task.members():
        task.fitted.keep(task.fits[name].fit(supports))
    return task


def _fit(
    name: str,
    info: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    hyperparams: dict[str, Any],
    state: dict[str, Any],
    members: tuple[str, ...] = (),
) -> MethodFit:
    return MethodFit(
        name=name,
        hyperparams=hyperparams,
        state=state,
        loo_accuracy=info["loo_accuracy"],
        loo_nll=info["loo_nll"],
        temperature=float(info["temperature"]),
        abstain_threshold=info["abstain_threshold"],
        n_scored=int(info["n_scored"]),
        fallback=info["fallback"],
        # Absent in tasks stored before the confusion matrix was kept: no matrix, nothing else lost.
        loo_labels=np.asarray(arrays.get(f"loo/{name}/labels", np.zeros(0)), dtype=np.int64),
        loo_predicted=np.asarray(arrays.get(f"loo/{name}/predicted", np.zeros(0)), dtype=np.int64),
        members=members,
    )


def selection_meta(selection: AutoSelection) -> dict[str, Any]:
    return {
        "rule": selection.rule,
        "ranking": [{"method": r.method, "accuracy": r.accuracy, "nll": r.nll} for r in selection.ranking],
        "folds": selection.folds,
        "compared_classes": selection.compared_classes,
        "scored_shots": selection.scored_shots,
        "retuned": selection.retuned,
    }


def _selection(task_id: str, info: Any) -> AutoSelection | None:
    if info is None:
        return None
    try:
        rule = next(r for r in SELECTION_RULES if r == info["rule"])  # StopIteration: not a rule
        return AutoSelection(
            rule=rule,
            ranking=tuple(Ranked(str(r["method"]), float(r["nll"]), float(r["accuracy"])) for r in info["ranking"]),
            folds=int(info["folds"]),
            compared_classes=int(info["compared_classes"]),
            scored_shots=int(info["scored_shots"]),
            retuned=bool(info["retuned"]),
        )
    except (KeyError, TypeError, ValueError, StopIteration) as exc:  # an explanation, not the task: serve it without
        log.warning(
            "task %s: its stored `auto` ranking is unreadable (%s: %s); served without it",
            task_id,
            type(exc).__name__,
            exc,
        )
        return None
