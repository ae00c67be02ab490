"""The head fit's sums over a shard's rows in NumPy, for workers without a GPU.

The fit's sums, with the same functions and signatures as the TensorFlow ones in
:mod:`distributed_influence.method.representer` (which GPU workers use, on a resident tensor), plus
:func:`objective_sums_and_probs`, which only CPU workers use. On a CPU they are faster and
lighter, because they work in row blocks small enough to stay in cache, with NumPy's BLAS,
and the worker needs no second, TensorFlow, copy of its features (a shard's size in memory).

The formulas are the representer module's (softmax cross-entropy, or sigmoid cross-entropy for
one column); the tests check both against finite differences and an explicit Hessian.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

#: Rows per block: X_b (rows × d+1) and its products stay in a core's cache between the two
#: reads of each Hessian product; a few hundred rows do that for heads of typical width, while
#: much smaller blocks pay per-call overhead in BLAS.
ROWS = 512
#: Bound on a block's temporaries when many directions are applied at once: rows × columns.
BLOCK_ELEMENTS = 1 << 20


def _blocks(n: int):
    rows = ROWS  # read at call time, so that tests can split a few rows into several blocks
    for a in range(0, n, rows):
        yield a, min(n, a + rows)


def _cast_blocks(x: np.ndarray, dtype: np.dtype):
    """(start, stop, X_b in dtype) by row blocks: views when x has the dtype already, else
    copies into one reused buffer (a fresh float64 block per step is fresh pages each time in a
    worker, which maps every allocation of a few MB), so a block is valid until the next one."""
    if x.dtype == dtype:
        for a, b in _blocks(len(x)):
            yield a, b, x[a:b]
        return
    buf = np.empty((min(ROWS, len(x)), x.shape[1]), dtype)
    for a, b in _blocks(len(x)):
        np.copyto(buf[:b - a], x[a:b])
        yield a, b, buf[:b - a]


def rows_times(xb: np.ndarray, th: np.ndarray, th_t: Optional[np.ndarray] = None) -> np.ndarray:
    """X_b Θ (th_t: Θᵀ, C-contiguous, if at hand). In float64 with several columns OpenBLAS
    computes it faster as (Θᵀ X_bᵀ)ᵀ; in float32, or for few columns, the direct product is as
    fast or faster, so those take it."""
    if xb.dtype == np.float64 and th.shape[1] >= 8:
        return ((np.ascontiguousarray(th.T) if th_t is None else th_t) @ xb.T).T
    return xb @ th


def _link(z: np.ndarray) -> np.ndarray:
    """softmax by rows, or the sigmoid for one column."""
    if z.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-z))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _loss_sum(z: np.ndarray, t: np.ndarray) -> float:
    """Σ_i of the softmax cross-entropy −Σ_c t_ic log softmax(z_i)_c, or of the sigmoid one."""
    if z.shape[1] == 1:
        return float(np.sum(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))))
    m = z.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    return float(np.sum(t * (lse - z)))


def objective_sums(x: np.ndarray, targets: np.ndarray, theta: np.ndarray,
                   precision: str = "float64") -> Tuple[float, np.ndarray]:
    """Σ_i CE(x_i Θ, t_i) and Σ_i x_iᵀ(p_i − t_i), as :func:`representer.objective_sums`."""
    return _objective(x, targets, theta, precision, None)


def objective_sums_and_probs(x: np.ndarray, targets: np.ndarray, theta: np.ndarray,
                             precision: str = "float64") -> Tuple[float, np.ndarray, List[np.ndarray]]:
    """:func:`objective_sums` and, from the same products, what :func:`softmax_blocks` gives
    at Θ (bit for bit): the fit's Hessian products at an accepted point then need no pass of
    their own to get it."""
    out = np.empty((len(x), np.shape(theta)[1]), np.dtype(precision))
    loss, grad = _objective(x, targets, theta, precision, out)
    return loss, grad, [out[a:b] for a, b in _blocks(len(x))]


def _objective(x, targets, theta, precision: str, probs_out: Optional[np.ndarray]):
    dtype = np.dtype(precision)
    th = np.asarray(theta, dtype)
    th_t = np.ascontiguousarray(th.T)
    loss, grad = 0.0, np.zeros(th.shape, np.float64)
    for a, b, xb in _cast_blocks(x, dtype):
        tb = np.asarray(targets[a:b], dtype)
        z = rows_times(xb, th, th_t)
        loss += _loss_sum(z, tb)
        p = _link(z)
        if probs_out is not None:
            probs_out[a:b] = p
        # (Rᵀ X_b)ᵀ rather than X_bᵀ R: the same sums, faster in float64 with OpenBLAS and no
        # slower in float32.
        grad += ((p - tb).T @ xb).T
    return loss, grad


def softmax_blocks(x: np.ndarray, theta: np.ndarray, precision: str = "float64") -> List[np.ndarray]:
    """softmax(XΘ) (σ for one column), kept for the Hessian products of one Newton step."""
    dtype = np.dtype(precision)
    th = np.asarray(theta, dtype)
    th_t = np.ascontiguousarray(th.T)
    # One array, handed out as row blocks: freed at once (and returned to the system) after the fit.
    out = np.empty((len(x), th.shape[1]), dtype)
    for a, b, xb in _cast_blocks(x, dtype):
        out[a:b] = _link(rows_times(xb, th, th_t))
    return [out[a:b] for a, b in _blocks(len(x))]


def hvp_sums(x: np.ndarray, theta: np.ndarray, v: np.ndarray, precision: str = "float64",
             probs=None, stride: int = 1) -> np.ndarray:
    """Σ_i of the cross-entropy Hessian at Θ applied to V, as :func:`representer.hvp_sums`:
    Xᵀ(P∘U − P∘rowsum(P∘U)) with U = XV, for V of shape (d+1, C) or (d+1, C, l).

    ``stride`` > 1: the sum over every stride-th row only (a view, no copy), scaled to all rows
    (the fit's sketch of the Hessian, see ``fit.sketch_stride``); ``probs`` is then ignored."""
    if stride > 1:
        sample = x[::stride]
        return hvp_sums(sample, theta, v, precision) * (len(x) / max(1, len(sample)))
    if probs is None:
        probs = softmax_blocks(x, theta, precision)
    dtype = np.dtype(precision)
    d1, n_classes = v.shape[0], v.shape[1]
    width = v.shape[2] if v.ndim == 3 else 1
    vv = np.asarray(v, dtype).reshape(d1, n_classes, width)
    out = np.zeros((d1, n_classes, width), np.float64)
    # Directions in chunks so that a block's (rows × C·l) temporaries stay bounded.
    step = max(1, min(width, BLOCK_ELEMENTS // (ROWS * n_classes)))
    for c0 in range(0, width, step):
        vc = np.ascontiguousarray(vv[:, :, c0:c0 + step]).reshape(d1, -1)
        acc = out[:, :, c0:c0 + step]
        for (a, b, xb), p in zip(_cast_blocks(x, dtype), probs):
            pu = p[:, :, None] * (xb @ vc).reshape(b - a, n_classes, -1)
            w = pu - p[:, :, None] * pu.sum(axis=1, keepdims=True)
            # (Wᵀ X_b)ᵀ rather than X_bᵀ W: the same sums, faster in OpenBLAS for few columns.
            acc += (w.reshape(b - a, -1).T @ xb).T.reshape(acc.shape)
    return out.reshape(v.shape)
