"""The pruned scoring path: exact top-k from the few pairs whose bound can reach it.

By Cauchy–Schwarz |r_i(t)| ≤ |α_{i,j}|·‖x_i‖·‖x_t‖. For each class j the shard's rows are scanned
in decreasing key |α_{i,j}|·‖x_i‖, against all test rows explaining j, and a test row stops once
the next bound is strictly below both its k-th proponent value and its k-th opponent magnitude.
Why the result equals the dense path's, rounding included, is argued in the module docstring of
:mod:`distributed_influence.method.scoring` and in ``docs/method.md``.
"""

from __future__ import annotations

import logging

import numpy as np

from distributed_influence.method.representer import RowParts, row_blocks, tf

log = logging.getLogger(__name__)

#: Unit roundoff of float32.
U32 = 2.0 ** -24
#: Smallest positive float32 (subnormal): the absolute error of a product that underflows.
TINY32 = 2.0 ** -149
#: Extra relative error of TensorFloat-32 inputs (10-bit mantissas) on top of float32's.
TF32_EXTRA = 2.0 ** -9

#: Candidate rows of the pruned path's first block per class, and the largest block. Blocks
#: double in between, so a test row that needs many rows costs few steps.
FIRST_BLOCK = 256
MAX_BLOCK = 4096
#: (test, train) pairs per step of the exact finish: its float32 buffer of (pairs × (d+1)).
CANON_PAIRS = 40


def row_norms(x, factor: float) -> np.ndarray:
    """Upper bounds of ‖x_i‖ (float64) from float32 sums of squares: a float32 sum of d+1
    non-negative terms, in any order, is within γ of exact, so ``factor`` (from
    :func:`bound_factor`) times it, plus what squares may lose to underflow, bounds ‖x_i‖²."""
    x = np.asarray(x, np.float32)
    sq = np.einsum("ij,ij->i", x, x).astype(np.float64)  # float32 sums, no temporary copy
    return np.sqrt(sq * factor + x.shape[1] * TINY32)


def bound_factor(dim: int, tf32: bool = False) -> float:
    """Relative inflation of |α|·‖x_i‖·‖x_t‖ that bounds the *computed* float32 value.

    Args:
        dim: terms of the dot product (d+1).
        tf32: TensorFloat-32 products may run (inputs rounded to 10-bit mantissas).

    Returns:
        1 + 2(dim+2)·u (≥ (1+γ_dim)(1+u) for dim·u ≤ 1/4, with room for the float64 rounding of
        norms and keys), times 1 + 2⁻⁹ under TF32.
    """
    if (dim + 2) * U32 > 0.25:
        raise ValueError(f"feature dimension {dim} too large for the float32 error bound")
    factor = 1.0 + 2.0 * (dim + 2) * U32
    return factor * (1.0 + TF32_EXTRA) if tf32 else factor


def tf32_possible() -> bool:
    """True when a matrix product may run in TensorFloat-32: a visible GPU with TF32 enabled."""
    return bool(tf.config.list_logical_devices("GPU")) and tf.config.experimental.tensor_float_32_execution_enabled()


@tf.function(reduce_retracing=True, autograph=False)
def _merge_candidates(xt, x, alpha_c, cand, pv, pr, ov, orow, k):
    """Scores a block of gathered candidate rows and merges it into the running top-k lists.

    ``cand`` are shard rows (int32); ``pv``/``pr`` the running proponent values and rows,
    ``ov``/``orow`` the opponents'. The merged lists are re-ordered by row before ``top_k``
    (which keeps the lower position among equal values), so ties go to the smaller row.
    """
    # Same float32 expression as the dense path: matrix product, then the product with α.
    r = tf.matmul(xt, tf.gather(x, cand), transpose_b=True) * tf.gather(alpha_c, cand)[None, :]
    b = tf.shape(xt)[0]
    rows = tf.broadcast_to(cand[None, :], [b, tf.shape(cand)[0]])

    def merge(values, vrows, sign):
        v = tf.concat([values, r], axis=1)
        w = tf.concat([vrows, rows], axis=1)
        perm = tf.argsort(w, axis=1, stable=True)
        v = tf.gather(v, perm, batch_dims=1)
        w = tf.gather(w, perm, batch_dims=1)
        top = tf.math.top_k(sign * v, k=k, sorted=True)
        return sign * top.values, tf.gather(w, top.indices, batch_dims=1)

    pv, pr = merge(pv, pr, 1.0)
    ov, orow = merge(ov, orow, -1.0)
    return pv, pr, ov, orow


