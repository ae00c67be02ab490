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
#: much smaller blocks pay per-call overhead in BLAS. The elementwise work (softmax, loss, the
#: Hessian's weights) runs on blocks of this size: its (rows × C) temporaries stay in cache.
ROWS = 512
#: Head elements, (d+1) × columns of the products, per ROWS rows of a Hessian product's matrix
#: products. Each such product of Wᵀ X_b is added into the float64 sums: once the head no
#: longer fits in cache, that add is memory traffic in proportion to the head, against flops in
#: proportion to rows × head, so the products span several blocks for large heads. From about
#: 2^17 elements (1.5 MB of float32 product and float64 sums) spanning more rows pays: a
#: 100-class head of 1,024 features keeps ROWS, a 300-class one spans 2,048 rows and a
#: 1,000-class one 4,096.
HEAD_ELEMENTS = 1 << 17
#: Rows a matrix product spans at most. Its sum over rows is formed in float32 (by BLAS) before
#: it is added into the float64 sums: its rounding grows as √rows, and at 4,096 rows stays below
#: that of U = XV itself (over d+1 in float32) for typical d, while a shard summed whole in
#: float32 would not.
MAX_ROWS = 4096
#: Bound on a Hessian product's temporaries, U = X_b V (rows × columns), in bytes: products
#: span more rows only within it, and many directions are applied in chunks of as many as fit.
BLOCK_BYTES = 1 << 24


def product_rows(d1: int, columns: int, itemsize: int = 4) -> int:
    """Rows a Hessian product's matrix products span, for X (n × d1) times (d1 × columns) with
    elements of ``itemsize`` bytes: ROWS, or a multiple for large heads (see HEAD_ELEMENTS),
    within MAX_ROWS and BLOCK_BYTES."""
    rows = ROWS
    while (2 * rows <= MAX_ROWS and rows * HEAD_ELEMENTS < ROWS * d1 * columns
           and 2 * rows * columns * itemsize <= BLOCK_BYTES):
        rows *= 2
    return rows


def _blocks(n: int):
    rows = ROWS  # read at call time, so that tests can split a few rows into several blocks
    for a in range(0, n, rows):
        yield a, min(n, a + rows)


def _cast_blocks(x: np.ndarray, dtype: np.dtype, spans=None):
    """(start, stop, X_b in dtype) by row blocks (``spans``, else :func:`_blocks`): views when x
    has the dtype already, else copies into one reused buffer (a fresh float64 block per step is
    fresh pages each time in a worker, which maps every allocation of a few MB), so a block is
    valid until the next one."""
    spans = list(_blocks(len(x)) if spans is None else spans)
    if x.dtype == dtype:
        for a, b in spans:
            yield a, b, x[a:b]
        return
    buf = np.empty((max((b - a for a, b in spans), default=0), x.shape[1]), dtype)
    for a, b in spans:
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
    # The gradient is summed as its transpose, Σ_b R_bᵀ X_b (C × d+1): each block's product adds
    # into it contiguously, where a transposed add is strided (slow for a wide head). Rᵀ X_b
    # rather than X_bᵀ R: the same sums, faster in float64 with OpenBLAS and no slower in float32.
    loss, grad_t = 0.0, np.zeros(th.shape[::-1], np.float64)
    for a, b, xb in _cast_blocks(x, dtype):
        tb = np.asarray(targets[a:b], dtype)
        z = rows_times(xb, th, th_t)
        loss += _loss_sum(z, tb)
        p = _link(z)
        if probs_out is not None:
            probs_out[a:b] = p
        grad_t += (p - tb).T @ xb
    return loss, np.ascontiguousarray(grad_t.T)


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

    The work is two matrix products per group of row blocks, U_g = X_g V and W_gᵀ X_g, written
    into buffers reused from group to group; W is made in U's place block by block (see
    :func:`_hessian_weights`). A group spans :func:`product_rows` rows: one block for a small
    head, several for a large one, whose products then stay large enough to amortise adding
    them into the float64 sums. Those are kept transposed, (C, l, d+1), so that each W_gᵀ X_g
    adds into them contiguously, and are transposed once at the end.

    Args:
        probs: :func:`softmax_blocks` (or :func:`objective_sums_and_probs`) at this Θ and
            precision, if at hand: consecutive blocks of rows, of any sizes.
        stride: > 1: the sum over every stride-th row only (a view, no copy), scaled to all rows
            (the fit's sketch of the Hessian, see ``fit.sketch_stride``); ``probs`` is then
            ignored.

    Returns:
        float64 array shaped like ``v``.
    """
    if stride > 1:
        sample = x[::stride]
        return hvp_sums(sample, theta, v, precision) * (len(x) / max(1, len(sample)))
    if probs is None:
        probs = softmax_blocks(x, theta, precision)
    dtype = np.dtype(precision)
    d1, n_classes = v.shape[0], v.shape[1]
    width = v.shape[2] if v.ndim == 3 else 1
    groups = _groups(probs, product_rows(d1, n_classes * _chunk(width, ROWS, n_classes, dtype), dtype.itemsize))
    longest = max((b - a for a, b, _ in groups), default=1)
    step = _chunk(width, longest, n_classes, dtype)
    vv = np.asarray(v, dtype).reshape(d1, n_classes, width)
    out = np.zeros((n_classes, width, d1), np.float64)
    # Flat buffers, so that the views of a short group or chunk stay contiguous (BLAS writes
    # into them directly).
    u_buf = np.empty(longest * n_classes * step, dtype)
    prod = np.empty((n_classes * step, d1), dtype)
    for c0 in range(0, width, step):
        vc = np.ascontiguousarray(vv[:, :, c0:c0 + step]).reshape(d1, -1)
        cols = vc.shape[1]
        sums = out.reshape(-1, d1) if step == width else np.zeros((cols, d1), np.float64)
        for (a, b, xg), (_, _, ps) in zip(_cast_blocks(x, dtype, [g[:2] for g in groups]), groups):
            ug = np.matmul(xg, vc, out=u_buf[:(b - a) * cols].reshape(b - a, cols))
            r = 0
            for p in ps:
                _hessian_weights(ug[r:r + len(p)].reshape(len(p), n_classes, -1), p)
                r += len(p)
            sums += np.matmul(ug.T, xg, out=prod[:cols])
        if step < width:
            out[:, c0:c0 + step, :] = sums.reshape(n_classes, -1, d1)
    return np.ascontiguousarray(out.transpose(2, 0, 1)).reshape(v.shape)


def _chunk(width: int, rows: int, n_classes: int, dtype: np.dtype) -> int:
    """Directions applied at once: as many as keep a group's U within BLOCK_BYTES."""
    return max(1, min(width, BLOCK_BYTES // (rows * n_classes * dtype.itemsize)))


def _groups(probs, rows: int):
    """The probability blocks in consecutive groups of about ``rows`` rows (at least one block
    each): (start, stop, blocks) of each."""
    groups, start, stop, group = [], 0, 0, []
    for p in probs:
        if group and stop - start + len(p) > rows:
            groups.append((start, stop, group))
            start, group = stop, []
        group.append(p)
        stop += len(p)
    if group:
        groups.append((start, stop, group))
    return groups


def _hessian_weights(u: np.ndarray, p: np.ndarray) -> None:
    """U (rows, C, l) → W = P∘U − P∘rowsum(P∘U) = P∘(U − rowsum(P∘U)), in place: three passes
    over U and no temporary of its size (P∘U formed first would be two more)."""
    s = np.einsum("rc,rcl->rl", p, u)
    u -= s[:, None, :]
    u *= p[:, :, None]
