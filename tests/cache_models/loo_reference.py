"""Brute-force leave-one-out: refit (the dense reference of) a method without each held-out shot.

Statistics methods.md allows to come from the FULL support are taken from it, as the library does:
Tip-X's psi constants (a range, frozen at fit time), APE's channel selection (criterion over text
and all keys), GDA's shrinkage scalar trace(Sigma). Everything that is the cache (keys, class means,
GDA's scatter, ProKeR's whole ridge solve) excludes the held-out shot's whole group.

Count correction (cache_models/tuning.py): for the key caches the own class's summed terms (cache
and Tip-X penalty, i.e. logits - Z in that column) are scaled by R_c / (R_c - g), R_c the rows of
the class and g those of the held-out group, as if the masked keys were replaced by the class mean.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from . import reference
from .conftest import Task

F64 = npt.NDArray[np.float64]


def loo_logits(name: str, t: Task, groups: npt.NDArray[np.int64], rows: npt.ArrayLike, **hp: float) -> F64:
    """Logits of each row in `rows` from the method built on every row outside its group."""
    n = t.n_classes
    if name == "tip-x":
        full_psi = reference.tip_x_psi_constants(t.keys, t.text, hp.get("tau", 0.5))
    if name == "ape":
        n_channels = int(hp.get("n_channels", 0)) or max(1, t.keys.shape[1] // 2)
        lambdas = {k: hp[k] for k in ("lambda1", "lambda2") if k in hp}
        full_channels = reference.ape_channels(t.keys, t.labels, t.text, n_channels=n_channels, **lambdas)
    if name == "gda":
        full_trace = reference.gda_trace(t.keys, t.labels, n)
    out = []
    for r in np.asarray(rows):
        keep = groups != groups[r]
        q, keys, labels = t.keys[r : r + 1], t.keys[keep], t.labels[keep]
        own = t.labels[r]
        factor = np.sum(t.labels == own) / np.sum(labels == own)
        if name == "zero-shot":
            out.append(reference.zero_shot(q, t.text, hp.get("scale", 100.0)))
        elif name == "proker":  # a plain refit: kernel ridge's leave-group-out needs no correction
            out.append(reference.proker(q, keys, labels, t.text, **hp))
        elif name == "gda":
            precision = reference.gda_precision(keys, labels, n, trace=full_trace)
            out.append(reference.gda(q, keys, labels, t.text, precision=precision, **hp))
        else:
            if name == "tip-adapter":
                logits = reference.tip_adapter(q, keys, labels, t.text, **hp)
            elif name == "tip-x":
                logits = reference.tip_x(q, keys, labels, t.text, psi=full_psi, **hp)
            else:
                ape_hp = {k: v for k, v in hp.items() if k != "n_channels"}
                logits = reference.ape(q, keys, labels, t.text, channels=full_channels, n_channels=0, **ape_hp)
            zero = reference.zero_shot(q, t.text, hp.get("scale", 100.0))
            logits[:, own] = zero[:, own] + factor * (logits[:, own] - zero[:, own])
            out.append(logits)
    return np.concatenate(out)


def calibrated_nll(logits: F64, labels: npt.ArrayLike, smoothing: float = 0.01) -> float:
    """min over s > 0 of mean cross-entropy of softmax(s * logits) against one-hot targets smoothed by
    `smoothing` (spread uniformly over the classes), by golden-section search on log s (the loss is
    convex in s, so unimodal in log s). Independent of the library's Newton fit."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    target = np.full(z.shape, smoothing / z.shape[1])
    target[np.arange(z.shape[0]), np.asarray(labels)] += 1.0 - smoothing
    zy = np.sum(target * z, axis=1)

    def loss(t: float) -> float:
        s = math.exp(t)
        a = s * z
        return float(np.mean(np.log(np.exp(a).sum(axis=1)) - s * zy))

    lo, hi = -20.0, 20.0
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(200):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    return loss(0.5 * (lo + hi))
