"""Image-guided prompt weighting (TIMO's IGT, training-free): a class's text weight from several prompts.

CLIP's usual class text weight is the plain mean of its prompts' normalised embeddings. With a few
shots of the class at hand, the prompts that describe the shots better can count more: per class c
with prompts p_c1..p_cJ and the normalised mean of its shots' features m_c,

    w_cj = softmax_j(gamma * cos(p_cj, m_c)),    t_c = normalise(sum_j w_cj p_cj).

gamma = 0 is the plain mean; a class with one prompt, or without shots, keeps its plain mean.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def _unit(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = x / np.maximum(norms, 1e-12)
    return out


def check_prompt_offsets(offsets: IntArray, n_prompts: int) -> None:
    """`offsets` [N + 1]: class c's prompts are rows offsets[c]:offsets[c + 1]; each class has one or more."""
    if offsets.ndim != 1 or offsets.size < 2:
        raise ValueError(f"prompt offsets must be a 1-d array of N + 1 >= 2 entries, got shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != n_prompts:
        raise ValueError(f"prompt offsets must run from 0 to the {n_prompts} prompts, got {offsets[0]}..{offsets[-1]}")
    if np.any(np.diff(offsets) < 1):
        raise ValueError("every class needs at least one prompt (prompt offsets must increase)")


def prompt_weights(
    prompts: FloatArray,
    offsets: IntArray,
    features: FloatArray,
    labels: IntArray,
    gamma: float,
) -> list[npt.NDArray[np.float64]]:
    """Per class, the weights of its prompts (each sums to 1): softmax(gamma * cos(prompt, shot mean)).

    `prompts` [P, d] (rows of class c at offsets[c]:offsets[c + 1]), `features` [M, d] the shots' keys
    (every view) with `labels` [M] in 0..N-1. Uniform where gamma is 0 or the class has no shot."""
    if not np.isfinite(gamma) or gamma < 0:
        raise ValueError(f"prompt weighting gamma must be a finite number >= 0, got {gamma}")
    check_prompt_offsets(offsets, prompts.shape[0])
    n_classes = offsets.size - 1
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} shot features but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"shot labels must lie in 0..{n_classes - 1}")
    units = _unit(prompts.astype(np.float64))
    sums = np.zeros((n_classes, prompts.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features.astype(np.float64))
    has_shots = np.bincount(labels, minlength=n_classes) > 0
    means = _unit(sums)
    out = []
    for c in range(n_classes):
        rows = units[offsets[c] : offsets[c + 1]]
        if gamma == 0 or not has_shots[c]:
            out.append(np.full(rows.shape[0], 1.0 / rows.shape[0]))
            continue
        logits = gamma * (rows @ means[c])
        weights = np.exp(logits - logits.max())
        out.append(weights / weights.sum())
    return out


def weighted_class_text(
    prompts: FloatArray,
    offsets: IntArray,
    features: FloatArray,
    labels: IntArray,
    gamma: float,
) -> FloatArray:
    """[N, d] float32 class text weights: each class's prompts (normalised) averaged with `prompt_weights`,
    re-normalised. At gamma = 0 this is the plain mean of CLIP's prompt ensembling."""
    units = _unit(prompts.astype(np.float64))
    weights = prompt_weights(prompts, offsets, features, labels, gamma)
    text = np.stack([w @ units[offsets[c] : offsets[c + 1]] for c, w in enumerate(weights)])
    return _unit(text).astype(np.float32)
