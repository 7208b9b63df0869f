"""Property tests (hypothesis): invariances every method's formula implies."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_models import METHODS, fit_temperature, get_method

from .conftest import HYPERPARAMS, make_task

SETTINGS = settings(max_examples=20, deadline=None)
tasks = st.builds(
    make_task,
    seed=st.integers(0, 10_000),
    n_classes=st.integers(1, 5),
    shots=st.integers(2, 4),
    views=st.integers(1, 2),
    dim=st.integers(3, 10),
    n_queries=st.integers(0, 6),
)


@SETTINGS
@given(task=tasks, name=st.sampled_from(METHODS), seed=st.integers(0, 10_000))
def test_predict_does_not_depend_on_key_order(task, name, seed) -> None:
    hp = {**HYPERPARAMS[name], **({"n_channels": 2} if name == "ape" else {})}
    order = np.random.default_rng(seed).permutation(task.labels.size)
    a = get_method(name)(**hp).fit(task.keys, task.labels, task.text, task.groups)
    b = get_method(name)(**hp).fit(task.keys[order], task.labels[order], task.text, task.groups[order])
    expected = a.predict(task.queries)
    np.testing.assert_allclose(
        b.predict(task.queries), expected, rtol=1e-5, atol=1e-5 * (np.abs(expected).max(initial=1.0))
    )


@SETTINGS
@given(task=tasks, name=st.sampled_from(METHODS), top_k=st.one_of(st.none(), st.integers(1, 20)))
def test_logits_are_finite_float32_of_shape_queries_by_classes(task, name, top_k) -> None:
    hp = {"n_channels": 2} if name == "ape" else {}
    logits = (
        get_method(name)(**hp).fit(task.keys, task.labels, task.text, task.groups).predict(task.queries, top_k=top_k)
    )
    assert logits.dtype == np.float32
    assert logits.shape == (task.queries.shape[0], task.n_classes)
    assert np.all(np.isfinite(logits))


@SETTINGS
@given(
    task=tasks,
    name=st.sampled_from(["tip-adapter", "tip-x", "ape", "gda"]),
    top_k=st.one_of(st.none(), st.integers(1, 5)),
)
def test_alpha_zero_is_zero_shot(task, name, top_k) -> None:
    hp = {"alpha": 0.0, "scale": 30.0, **({"gamma": 0.0} if name == "tip-x" else {})}
    if name == "ape":
        hp["n_channels"] = 2
    method = get_method(name)(**hp).fit(task.keys, task.labels, task.text, task.groups)
    zero_shot = get_method("zero-shot")(scale=30.0).fit(task.keys, task.labels, task.text)
    np.testing.assert_array_equal(method.predict(task.queries, top_k=top_k), zero_shot.predict(task.queries))


@SETTINGS
@given(task=tasks, name=st.sampled_from(["tip-adapter", "ape"]))
def test_more_neighbours_never_lower_a_positive_cache(task, name) -> None:
    # Tip-Adapter's and APE's per-key weights are positive: top_k = k sums a subset of what k + 1 sums.
    hp = {"n_channels": 2} if name == "ape" else {}
    method = get_method(name)(**hp).fit(task.keys, task.labels, task.text)
    previous = method.predict(task.queries, top_k=1)
    for k in range(2, task.labels.size + 2):
        current = method.predict(task.queries, top_k=k)
        assert np.all(current >= previous - 1e-4)
        previous = current
    np.testing.assert_array_equal(previous, method.predict(task.queries))


@SETTINGS
@given(task=tasks, label=st.integers(0, 4), alpha=st.floats(0.1, 100.0))
def test_adding_a_tip_adapter_key_raises_only_its_class(task, label, alpha) -> None:
    label = label % task.n_classes
    method = get_method("tip-adapter")(alpha=alpha).fit(task.keys, task.labels, task.text)
    before = method.predict(task.queries).astype(np.float64)
    after = method.add(task.text[label : label + 1], [label]).predict(task.queries).astype(np.float64)
    others = np.arange(task.n_classes) != label
    np.testing.assert_allclose(after[:, others], before[:, others], rtol=1e-6, atol=1e-4)
    assert np.all(after[:, label] > before[:, label] - 1e-4)


@SETTINGS
@given(seed=st.integers(0, 10_000), factor=st.floats(0.01, 100.0))
def test_temperature_scales_with_the_logits(seed, factor) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((50, 6)) * 2).astype(np.float32)
    labels = rng.integers(0, 6, 50)
    logits[np.arange(50), labels] += 1.0
    temperature, nll = fit_temperature(logits, labels)
    scaled_temperature, scaled_nll = fit_temperature((logits * factor).astype(np.float32), labels)
    assert abs(scaled_nll - nll) < 1e-6
    assert abs(scaled_temperature / (factor * temperature) - 1.0) < 1e-3
