"""Tip-X's `top_k` approximates the full sum: truncation must not flip a decision the full sum makes.

The KL penalty is summed over every key whatever `top_k` (it is exact in O(N d), tip_x.py); only the
affinity term is truncated, with the dropped keys' votes imputed at their mean cosine. Before the fix,
the penalty was truncated too: dropped keys are the far ones, which carry the largest penalties, so
truncation penalised exactly the classes that had near neighbours.
"""

from __future__ import annotations

import numpy as np
import pytest

from cache_models import get_method

from . import reference
from .conftest import HYPERPARAMS, make_task, unit

# Issue 11's minimal case: two classes of two keys each, text = e0 and e1.
KEYS = unit([[1, 0.2, 0.5, 0], [1, 0.2, 0, 0.5], [0.2, 1, 0.5, 0], [0.2, 1, 0, 0.5]])
LABELS = np.array([0, 0, 1, 1])
TEXT = unit(np.eye(4)[:2])
QUERY = unit([[1, 0.3, 0.3, 0.3]])


def test_minimal_case_keeps_the_exact_decision() -> None:
    m = get_method("tip-x")(alpha=1.0, beta=1.0, gamma=5.0, scale=1.0).fit(KEYS, LABELS, TEXT)
    exact = m.predict(QUERY)
    assert int(exact.argmax()) == 0
    for k in (1, 2, 3):
        assert int(m.predict(QUERY, top_k=k).argmax()) == 0, k


@pytest.mark.parametrize("top_k", [1, 4, 7, 11])
def test_tip_x_top_k_equals_reference(top_k: int) -> None:
    t = make_task(12, n_classes=4, shots=3, dim=8, n_queries=6)
    hp = HYPERPARAMS["tip-x"]
    m = get_method("tip-x")(**hp).fit(t.keys, t.labels, t.text)
    expected = reference.predict("tip-x", t.queries, t.keys, t.labels, t.text, top_k=top_k, **hp)
    got = m.predict(t.queries, top_k=top_k)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_tip_x_penalty_does_not_depend_on_top_k() -> None:
    # alpha = 0 leaves Z - gamma * penalty: the same for every k.
    t = make_task(13, n_classes=3, shots=4, dim=8, n_queries=5)
    m = get_method("tip-x")(alpha=0.0, gamma=3.0, scale=20.0).fit(t.keys, t.labels, t.text)
    exact = m.predict(t.queries)
    for k in (1, 5, 11):
        np.testing.assert_allclose(m.predict(t.queries, top_k=k), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
