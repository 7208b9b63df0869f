"""Image-guided prompt weighting (cache_models.prompt_weighting) against a dense reference of its formula."""

from __future__ import annotations

import numpy as np
import pytest

from cache_models.prompt_weighting import prompt_weights, weighted_class_text

from .conftest import unit


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """3 classes with 4, 1 and 3 prompts; shots for classes 0 and 1 only (2 views each of 2 shots)."""
    rng = np.random.default_rng(seed)
    prompts = unit(rng.normal(size=(8, 6)))
    offsets = np.array([0, 4, 5, 8], dtype=np.int64)
    features = unit(rng.normal(size=(6, 6)))
    labels = np.array([0, 0, 0, 1, 1, 0], dtype=np.int64)
    return prompts, offsets, features, labels


def _reference(prompts: np.ndarray, offsets: np.ndarray, features: np.ndarray, labels: np.ndarray, gamma: float):
    """Per class: softmax_j(gamma * cos(p_j, normalised mean of its shots)), then the weighted mean, normalised."""
    out = []
    for c in range(offsets.size - 1):
        rows = prompts[offsets[c] : offsets[c + 1]].astype(np.float64)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        mine = features[labels == c].astype(np.float64)
        if mine.size:
            mean = mine.sum(axis=0) / np.linalg.norm(mine.sum(axis=0))
            e = np.exp(gamma * rows @ mean)
            w = e / e.sum()
        else:
            w = np.full(rows.shape[0], 1 / rows.shape[0])
        t = w @ rows
        out.append(t / np.linalg.norm(t))
    return np.stack(out)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 30.0, 300.0])
def test_text_equals_the_dense_reference(gamma: float) -> None:
    prompts, offsets, features, labels = _case()
    got = weighted_class_text(prompts, offsets, features, labels, gamma)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(prompts, offsets, features, labels, gamma), atol=2e-7)


def test_gamma_zero_is_the_plain_prompt_mean() -> None:
    prompts, offsets, features, labels = _case(1)
    got = weighted_class_text(prompts, offsets, features, labels, 0.0)
    for c in range(3):
        mean = prompts[offsets[c] : offsets[c + 1]].mean(axis=0)
        np.testing.assert_allclose(got[c], mean / np.linalg.norm(mean), atol=2e-7)


def test_the_prompt_nearest_the_shots_gets_the_most_weight() -> None:
    prompts, offsets, features, labels = _case(2)
    features[labels == 0] = prompts[2]  # class 0's shots look exactly like its third prompt
    weights = prompt_weights(prompts, offsets, features, labels, 30.0)
    assert int(np.argmax(weights[0])) == 2
    assert weights[0][2] > 0.5
    for w in weights:
        assert w.sum() == pytest.approx(1.0)
    # very sharp: the class text is that prompt
    np.testing.assert_allclose(weighted_class_text(prompts, offsets, features, labels, 1e4)[0], prompts[2], atol=1e-6)


def test_one_prompt_or_no_shot_keeps_the_plain_mean() -> None:
    prompts, offsets, features, labels = _case(3)
    plain = weighted_class_text(prompts, offsets, features, labels, 0.0)
    sharp = weighted_class_text(prompts, offsets, features, labels, 100.0)
    np.testing.assert_array_equal(sharp[1], plain[1])  # one prompt
    np.testing.assert_array_equal(sharp[2], plain[2])  # no shot
    assert not np.allclose(sharp[0], plain[0])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gamma": -1.0}, "gamma must be a finite number >= 0"),
        ({"gamma": float("nan")}, "gamma must be a finite number >= 0"),
        ({"offsets": np.array([0, 4, 4, 8])}, "at least one prompt"),
        ({"offsets": np.array([0, 4, 5, 7])}, "run from 0 to the 8 prompts"),
        ({"labels": np.array([0, 0, 0, 1, 1, 3])}, "shot labels must lie in 0..2"),
        ({"labels": np.array([0, 1])}, "6 shot features but 2 labels"),
    ],
)
def test_bad_input_is_refused_by_name(change: dict[str, object], message: str) -> None:
    prompts, offsets, features, labels = _case()
    args = {"prompts": prompts, "offsets": offsets, "features": features, "labels": labels, "gamma": 1.0} | change
    with pytest.raises(ValueError, match=message):
        weighted_class_text(**args)  # type: ignore[arg-type]
