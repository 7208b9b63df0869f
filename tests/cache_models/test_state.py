"""add == refit, get_state/set_state round trips, determinism."""

from __future__ import annotations

import io

import numpy as np
import pytest

from cache_models import METHODS, get_method

from .conftest import HYPERPARAMS, make_task, unit

INCREMENTAL = ("tip-adapter", "tip-x")


def _assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("name", INCREMENTAL)
def test_add_shots_of_known_classes_equals_refit(name: str) -> None:
    t = make_task(20, n_classes=4, shots=4, dim=8)
    hp = HYPERPARAMS[name]
    grown = get_method(name)(**hp).fit(t.keys[:9], t.labels[:9], t.text)
    grown.add(t.keys[9:12], t.labels[9:12]).add(t.keys[12:], t.labels[12:])
    fresh = get_method(name)(**hp).fit(t.keys, t.labels, t.text)
    np.testing.assert_array_equal(grown.predict(t.queries), fresh.predict(t.queries))
    np.testing.assert_array_equal(grown.predict(t.queries, top_k=3), fresh.predict(t.queries, top_k=3))
    _assert_same_state(grown.get_state(), fresh.get_state())


@pytest.mark.parametrize("name", INCREMENTAL)
def test_add_new_classes_with_text_equals_refit(name: str) -> None:
    t = make_task(21, n_classes=5, shots=3, dim=8)
    hp = HYPERPARAMS[name]
    old = t.labels < 3
    grown = get_method(name)(**hp).fit(t.keys[old], t.labels[old], t.text[:3])
    grown.add(t.keys[~old], t.labels[~old], text=t.text[3:])
    assert grown.n_classes == 5
    fresh = get_method(name)(**hp).fit(
        np.concatenate([t.keys[old], t.keys[~old]]), np.concatenate([t.labels[old], t.labels[~old]]), t.text
    )
    np.testing.assert_array_equal(grown.predict(t.queries), fresh.predict(t.queries))
    _assert_same_state(grown.get_state(), fresh.get_state())


@pytest.mark.parametrize("name", INCREMENTAL)
def test_add_a_class_without_shots_then_its_shots(name: str) -> None:
    t = make_task(22, n_classes=3, shots=3, dim=8)
    new_text = unit(np.ones((1, 8)))
    grown = get_method(name)().fit(t.keys, t.labels, t.text)
    grown.add(np.zeros((0, 8), np.float32), [], text=new_text)
    grown.add(t.queries[:2], [3, 3])
    fresh = get_method(name)().fit(
        np.concatenate([t.keys, t.queries[:2]]), np.concatenate([t.labels, [3, 3]]), np.concatenate([t.text, new_text])
    )
    np.testing.assert_array_equal(grown.predict(t.queries), fresh.predict(t.queries))


def test_add_with_views_keeps_groups_for_loo() -> None:
    t = make_task(23, n_classes=3, shots=3, views=2, dim=8)
    grown = get_method("tip-adapter")().fit(t.keys[:8], t.labels[:8], t.text, t.groups[:8])
    grown.add(t.keys[8:], t.labels[8:], groups=t.groups[8:])
    state = grown.get_state()
    fresh = get_method("tip-adapter")().fit(t.keys, t.labels, t.text, t.groups).get_state()
    _assert_same_state(state, fresh)


@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip_gives_identical_predictions(name: str) -> None:
    t = make_task(24, n_classes=4, shots=3, views=2, dim=8)
    hp = HYPERPARAMS[name]
    original = get_method(name)(**hp).fit(t.keys, t.labels, t.text, t.groups)
    buffer = io.BytesIO()
    np.savez(buffer, **original.get_state())  # what a caller persisting the state does
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:
        state = {key: stored[key] for key in stored.files}
    restored = get_method(name)(**hp).set_state(state)
    np.testing.assert_array_equal(restored.predict(t.queries), original.predict(t.queries))
    np.testing.assert_array_equal(restored.predict(t.queries, top_k=2), original.predict(t.queries, top_k=2))
    _assert_same_state(restored.get_state(), original.get_state())


def test_tip_x_state_stores_psi_and_recomputes_it_for_another_tau() -> None:
    t = make_task(25, n_classes=4, shots=3, dim=8)
    state = get_method("tip-x")(tau=0.5).fit(t.keys, t.labels, t.text).get_state()
    assert state["psi"].shape == (5,)
    assert state["psi"][4] == 0.5
    other = get_method("tip-x")(tau=0.2)
    other.set_state(state)
    fresh = get_method("tip-x")(tau=0.2).fit(t.keys, t.labels, t.text)
    np.testing.assert_array_equal(other.psi_range.as_array(), fresh.psi_range.as_array())
    np.testing.assert_array_equal(other.predict(t.queries), fresh.predict(t.queries))