def _merge_numpy(xt, x, alpha_c, cand, pv, pr, ov, orow, k2):
    """:func:`_merge_candidates` in NumPy, for CPU workers (no resident tensor to gather from).

    Same float32 expression (matrix product, then the product with α). Each kind keeps the k2
    best of the block, found by one ``argpartition``, merged with the running lists by (value,
    row). Which of several equal values at the k2-th place are kept does not matter: the stop
    test and :func:`finish_exact` use the values only.
    """
    r = np.matmul(xt, np.take(x, cand, axis=0).T)
    r *= alpha_c[cand]
    w = len(cand)
    if w > 2 * k2:
        part = np.argpartition(r, (k2 - 1, w - k2), axis=1)
        low, high = part[:, :k2], part[:, w - k2:]
    else:
        low = high = np.broadcast_to(np.arange(w), r.shape)

    def merge(values, rows, pos, largest):
        v = np.concatenate([values, np.take_along_axis(r, pos, 1)], axis=1)
        w_rows = np.concatenate([rows, cand[pos]], axis=1)
        pick = _select(v, w_rows, k2, largest)
        return np.take_along_axis(v, pick, 1), np.take_along_axis(w_rows, pick, 1)

    pv, pr = merge(pv, pr, high, True)
    ov, orow = merge(ov, orow, low, False)
    return pv, pr, ov, orow


