"""Bad input is a ValueError that names the argument and the problem, at the boundary."""

from __future__ import annotations

import numpy as np
import pytest

from cache_models import METHODS, get_method

from .conftest import make_task

T = make_task(0, n_classes=3, shots=2, dim=4)


def _fit(name: str = "tip-adapter", **changes: object) -> None:
    args: dict[str, object] = {"keys": T.keys, "labels": T.labels, "text": T.text, "groups": None}
    args.update(changes)
    get_method(name)().fit(args["keys"], args["labels"], args["text"], args["groups"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keys": T.keys[:, :3]}, r"keys has dimension 3, expected 4"),
        ({"keys": T.keys[0]}, r"keys must be a 2-D array \[n, d\], got shape \(4,\)"),
        ({"text": T.text[None]}, r"text must be a 2-D array"),
        ({"keys": T.keys[:0]}, r"keys is empty"),
        ({"keys": T.keys * 2.0}, r"keys rows must be L2-normalised; row 0 has norm 2"),
        ({"text": np.zeros_like(T.text)}, r"text rows must be L2-normalised; row 0 has norm 0"),
        ({"keys": np.where(np.eye(6, 4, dtype=bool), np.nan, T.keys)}, r"keys contains NaN or infinite values"),
        ({"text": np.full_like(T.text, np.inf)}, r"text contains NaN or infinite values"),
        ({"keys": T.keys.astype(str)}, r"keys must hold real numbers"),
        ({"labels": np.array([0, 1, 2, 3, 0, 1])}, r"labels must lie in \[0, 3\) \(one id per class\), found 3"),
        ({"labels": np.array([0, 1, 2, -1, 0, 1])}, r"labels must be non-negative, found -1"),
        ({"labels": T.labels[:5]}, r"labels has 5 entries, expected 6 \(one per key row\)"),
        ({"labels": T.labels[:, None]}, r"labels must be a 1-D array"),
        ({"labels": T.labels + 0.5}, r"labels must hold integers"),
        ({"labels": T.labels.astype(bool)}, r"labels must hold integers"),
        ({"groups": np.zeros(6, dtype=int)}, r"groups: group 0 holds rows of different labels; a group is one shot"),
        ({"groups": np.arange(5)}, r"groups has 5 entries, expected 6"),
    ],
)
def test_fit_rejects_bad_support(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _fit(**changes)


def test_integral_float_labels_are_accepted() -> None:
    m = get_method("tip-adapter")().fit(T.keys, T.labels.astype(np.float64), T.text)
    np.testing.assert_array_equal(
        m.predict(T.queries), get_method("tip-adapter")().fit(T.keys, T.labels, T.text).predict(T.queries)
    )


@pytest.mark.parametrize("name", METHODS)
def test_predict_rejects_bad_queries(name: str) -> None:
    m = get_method(name)().fit(T.keys, T.labels, T.text)
    with pytest.raises(ValueError, match=r"queries has dimension 5, expected 4"):
        m.predict(np.ones((2, 5), np.float32) / np.sqrt(5))
    with pytest.raises(ValueError, match=r"queries rows must be L2-normalised"):
        m.predict(T.queries * 3)
    with pytest.raises(ValueError, match=r"queries contains NaN"):
        m.predict(np.full((1, 4), np.nan))
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"top_k must be a positive integer or None"):
            m.predict(T.queries, top_k=bad)


@pytest.mark.parametrize("name", METHODS)
def test_predict_before_fit_is_an_error(name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}: call fit\(\) or tune\(\) before predict\(\)"):
        get_method(name)().predict(T.queries)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'tip'; valid: zero-shot, tip-adapter, tip-x, ape, gda"):
        get_method("tip")


@pytest.mark.parametrize(
    ("name", "hyperparams", "message"),
    [
        ("tip-adapter", {"alpah": 1.0}, r"tip-adapter: unknown hyper-parameter 'alpah'; valid: alpha, beta, scale"),
        ("zero-shot", {"alpha": 1.0}, r"zero-shot: unknown hyper-parameter 'alpha'; valid: scale"),
        ("gda", {"scale": 0.0}, r"gda: hyper-parameter scale must be positive, got 0.0"),
        ("tip-x", {"scale": -100.0}, r"tip-x: hyper-parameter scale must be positive"),
        ("tip-x", {"tau": 0}, r"tip-x: hyper-parameter tau must be positive"),
        ("ape", {"alpha": -1.0}, r"ape: hyper-parameter alpha must be non-negative"),
        ("tip-adapter", {"beta": True}, r"tip-adapter: hyper-parameter beta must be a number, got True"),
        ("ape", {"gamma": np.bool_(False)}, r"ape: hyper-parameter gamma must be a number"),
        ("tip-adapter", {"alpha": "1"}, r"hyper-parameter alpha must be a number, got '1'"),
        ("tip-adapter", {"alpha": float("nan")}, r"hyper-parameter alpha must be finite"),
        ("gda", {"alpha": float("inf")}, r"hyper-parameter alpha must be finite"),
        ("ape", {"n_channels": 2.5}, r"ape: hyper-parameter n_channels must be an integer, got 2.5"),
    ],
)
def test_bad_hyperparameters(name: str, hyperparams: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_method(name)(**hyperparams)


def test_hyperparameters_are_json_numbers() -> None:
    m = get_method("ape")(n_channels=np.int64(3), alpha=np.float32(2.0))
    assert m.hyperparams["n_channels"] == 3
    assert type(m.hyperparams["n_channels"]) is int
    assert type(m.hyperparams["alpha"]) is float


def test_ape_rejects_more_channels_than_dimensions() -> None:
    with pytest.raises(ValueError, match=r"ape: n_channels=5 exceeds the feature dimension 4"):
        get_method("ape")(n_channels=5).fit(T.keys, T.labels, T.text)


def test_gda_needs_every_class() -> None:
    keep = T.labels != 1
    with pytest.raises(ValueError, match=r"gda: class 1 has no keys"):
        get_method("gda")().fit(T.keys[keep], T.labels[keep], T.text)


def test_set_state_needs_the_support_arrays() -> None:
    state = get_method("tip-adapter")().fit(T.keys, T.labels, T.text).get_state()
    del state["groups"]
    with pytest.raises(ValueError, match=r"tip-adapter: state lacks \['groups'\]"):
        get_method("tip-adapter")().set_state(state)


def test_add_validates_new_rows() -> None:
    m = get_method("tip-adapter")().fit(T.keys, T.labels, T.text)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        m.add(T.keys[:1], [3])
    with pytest.raises(ValueError, match=r"keys has dimension 3, expected 4"):
        m.add(T.keys[:1, :3], [0])
    with pytest.raises(ValueError, match=r"labels has 2 entries, expected 1"):
        m.add(T.keys[:1], [0, 1])
    with pytest.raises(ValueError, match=r"keys is empty"):
        m.add(T.keys[:0], [])
    assert m.n_keys == 6  # a rejected add leaves the cache as it was


def test_importing_cache_models_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, cache_models; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
