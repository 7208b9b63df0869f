"""One or two shots per class: where leave-one-out cannot be trusted on its own.

With one shot per class, leave-one-out removes the class from its own cache and can only pick "no
cache". With two, each held-out shot meets its class through ONE remaining shot: its judgement is
so noisy that it picks near-zero-shot points (GDA picked alpha ~ 0 on a held-out set where its paper
default was 10 points better). So at FEW_SHOT_MAX shots or fewer in some class, each method's
*few-shot rule* (hyper-parameters from the shots' zero-shot temperature, constants chosen on
simulated few-shot tasks from the shared data sets' TRAIN splits only, docs/benchmarks.md) competes
with leave-one-out's pick, scored by leave-one-out itself, and wins unless the pick is better by
more than RULE_MARGIN nats of calibrated cross-entropy per scored shot.

RULE_MARGIN is infinite: on 2-shot tasks simulated from both TRAIN splits (10 draws each), every
finite margin tried (0, 0.02, 0.05, 0.1, 0.2) lost to always keeping the rule for some method, by up
to 9 points (ProKeR and GDA on cifar10-mini: leave-one-out's pick beat the rule's cross-entropy by
more than 0.2 nats and classified the held-out train images 9-10 points worse); nor did shrinking
leave-one-out's pick towards the rule (log-space weights 0.1-0.75 on the pick: no weight helped both
data sets, large ones lost up to 16 points; round 2, third session). At 2 shots leave-
one-out still scores the rule, so the probabilities are calibrated by it (`auto` compares methods
on shared shot folds instead, cache_models.selection); at 3 shots and more leave-one-out's own pick
stands.

The rule's scale: the cache should weigh more the less the text knows, and the zero-shot temperature
fitted on the shots (zero-shot needs no held-out cache, so it can always be fitted) measures exactly
that: near the logit scale's own units for an informative text prior, thousands when the class names
mean nothing to the model. A kernel's sharpness is set by the shots' own geometry where a rule needs
one (ProKeR): the median heuristic, beta relative to the shots' typical cosine distance
(`typical_distance`; about 0.5 between cifar10-mini's photos, 0.03 between textile-defects' fabric
images with the stand-in, so one fixed beta cannot serve both).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ._validation import IntArray, Support
from .tune_report import TuneReport, report_from_logits
from .tuning import LooScorer, fit_temperature, score_logits

if TYPE_CHECKING:
    from .base import CacheMethod

FEW_SHOT_MAX = 2  # shots per class at or below which the rule competes with leave-one-out
RULE_MARGIN = math.inf  # nats per scored shot leave-one-out's pick must win by (module docstring)
DISTANCE_MAX_ROWS = 1024  # keys the typical distance is taken over at most (a fixed-seed subset beyond)
_SEED = 0


def typical_distance(support: Support) -> float | None:
    """The median cosine distance 1 - cos(k_i, k_j) over pairs of keys of different shots (groups);
    None when there is no such pair. At most DISTANCE_MAX_ROWS keys (fixed-seed subset), so at most
    ~0.5M pairs whatever the support's size."""
    rows = np.arange(support.n_rows)
    if rows.size > DISTANCE_MAX_ROWS:
        rows = np.sort(np.random.default_rng(_SEED).choice(rows, DISTANCE_MAX_ROWS, replace=False))
    keys = support.keys[rows].astype(np.float64)
    upper = np.triu_indices(rows.size, k=1)
    groups = support.groups[rows]
    distinct = groups[upper[0]] != groups[upper[1]]
    if not np.any(distinct):
        return None
    distances = 1.0 - (keys @ keys.T)[upper][distinct]
    return float(np.median(distances))


def zero_shot_temperature(support: Support, scale: float) -> float:
    """The temperature that calibrates the zero-shot logits scale * F W^T on the shots themselves."""
    zero_shot = (scale * (support.keys @ support.text.T)).astype(np.float32)
    temperature, _ = fit_temperature(zero_shot, support.labels)
    return temperature


def prefer_rule(
    scorer: LooScorer, labels: IntArray, searched: TuneReport, rule: Mapping[str, float], *, margin: float, why: str
) -> TuneReport:
    """The rule's point unless the searched one beats it by more than `margin` in calibrated LOO
    cross-entropy (nats per scored row). For supports where leave-one-out is nearly degenerate (a
    held-out shot leaves its class one shot): there its preference is noisy, so it must win clearly.
    Both points are scored by the same scorer, so the report is LOO's own judgement of the rule."""
    logits = scorer.logits(dict(rule))
    score = score_logits(logits, labels, searched.temperature)
    searched_nll = searched.nll if searched.nll is not None else np.inf
    if searched_nll < score.nll - margin:
        return searched
    report = report_from_logits(
        dict(rule), score.nll, score.accuracy, score.temperature, logits, labels, searched.n_evaluated + 1
    )
    return dataclasses.replace(report, fallback=why)


def few_shot_choice(
    method: CacheMethod, support: Support, scorer: LooScorer, rows: IntArray, searched: TuneReport
) -> TuneReport:
    """`searched` (leave-one-out's pick), or the method's few-shot rule where it should win."""
    if int(support.shots_per_class().min()) > FEW_SHOT_MAX:
        return searched
    temperature = zero_shot_temperature(support, method.scale)
    rule = method.few_shot_rule(support, temperature)
    if rule is None:
        return searched
    params = {**{k: float(v) for k, v in method.hyperparams.items()}, **rule}
    why = (
        f"a class has {FEW_SHOT_MAX} shots or fewer: the few-shot rule (zero-shot temperature "
        f"{temperature:.4g}) was kept; leave-one-out with one remaining shot per class is not trusted over it"
    )
    return prefer_rule(scorer, support.labels[rows], searched, params, margin=RULE_MARGIN, why=why)


def single_shot_report(method: CacheMethod, support: Support) -> TuneReport | None:
    """The few-shot rule as the whole choice, for one shot per class (nothing to score)."""
    temperature = zero_shot_temperature(support, method.scale)
    rule = method.few_shot_rule(support, temperature)
    if rule is None:
        return None
    return TuneReport(
        hyperparams={**{k: float(v) for k, v in method.hyperparams.items()}, **rule},
        accuracy=None,
        nll=None,
        temperature=temperature,  # logits / T keep the zero-shot part calibrated
        n_scored=0,
        fallback=f"one shot per class: leave-one-out cannot score the cache; the few-shot rule "
        f"(zero-shot temperature {temperature:.4g}) was used",
    )