def _pruned_class(xt_b, tnorm, rel, eabs, x, alpha_c, order, skey, k, k2, factor, eta):
    """Candidates of one class's test rows (a block) by the pruned scan of the shard's rows.

    Args:
        xt_b: (b, d+1) float32 test rows explaining this class.
        tnorm: (b,) float64 their norms.
        rel, eabs: (b,) float64: any float32 product g of a row is within rel·|g| + eabs of the
            exact value (see :meth:`Geometry.error`).
        x: (s, d+1) shard features: a resident tensor (then the scan runs in TensorFlow, on
            the tensor's device) or a float32 array (then in NumPy).
        alpha_c: (s,) float32 α of this class (a tensor with a tensor ``x``).
        order: (s,) int32 shard rows by decreasing key |α|·‖x_i‖.
        skey: (s,) float64 the keys in that order.
        k: entries per kind; k2 (≥ k) candidates kept per kind for the exact finish.
        factor, eta: the float32 safety margin (:func:`bound_factor`) and absolute term.

    Returns:
        (proponent values, rows, opponent values, rows) each (b, k2) by float32 products, best
        first, and the pairs scored. Every row of the exact top-k is among the scanned rows.
    """
    b, s = len(xt_b), len(order)
    on_device = not isinstance(x, np.ndarray)
    out = [np.empty((b, k2), np.float32), np.empty((b, k2), np.int64),
           np.empty((b, k2), np.float32), np.empty((b, k2), np.int64)]
    active = np.arange(b)
    sentinel = np.broadcast_to(np.arange(s, s + k2, dtype=np.int32 if on_device else np.int64), (b, k2))
    pv, ov = np.full((b, k2), -np.inf, np.float32), np.full((b, k2), np.inf, np.float32)
    pr, orow = sentinel, sentinel
    if on_device:
        xt, pv, pr, ov, orow = (tf.constant(a) for a in (xt_b, pv, pr, ov, orow))
        kk = tf.constant(k2)
    else:
        xt = xt_b
    # The first block holds at least k2 rows, so no sentinel survives into a finished list.
    pos, width, pairs = 0, max(FIRST_BLOCK, k2), 0

    def emit(which, state):
        for slot, arr in zip(out, state):
            slot[active[which]] = arr[which]

    while True:
        end = min(s, pos + width)
        cand = np.sort(order[pos:end])  # ascending rows: a friendlier gather
        if on_device:
            pv, pr, ov, orow = _merge_candidates(xt, x, alpha_c, tf.constant(cand), pv, pr, ov, orow, kk)
            state = [pv.numpy(), pr.numpy(), ov.numpy(), orow.numpy()]
        else:
            pv, pr, ov, orow = state = _merge_numpy(xt, x, alpha_c, cand, pv, pr, ov, orow, k2)
        pairs += len(active) * (end - pos)
        pos, width = end, min(2 * width, MAX_BLOCK)
        if pos >= s:
            emit(slice(None), state)
            return out, pairs
        # The next row's bound on any computed value (every later row's is no larger), against
        # the k-th values lowered by what float32 products may be off from the exact finish.
        bound = skey[pos] * tnorm[active] * factor + eta
        r, e = rel[active], eabs[active]
        top_k = state[0][:, k - 1].astype(np.float64)
        bottom_k = state[2][:, k - 1].astype(np.float64)
        # The finished k-th values (float32 dot products again) are at least
        # top_k − 2(r|top_k| + e) (at most bottom_k + ...); every unscanned row's finished value
        # is within its bound, so it stays strictly below (above) them.
        stop = ((bound < top_k - 2.01 * (r * np.abs(top_k) + e))
                & (bound < -bottom_k - 2.01 * (r * np.abs(bottom_k) + e)))
        if stop.any():
            emit(stop, state)
            keep = np.flatnonzero(~stop)
            if not len(keep):
                return out, pairs
            active = active[keep]
            if on_device:
                keep_t = tf.constant(keep)
                xt, pv, pr, ov, orow = (tf.gather(t, keep_t) for t in (xt, pv, pr, ov, orow))
            else:
                xt, pv, pr, ov, orow = (a[keep] for a in (xt, pv, pr, ov, orow))


def _take(test_x: RowParts, rows: np.ndarray) -> np.ndarray:
    """Rows (ascending) of the test features, gathered from their parts."""
    pieces = []
    for p, s in zip(test_x.parts, test_x.starts[:-1]):
        sel = rows[(rows >= s) & (rows < s + len(p))] - s
        if len(sel):
            pieces.append(np.asarray(p)[sel])
    return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]


