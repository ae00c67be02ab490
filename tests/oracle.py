"""Independent reference implementations used as test oracles.

Plain NumPy in float64, written from the formulas of the paper (docs/method.md) and sharing no
code with the package: an explicit-Hessian Newton fit, the closed-form α, the full m×n matrix
of representer values, and top-k by sorting whole rows of Python tuples.
"""

from __future__ import annotations

import numpy as np


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def augment(f):
    f = np.asarray(f, dtype=np.float64)
    return np.hstack([f, np.ones((len(f), 1))])


def objective(x, t, theta, lam):
    z = x @ theta
    logp = z - z.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    n = len(x)
    j = -(t * logp).sum() / n + lam * (theta ** 2).sum()
    g = x.T @ (softmax(z) - t) / n + 2 * lam * theta
    return j, g


def data_hessian(x, theta):
    """The explicit Hessian of mean CE at Θ, indexed like Θ.ravel(); small problems only."""
    n, D = x.shape
    C = theta.shape[1]
    p = softmax(x @ theta)
    H = np.zeros((D * C, D * C))
    for i in range(n):
        s = np.diag(p[i]) - np.outer(p[i], p[i])
        H += np.kron(np.outer(x[i], x[i]), s)
    return H / n


def newton_fit(x, t, lam, theta0, steps=50):
    """Newton's method with the explicit (d+1)C × (d+1)C Hessian; small problems only."""
    theta = np.array(theta0, dtype=np.float64)
    n, D = x.shape
    C = theta.shape[1]
    for _ in range(steps):
        j, g = objective(x, t, theta, lam)
        if np.abs(g).max() < 1e-14:
            break
        H = data_hessian(x, theta) + 2 * lam * np.eye(D * C)
        step = np.linalg.solve(H, g.ravel()).reshape(D, C)
        # backtracking keeps Newton safe far from the optimum
        a = 1.0
        while objective(x, t, theta - a * step, lam)[0] > j and a > 1e-8:
            a /= 2
        theta = theta - a * step
    return theta


def closed_form_alpha(x, t, theta, lam):
    return (softmax(x @ theta) - t) / (-2.0 * lam * len(x))


def representer_matrix(x_train, alpha, x_test, pred):
    """r[t, i] = α_{i, j_t} (x_i · x_t), the full matrix."""
    return (x_test @ x_train.T) * alpha[:, pred].T


def sorted_topk(values, ids, k, largest):
    """Top-k of each row by sorting (value, id) tuples: the plainest possible definition."""
    out_v, out_i = [], []
    for row in values:
        pairs = sorted(zip(row.tolist(), ids.tolist()), key=lambda p: ((-p[0] if largest else p[0]), p[1]))
        out_v.append([p[0] for p in pairs[:k]])
        out_i.append([p[1] for p in pairs[:k]])
    return np.array(out_v), np.array(out_i, dtype=np.int64)


# ---------------------------------------------------------------- binary (logistic) surrogate


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def logistic_objective(x, t, w, lam):
    """J(w) = (1/n) Σ BCE(σ(x_i·w), t_i) + λ‖w‖² and its gradient, w of shape (d+1,)."""
    z = x @ w
    # BCE with logits, stable: max(z, 0) − z t + log(1 + e^{−|z|})
    loss = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    n = len(x)
    return loss.sum() / n + lam * w @ w, x.T @ (sigmoid(z) - t) / n + 2 * lam * w


def logistic_newton_fit(x, t, lam, steps=60):
    """Newton's method with the explicit logistic Hessian Xᵀ diag(p(1−p)) X / n + 2λI."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        j, g = logistic_objective(x, t, w, lam)
        if np.abs(g).max() < 1e-14:
            break
        p = sigmoid(x @ w)
        H = (x * (p * (1 - p))[:, None]).T @ x / len(x) + 2 * lam * np.eye(x.shape[1])
        step = np.linalg.solve(H, g)
        a = 1.0
        while logistic_objective(x, t, w - a * step, lam)[0] > j and a > 1e-8:
            a /= 2
        w = w - a * step
    return w


def closed_form_binary_alpha(x, t, w, lam):
    """α_i = (σ(z_i) − t_i)/(−2λn): the derivative of BCE w.r.t. the one logit."""
    return (sigmoid(x @ w) - t) / (-2.0 * lam * len(x))
