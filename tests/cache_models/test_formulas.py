"""Each method's formula on a case small enough to check by hand (2 classes, 2-3 keys, d = 2 or 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cache_models import get_method

# Two orthogonal class directions; key 2 of class 1 sits at 53 degrees from class 0.
TEXT = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
KEYS = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
LABELS = np.array([0, 1, 1])
QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def test_zero_shot_is_scale_times_cosine() -> None:
    m = get_method("zero-shot")(scale=10.0).fit(KEYS, LABELS, TEXT)
    q = np.array([[0.6, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(m.predict(q), [[6.0, 8.0]], rtol=1e-6)


def test_tip_adapter_by_hand() -> None:
    # A = [1, 0, 0.6]; weights exp(-3 (1 - A)) = [1, e^-3, e^-1.2]; class sums [1, e^-3 + e^-1.2].
    m = get_method("tip-adapter")(alpha=2.0, beta=3.0, scale=10.0).fit(KEYS, LABELS, TEXT)
    expected = [[10.0 + 2.0 * 1.0, 0.0 + 2.0 * (math.exp(-3.0) + math.exp(-1.2))]]
    np.testing.assert_allclose(m.predict(QUERY), expected, rtol=1e-6)


def _softmax2(a: float, b: float) -> tuple[float, float]:
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def _kl(p: tuple[float, float], q: tuple[float, float]) -> float:
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q, strict=True))


def test_tip_x_by_hand() -> None:
    tau = 1.0
    # p(x) = softmax(x W^T / tau): W is the identity, so p(x) = softmax(x).
    p = [_softmax2(*map(float, k)) for k in KEYS]
    kl_support = [_kl(p[i], p[j]) for i in range(3) for j in range(3) if i != j]
    cos_support = [float(KEYS[i] @ KEYS[j]) for i in range(3) for j in range(3) if i != j]
    kmin, kmax, cmin, cmax = min(kl_support), max(kl_support), min(cos_support), max(cos_support)
    assert (cmin, cmax) == pytest.approx((0.0, 0.8))  # off-diagonal cosines: 0, 0.6, 0.8

    def psi(kl: float) -> float:
        return (kl - kmin) / (kmax - kmin) * (cmax - cmin) + cmin

    p_query = _softmax2(1.0, 0.0)
    kl_query = [_kl(p_query, pk) for pk in p]  # [0, KL to key 1, KL to key 2]
    alpha, beta, gamma, scale = 2.0, 3.0, 0.5, 10.0
    cache = [1.0, math.exp(-3.0) + math.exp(-1.2)]
    penalty = [psi(kl_query[0]), psi(kl_query[1]) + psi(kl_query[2])]
    expected = [[scale * 1.0 + alpha * cache[0] - gamma * penalty[0], 0.0 + alpha * cache[1] - gamma * penalty[1]]]

    m = get_method("tip-x")(alpha=alpha, beta=beta, gamma=gamma, tau=tau, scale=scale).fit(KEYS, LABELS, TEXT)
    assert m.psi_range.as_array() == pytest.approx([kmin, kmax, cmin, cmax], abs=1e-6)
    np.testing.assert_allclose(m.predict(QUERY), expected, rtol=1e-5)


def test_tip_x_two_keys_psi_is_the_single_cosine() -> None:
    # Two keys: one off-diagonal cosine (0.6), so cmin == cmax and psi(KL) == 0.6 for every KL.
    keys = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    m = get_method("tip-x")(alpha=0.0, gamma=2.0, scale=10.0).fit(keys, [0, 1], TEXT)
    q = np.array([[0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(m.predict(q), [[0.0 - 2.0 * 0.6, 10.0 - 2.0 * 0.6]], rtol=1e-6)


def test_tip_x_kl_round_off_is_no_spread() -> None:
    # One class: every posterior is [1.0], so every KL is 0 in exact arithmetic; float32 leaves
    # +-6e-8 behind. Scaled onto the cosine range that noise once swung logits by 0.5 with the order
    # of the keys (found by test_properties). It must count as no spread: psi == cos_min everywhere.
    rng = np.random.default_rng(1)  # a draw whose KLs come out as -6e-8 .. 7e-9
    keys = rng.standard_normal((3, 3)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    text = np.array([[0.6, 0.0, 0.8]], dtype=np.float32)
    query = np.array([[0.0, 0.6, 0.8]], dtype=np.float32)
    hp = {"alpha": 3.0, "beta": 4.0, "gamma": 2.0, "tau": 0.7, "scale": 50.0}
    fits = [get_method("tip-x")(**hp).fit(keys[order], [0, 0, 0], text) for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0])]
    psi = fits[0].psi_range
    assert psi.kl_max == psi.kl_min
    cos = keys @ keys.T
    cos_min = float(cos[~np.eye(3, dtype=bool)].min())
    expected = (
        50.0 * float((query @ text.T)[0, 0]) + 3.0 * float(np.exp(-4.0 * (1 - query @ keys.T)).sum()) - 6.0 * cos_min
    )
    for m in fits:
        np.testing.assert_allclose(m.predict(query), [[expected]], rtol=1e-5)


def test_ape_by_hand() -> None:
    # d = 3. Class 0: text (0.6, 0, 0.8) and one identical key; class 1: (0, 0.6, 0.8) likewise.
    # Inter-class products per channel: (0, 0, 0.64) for every pair -> S = (0, 0, 0.64).
    # V (unbiased over 2 classes) = ((0.6)^2 / 2, (0.6)^2 / 2, 0) = (0.18, 0.18, 0).
    # J = -0.7 S + 0.3 V = (0.054, 0.054, -0.448): keep channels {0, 1}.
    text = np.array([[0.6, 0.0, 0.8], [0.0, 0.6, 0.8]], dtype=np.float32)
    keys = text.copy()
    alpha, beta, gamma, scale = 2.0, 3.0, 0.4, 10.0
    m = get_method("ape")(alpha=alpha, beta=beta, gamma=gamma, n_channels=2, scale=scale).fit(keys, [0, 1], text)
    np.testing.assert_array_equal(m.channels, [0, 1])
    # On channels {0, 1} re-normalised, keys and text are e0 and e1: P_jj = softmax(1, 0)_0 = e / (e + 1).
    own = math.e / (math.e + 1.0)
    omega = math.exp(gamma * math.log2((1.0 + 1e-6) / (own + 1e-6)))
    # Query = text row 0. Z uses ALL channels: scale * (1, 0.64). f' = e0: A' = (1, 0).
    q = text[:1]
    expected = [[scale * 1.0 + alpha * omega * 1.0, scale * 0.64 + alpha * omega * math.exp(-beta)]]
    np.testing.assert_allclose(m.predict(q), expected, rtol=1e-6)


def test_gda_by_hand() -> None:
    # Class 0: (1, 0), (0.6, 0.8) -> mu0 = (0.8, 0.4); class 1: (0, 1), (0.8, 0.6) -> mu1 = (0.4, 0.8).
    keys = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    mu = np.array([[0.8, 0.4], [0.4, 0.8]])
    # Centred: (0.2, -0.4), (-0.2, 0.4), (-0.4, 0.2), (0.4, -0.2):
    # scatter (M'-1) Sigma = [[0.4, -0.32], [-0.32, 0.4]], trace(Sigma) = 0.8 / 3.
    # Matrix [[a, b], [b, a]] with a = 0.4 + 0.8/3, b = -0.32; its inverse is [[a, -b], [-b, a]] / (a^2 - b^2).
    a, b = 0.4 + 0.8 / 3.0, -0.32
    precision = 2.0 * np.array([[a, -b], [-b, a]]) / (a * a - b * b)  # d = 2
    weights = mu @ precision
    bias = math.log(0.5) - 0.5 * np.einsum("cd,cd->c", weights, mu)
    alpha, scale = 0.5, 10.0
    q = np.array([[0.6, 0.8]], dtype=np.float32)
    expected = scale * q @ TEXT.T + alpha * (q @ weights.T + bias)
    m = get_method("gda")(alpha=alpha, scale=scale).fit(keys, labels, TEXT)
    np.testing.assert_allclose(m.predict(q), expected, rtol=1e-5)


def test_top_k_keeps_only_the_nearest_keys_by_hand() -> None:
    # Query (1, 0): nearest key is key 0 (A = 1), then key 2 (0.6), then key 1 (0).
    m = get_method("tip-adapter")(alpha=2.0, beta=3.0, scale=10.0).fit(KEYS, LABELS, TEXT)
    np.testing.assert_allclose(m.predict(QUERY, top_k=1), [[12.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(m.predict(QUERY, top_k=2), [[12.0, 2.0 * math.exp(-1.2)]], rtol=1e-6)