def test_support_arrays_are_private_copies() -> None:
    t = make_task(26)
    keys, text = t.keys.copy(), t.text.copy()
    m = get_method("tip-adapter")().fit(keys, t.labels, text)
    before = m.predict(t.queries)
    keys[:] = keys[::-1]
    text[:] = text[::-1]
    np.testing.assert_array_equal(m.predict(t.queries), before)
    with pytest.raises(ValueError, match="read-only"):
        m.get_state()["keys"][0, 0] = 0.0


@pytest.mark.parametrize("name", METHODS)
def test_same_inputs_give_identical_logits_and_tuned_values(name: str) -> None:
    t = make_task(27, n_classes=5, shots=3, views=2, dim=8, noise=0.6, text_noise=2.0)
    first = get_method(name)()
    second = get_method(name)()
    hp_first = first.tune(t.keys, t.labels, t.text, t.groups)
    hp_second = second.tune(t.keys.copy(), t.labels.copy(), t.text.copy(), t.groups.copy())
    assert hp_first == hp_second
    np.testing.assert_array_equal(first.predict(t.queries), second.predict(t.queries))
    r1, r2 = first.tune_report, second.tune_report
    assert r1 is not None
    assert r2 is not None
    assert r1.to_dict() == r2.to_dict()
    np.testing.assert_array_equal(r1.confidence, r2.confidence)


def test_tuned_model_equals_a_fit_at_the_tuned_values() -> None:
    t = make_task(28, n_classes=4, shots=3, dim=8)
    for name in METHODS:
        tuned = get_method(name)()
        values = tuned.tune(t.keys, t.labels, t.text)
        fitted = get_method(name)(**values).fit(t.keys, t.labels, t.text)
        np.testing.assert_array_equal(tuned.predict(t.queries), fitted.predict(t.queries))


@pytest.mark.parametrize("name", ["tip-adapter", "tip-x", "ape"])
def test_state_holds_no_faiss_index_and_restore_refits(name: str) -> None:
    """Search runs on the support's own keys, so there is no index to store; a snapshot of an older
    version that still carries one restores to the same predictions (the blob is not read)."""
    t = make_task(21, views=1)
    fitted = get_method(name)(**HYPERPARAMS[name]).fit(t.keys, t.labels, t.text)
    state = fitted.get_state()
    assert "index" not in state
    restored = get_method(name)(**HYPERPARAMS[name]).set_state({**state, "index": np.zeros(40, np.uint8)})
    np.testing.assert_array_equal(restored.predict(t.queries), fitted.predict(t.queries))
    np.testing.assert_array_equal(restored.predict(t.queries, top_k=3), fitted.predict(t.queries, top_k=3))


def test_methods_fitted_on_one_support_share_its_keys() -> None:
    """One read-only support per task: every method fitted on it references the same key array."""
    from cache_models.base import make_support

    t = make_task(22, views=1)
    support = make_support(t.keys, t.labels, t.text, None)
    fitted = {name: get_method(name)(**HYPERPARAMS[name]).fit_support(support) for name in METHODS}
    for name, method in fitted.items():
        assert method.get_state()["keys"] is support.keys, name
        fresh = get_method(name)(**HYPERPARAMS[name]).fit(t.keys, t.labels, t.text)
        np.testing.assert_array_equal(method.predict(t.queries), fresh.predict(t.queries))
    for name in ("tip-adapter", "tip-x"):
        assert np.shares_memory(fitted[name]._index.vectors(), support.keys), name  # no copy for the search


def test_ape_restores_its_stored_channels_and_refits_from_a_partial_state() -> None:
    t = make_task(26, n_classes=4, shots=3, dim=8)
    fitted = get_method("ape")(n_channels=4).fit(t.keys, t.labels, t.text)
    state = fitted.get_state()
    assert state["channels"].shape == (4,)
    assert state["divergence"].shape == (t.labels.size,)
    expected = fitted.predict(t.queries)
    restored = get_method("ape")(n_channels=4).set_state(state)
    np.testing.assert_array_equal(restored.channels, fitted.channels)
    np.testing.assert_array_equal(restored.predict(t.queries), expected)
    for broken in ({"channels": state["channels"][:3]}, {"divergence": state["divergence"][:-1]}):
        again = get_method("ape")(n_channels=4).set_state({**state, **broken})  # refitted, not trusted
        np.testing.assert_array_equal(again.predict(t.queries), expected)
