"""Dense float64 reference implementations: a literal transcription of docs/methods.md.

Deliberately naive (explicit loops, full matrices, no tricks), so the library's optimisations
(segment sums, rank-d KL, class-sum channel criterion, chunking, FAISS) are checked against the
formulas as written. `top_k` restricts every cache term to each query's k largest affinities.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def one_hot(labels: npt.ArrayLike, n_classes: int) -> F64:
    labels = np.asarray(labels)
    out = np.zeros((labels.size, n_classes))
    out[np.arange(labels.size), labels] = 1.0
    return out


def softmax(x: F64) -> F64:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    out: F64 = e / e.sum(axis=1, keepdims=True)
    return out


def top_k_mask(affinity: F64, top_k: int | None) -> F64:
    """1 where a key is among the query's k largest affinities (all ones without top_k)."""
    mask = np.ones_like(affinity)
    if top_k is not None and top_k < affinity.shape[1]:
        mask[:] = 0.0
        for q in range(affinity.shape[0]):
            mask[q, np.argsort(-affinity[q])[:top_k]] = 1.0
    return mask


def zero_shot(queries: npt.ArrayLike, text: npt.ArrayLike, scale: float = 100.0) -> F64:
    f, W = np.asarray(queries, np.float64), np.asarray(text, np.float64)
    out: F64 = scale * f @ W.T
    return out


def tip_adapter(queries, keys, labels, text, *, alpha=1.0, beta=1.0, scale=100.0, top_k=None) -> F64:
    f, F, W = (np.asarray(a, np.float64) for a in (queries, keys, text))
    L = one_hot(labels, W.shape[0])
    A = f @ F.T
    E = np.exp(-beta * (1.0 - A)) * top_k_mask(A, top_k)
    out: F64 = zero_shot(f, W, scale) + alpha * E @ L
    return out


def tip_x_probs(x: F64, W: F64, tau: float) -> F64:
    return softmax(x @ W.T / tau)


def kl_matrix(p_query: F64, p_keys: F64) -> F64:
    """KL[q, j] = sum_c p_q,c (log p_q,c - log p_j,c), with an explicit loop over pairs."""
    out = np.zeros((p_query.shape[0], p_keys.shape[0]))
    for q in range(p_query.shape[0]):
        for j in range(p_keys.shape[0]):
            out[q, j] = np.sum(p_query[q] * (np.log(p_query[q]) - np.log(p_keys[j])))
    return out


def tip_x_psi_constants(keys, text, tau=0.5) -> tuple[float, float, float, float]:
    """(kmin, kmax, cmin, cmax) over the support x support KL and cosine matrices, diagonal excluded."""
    F, W = np.asarray(keys, np.float64), np.asarray(text, np.float64)
    p = tip_x_probs(F, W, tau)
    kl, cos = kl_matrix(p, p), F @ F.T
    off = ~np.eye(F.shape[0], dtype=bool)
    return float(kl[off].min()), float(kl[off].max()), float(cos[off].min()), float(cos[off].max())


def tip_x(
    queries, keys, labels, text, *, alpha=1.0, beta=1.0, gamma=0.1, tau=0.5, scale=100.0, top_k=None, psi=None
) -> F64:
    """`psi` = (kmin, kmax, cmin, cmax); by default frozen from the support itself (service variant)."""
    f, F, W = (np.asarray(a, np.float64) for a in (queries, keys, text))
    L = one_hot(labels, W.shape[0])
    kmin, kmax, cmin, cmax = psi if psi is not None else tip_x_psi_constants(F, W, tau)
    A = f @ F.T
    mask = top_k_mask(A, top_k)
    kl = kl_matrix(tip_x_probs(f, W, tau), tip_x_probs(F, W, tau))
    psi_kl = (kl - kmin) / (kmax - kmin) * (cmax - cmin) + cmin
    # top_k: the penalty is always the full sum over keys; in the cache term, each class's dropped keys
    # vote as if all sat at their mean cosine with the query.
    cache = (np.exp(-beta * (1.0 - A)) * mask) @ L
    for q in range(f.shape[0]):
        for c in range(W.shape[0]):
            dropped = (mask[q] == 0) & (np.asarray(labels) == c)
            if dropped.any():
                cache[q, c] += dropped.sum() * np.exp(-beta * (1.0 - A[q, dropped].mean()))
    out: F64 = zero_shot(f, W, scale) + alpha * cache - gamma * psi_kl @ L
    return out


def ape_channels(keys, labels, text, *, n_channels, lambda1=0.7, lambda2=0.3) -> npt.NDArray[np.int64]:
    """The n_channels channels with the largest J = -lambda1 * S + lambda2 * V, by looping over pairs."""
    F, W = np.asarray(keys, np.float64), np.asarray(text, np.float64)
    labels = np.asarray(labels)
    samples = [np.vstack([W[c : c + 1], F[labels == c]]) for c in range(W.shape[0])]
    total, count = np.zeros(W.shape[1]), 0
    for i, xs in enumerate(samples):
        for j, ys in enumerate(samples):
            if i == j:
                continue
            for x in xs:
                for y in ys:
                    total += x * y
                    count += 1
    S = total / count
    V = np.var(W, axis=0, ddof=1)
    J = -lambda1 * S + lambda2 * V
    return np.sort(np.argsort(-J, kind="stable")[:n_channels])