def score_pruned(x_t, geo: "Geometry", test_x: RowParts, test_pred, k, k2, block, finish):
    """The pruned path: per class, blocks of that class's test rows against the scan order."""
    s = geo.rows
    pairs = 0
    for c in range(geo.alpha32.shape[1]):
        rows_c = np.flatnonzero(test_pred == c)
        if not len(rows_c):
            continue
        key = np.abs(geo.alpha32[:, c]).astype(np.float64) * geo.xnorm
        order = np.argsort(-key, kind="stable").astype(np.int32)  # the only per-class array
        skey = key[order]
        alpha_c = np.ascontiguousarray(geo.alpha32[:, c])
        alpha_c = alpha_c if isinstance(x_t, np.ndarray) else tf.constant(alpha_c)
        b0 = 0
        while b0 < len(rows_c):
            sel = rows_c[b0:b0 + block]
            xt = _take(test_x, sel)
            tnorm = row_norms(xt, geo.factor)
            rel, eabs = geo.error(xt, test_pred[sel], tnorm)
            try:
                (pv, pr, ov, orow), n = _pruned_class(xt, tnorm, rel, eabs, x_t, alpha_c, order, skey, k, k2,
                                                      geo.factor, geo.eta[c])
            except tf.errors.ResourceExhaustedError:
                if block == 1:
                    raise
                block = max(1, block // 2)
                log.warning("out of memory while scoring: test block now %d", block)
                continue
            pairs += n
            finish(sel, xt, test_pred[sel], pv, pr, ov, orow, s <= k2)
            b0 += len(sel)
    return pairs


class Geometry:
    """Per-shard quantities of the bounds: norms, float32 α, the margin, per-class maxima."""

    def __init__(self, x, alpha):
        self.rows, dim = x.shape
        self.alpha32 = np.asarray(alpha, np.float32)
        self.factor = bound_factor(dim, tf32_possible())
        self.xnorm = row_norms(x, self.factor)
        self.nonneg = bool(self.rows == 0 or np.min(x) >= 0)
        n_classes = self.alpha32.shape[1]
        self.maxkey, a_max = np.zeros(n_classes), np.zeros(n_classes)
        for a, b in row_blocks(self.rows):  # float64 by blocks: no (rows × C) float64 copy
            a_abs = np.abs(self.alpha32[a:b]).astype(np.float64)
            self.maxkey = np.maximum(self.maxkey, (a_abs * self.xnorm[a:b, None]).max(axis=0))
            a_max = np.maximum(a_max, a_abs.max(axis=0))
        self.eta = (a_max * dim + 1.0) * TINY32

    def error(self, xt: np.ndarray, pred: np.ndarray, tnorm: np.ndarray):
        """(rel, abs) per test row: every float32 product g of the row, in any summation order,
        is within rel·|g| + abs of its exact value.

        With non-negative features on both sides a dot product's error is relative to the dot
        product itself (γ·Σ|x_ik x_tk| = γ·x_i·x_t): rel = (f−1)/(2−f). Otherwise it is relative
        to the Cauchy–Schwarz bound: abs = (f−1)·max_i |α_ij|‖x_i‖·‖x_t‖.
        """
        f1 = self.factor - 1.0
        eta = self.eta[pred]
        if self.nonneg:
            pos = xt.min(axis=1) >= 0 if len(xt) else np.zeros(0, bool)
        else:
            pos = np.zeros(len(xt), bool)
        rel = np.where(pos, f1 / (1.0 - f1), 0.0)
        eabs = np.where(pos, eta, f1 * self.maxkey[pred] * tnorm + eta)
        return rel, eabs


def _canonical_dots(x: np.ndarray, rows: np.ndarray, xt: np.ndarray) -> np.ndarray:
    """x_i·x_t in float32 for the rows (b, K) of each test row, each by NumPy's pairwise sum of
    its d+1 products.

    The summation order of each dot product depends only on d, not on where the pair sits in a
    matrix product, its block, or the array's alignment: both paths (and every shard) get the
    same bits for the same pair. (A float32 matrix product does not: its summation order follows
    the shapes and the kernel's blocking.) The error obeys the same bound as any float32 dot.
    Pairs go ~CANON_PAIRS at a time through one small buffer, which stays in the core's cache:
    faster than copying a larger block of pairs per step.
    """
    b, kk = rows.shape
    out = np.empty(rows.shape, np.float32)
    if not b or not kk:
        return out
    step = max(1, CANON_PAIRS // max(1, kk))
    buf = np.empty((step * kk, x.shape[1]), np.float32)
    for a in range(0, b, step):
        e = min(b, a + step)
        g = np.take(x, rows[a:e].ravel(), axis=0, out=buf[:(e - a) * kk]).reshape(e - a, kk, -1)
        np.multiply(g, xt[a:e, None, :], out=g)
        np.add.reduce(g, axis=-1, out=out[a:e])
    return out


def _select(val: np.ndarray, rows: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Positions of the top-k of each row by (value, row): ties to the smaller row (id)."""
    return np.lexsort((rows, -val if largest else val), axis=-1)[:, :k]


def _full_rows(x: np.ndarray, xt: np.ndarray, a32: np.ndarray, k: int):
    """The exact finish over every shard row, for the few test rows the candidates cannot
    certify (an exact tie across the k-th place, say): the same per-pair dot products."""
    s = len(x)
    out = [[], []]
    for t in range(len(xt)):
        dots = np.concatenate([_canonical_dots(x, np.arange(a, b)[None, :], xt[t:t + 1])[0]
                               for a, b in row_blocks(s, 4096)])[None, :]
        val = dots * a32[t:t + 1]
        rows = np.arange(s)[None, :]
        for kind, largest in enumerate((True, False)):
            pick = _select(val, rows, k, largest)
            out[kind].append((np.take_along_axis(val, pick, 1), np.take_along_axis(rows, pick, 1),
                              np.take_along_axis(dots, pick, 1)))
    return [tuple(np.concatenate([o[f] for o in out[kind]]) for f in range(3)) for kind in range(2)]


def finish_exact(x, geo: Geometry, xt, pred, cands, k: int, complete: bool):
    """The exact top-k from each path's float32 candidates, with values both paths agree on.

    Both paths keep k2 > k candidates per kind, best first by their float32 products g. Each g
    is within rel·|g| + abs of its exact value (:meth:`Geometry.error`).

    - Membership: when the intervals of the k-th and (k+1)-th candidates are disjoint, even
      doubled (the finish's own float32 values may be off as much again), the first k
      candidates are the top-k by exact and by finished values alike. Otherwise (ties or near-ties across the k-th place) all
      k2 candidates are kept for the next step, and the result is certain when the k2-th
      candidate's interval lies below the new k-th value; a row where even that fails is scored
      against the whole shard (an exact tie across the k-th place, say).
    - Values and order: the kept rows are scored again pair by pair (:func:`_canonical_dots`,
      then the float32 product with α) and ordered by (value, id). That does not depend on
      either path's matrix products, so both paths, and the merge of shards, compare the same
      numbers: the tables are equal bit for bit.

    Returns:
        ([(values, rows, similarity) for proponents, for opponents] each (b, k), rows finished
        against the whole shard, rows whose k2 candidates were re-scored).
    """
    b = len(xt)
    tnorm = row_norms(xt, geo.factor)
    rel, eabs = geo.error(xt, pred, tnorm)
    out, full, wide = [], np.zeros(b, bool), np.zeros(b, bool)
    for (gv, gr), largest in zip(cands, (True, False)):
        vals = np.empty((b, k), np.float32)
        rows = np.empty((b, k), np.int64)
        sims = np.empty((b, k), np.float32)
        g = gv.astype(np.float64)
        # Twice the interval (and a little): finished values are float32 dot products too.
        hi = g + 2.01 * (rel[:, None] * np.abs(g) + eabs[:, None])
        lo = g - 2.01 * (rel[:, None] * np.abs(g) + eabs[:, None])
        if gv.shape[1] > k:
            certain = (lo[:, k - 1] > hi[:, k]) if largest else (hi[:, k - 1] < lo[:, k])
        else:
            certain = np.ones(b, bool)
        wide |= ~certain
        for sel, width in ((np.flatnonzero(certain), k), (np.flatnonzero(~certain), gv.shape[1])):
            if not len(sel):
                continue
            cand = gr[sel, :width]
            dots = _canonical_dots(x, cand, xt[sel])
            val = geo.alpha32[cand, pred[sel, None]] * dots
            pick = _select(val, cand, k, largest)
            vals[sel] = np.take_along_axis(val, pick, 1)
            rows[sel] = np.take_along_axis(cand, pick, 1)
            sims[sel] = np.take_along_axis(dots, pick, 1)
            if width > k and not complete:
                ck = vals[sel, -1].astype(np.float64)
                ok = (hi[sel, -1] < ck) if largest else (lo[sel, -1] > ck)
                full[sel[~ok]] = True
        out.append([vals, rows, sims])
    redo = np.flatnonzero(full)
    if len(redo):
        whole = _full_rows(x, xt[redo], geo.alpha32[:, pred[redo]].T, k)
        for kind in range(2):
            for field in range(3):
                out[kind][field][redo] = whole[kind][field]
    return out, len(redo), int(wide.sum())