def _unit_rows(x: F64) -> F64:
    out: F64 = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ape(
    queries,
    keys,
    labels,
    text,
    *,
    alpha=2.0,
    beta=1.0,
    gamma=0.1,
    n_channels,
    lambda1=0.7,
    lambda2=0.3,
    scale=100.0,
    top_k=None,
    channels=None,
) -> F64:
    """`channels` overrides the criterion (LOO keeps the full-support selection)."""
    f, F, W = (np.asarray(a, np.float64) for a in (queries, keys, text))
    L = one_hot(labels, W.shape[0])
    if channels is None:
        channels = ape_channels(F, labels, W, n_channels=n_channels, lambda1=lambda1, lambda2=lambda2)
    f_, F_, W_ = (_unit_rows(x[:, channels]) for x in (f, F, W))
    P = softmax(F_ @ W_.T)
    D = np.sum(L * np.log2((L + 1e-6) / (P + 1e-6)), axis=1)
    omega = np.exp(gamma * D)
    A_ = f_ @ F_.T
    E = np.exp(-beta * (1.0 - A_)) * top_k_mask(A_, top_k)
    out: F64 = zero_shot(f, W, scale) + alpha * E @ (omega[:, None] * L)
    return out


def gda_trace(keys, labels, n_classes: int) -> float:
    """trace(Sigma) of the centred samples (unbiased covariance)."""
    F, labels = np.asarray(keys, np.float64), np.asarray(labels)
    mu = np.stack([F[labels == c].mean(axis=0) for c in range(n_classes)])
    return float(np.trace(np.atleast_2d(np.cov((F - mu[labels]).T))))


def gda_precision(keys, labels, n_classes: int, trace: float | None = None) -> F64:
    """d * pinv((M'-1) Sigma + trace(Sigma) I); `trace` overrides the shrinkage scalar (LOO keeps the
    full-support one)."""
    F, labels = np.asarray(keys, np.float64), np.asarray(labels)
    mu = np.stack([F[labels == c].mean(axis=0) for c in range(n_classes)])
    centred = F - mu[labels]
    sigma = np.cov(centred.T)  # unbiased, rows = variables
    m, d = F.shape
    shrink = np.trace(sigma) if trace is None else trace
    out: F64 = d * np.linalg.pinv((m - 1) * sigma + shrink * np.eye(d))
    return out


def gda(queries, keys, labels, text, *, alpha=1.0, scale=100.0, precision=None, means=None) -> F64:
    """`precision`/`means` override the estimates (LOO keeps the full-support covariance)."""
    f, F, W = (np.asarray(a, np.float64) for a in (queries, keys, text))
    labels = np.asarray(labels)
    n = W.shape[0]
    mu = means if means is not None else np.stack([F[labels == c].mean(axis=0) for c in range(n)])
    P = precision if precision is not None else gda_precision(F, labels, n)
    G = np.stack([P @ mu[c] for c in range(n)])
    b = np.array([np.log(1.0 / n) - 0.5 * mu[c] @ P @ mu[c] for c in range(n)])
    out: F64 = zero_shot(f, W, scale) + alpha * (f @ G.T + b)
    return out


def proker(queries, keys, labels, text, *, beta=1.7, lam=0.1, scale=100.0) -> F64:
    """logits = s (f W^T + k(f, F) (K / lam + I)^-1 (L - F W^T)), K = exp(-beta (1 - F F^T))."""
    f, F, W = (np.asarray(a, np.float64) for a in (queries, keys, text))
    L = one_hot(labels, W.shape[0])
    K = np.exp(-beta * (1.0 - F @ F.T))
    A = np.linalg.solve(K / lam + np.eye(F.shape[0]), L - F @ W.T)
    out: F64 = scale * (f @ W.T + np.exp(-beta * (1.0 - f @ F.T)) @ A)
    return out


def predict(name: str, queries, keys, labels, text, **hp) -> F64:
    """Reference logits of method `name` fitted on (keys, labels, text)."""
    if name == "zero-shot":
        return zero_shot(queries, text, hp.get("scale", 100.0))
    functions = {"tip-adapter": tip_adapter, "tip-x": tip_x, "ape": ape, "gda": gda, "proker": proker}
    if name == "ape" and hp.get("n_channels", 0) == 0:
        hp = {**hp, "n_channels": max(1, np.asarray(text).shape[1] // 2)}
    out: F64 = functions[name](queries, keys, labels, text, **hp)
    return out
