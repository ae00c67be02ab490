"""The pruned scoring path: exact top-k from the few pairs whose bound can reach it.

By Cauchy–Schwarz |r_i(t)| ≤ |α_{i,j}|·‖x_i‖·‖x_t‖. For each class j the shard's rows are scanned
in decreasing key |α_{i,j}|·‖x_i‖, against all test rows explaining j, and a test row stops once
the next bound is strictly below both its k-th proponent value and its k-th opponent magnitude.
Why the result equals the dense path's, rounding included, is argued in the module docstring of
:mod:`distributed_influence.method.scoring` and in ``docs/method.md``.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from distributed_influence.method.finish import TWICE, finish_all, finish_blocks, select
from distributed_influence.method.representer import RowParts, row_blocks, tf

log = logging.getLogger(__name__)

#: Unit roundoff of float32.
U32 = 2.0 ** -24
#: Smallest positive float32 (subnormal): the absolute error of a product that underflows.
TINY32 = 2.0 ** -149
#: Extra relative error of TensorFloat-32 inputs (10-bit mantissas) on top of float32's.
TF32_EXTRA = 2.0 ** -9

#: Candidate rows of the pruned path's first block per class, and the largest block. Blocks
#: double in between, so a test row that needs many rows costs few steps. Read at call time:
#: tests lower them to scan small shards in many steps.
FIRST_BLOCK = 256
MAX_BLOCK = 4096
#: A shard of at most this many first blocks is scored densely, once (:func:`finish_all`): the
#: scan would cover most of it anyway, and then pay the exact finish on top.
DENSE_BLOCKS = 4
#: The per-class order is computed for a prefix of the rows, grown by this factor when a scan
#: needs more: a partition costs O(rows), a full sort O(rows·log rows) per class.
PREFIX_GROWTH = 4
#: Test rows gathered (over classes) before one call of the exact finish: classes with few test
#: rows share its fixed costs.
FINISH_ROWS = 512


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
    test and :func:`~.finish.finish_exact` use the values only. Also returns the block's values
    (b, candidates), which the first step's tied rows are finished from (:func:`_finish_tied`).
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
        pick = select(v, w_rows, k2, largest)
        return np.take_along_axis(v, pick, 1), np.take_along_axis(w_rows, pick, 1)

    pv, pr = merge(pv, pr, high, True)
    ov, orow = merge(ov, orow, low, False)
    return pv, pr, ov, orow, r


def _tied(state, rel, eabs, k: int) -> np.ndarray:
    """Rows whose k2 candidates already lie within reach of their k-th (either kind): many rows
    tie at the top (duplicated examples, or the near-identical features of an untrained
    backbone). Their scan would rarely stop, and their finish would need the whole shard again."""
    tied = np.zeros(len(rel), bool)
    for values, sign in ((state[0], 1.0), (state[2], -1.0)):
        v = sign * values.astype(np.float64)
        spread = TWICE * (rel[:, None] * np.abs(v) + eabs[:, None])
        tied |= v[:, -1] + spread[:, -1] >= v[:, k - 1] - spread[:, k - 1]
    return tied


def _finish_tied(x, geo, alpha_c, xt, pred, r_first, cand, k):
    """Tied rows (:func:`_tied`) finished against the whole shard, scoring only the rows their
    first block did not: each pair is scored once, as on the dense path."""
    rest = np.ones(len(x), bool)
    rest[cand] = False
    rest = np.flatnonzero(rest)

    def values(a, e):
        g = np.empty((e - a, len(x)), np.float32)
        g[:, :len(cand)] = r_first[a:e]
        for c0 in range(0, len(rest), MAX_BLOCK):  # gathered by blocks: no copy of the shard
            rows = rest[c0:c0 + MAX_BLOCK]
            block = g[:, len(cand) + c0:len(cand) + c0 + len(rows)]
            np.matmul(xt[a:e], np.take(x, rows, axis=0).T, out=block)
            block *= alpha_c[rows]
        return g

    return finish_blocks(x, geo, xt, pred, k, np.concatenate([cand, rest]), values)


class ScanOrder:
    """A class's shard rows by decreasing key |α_ij|·‖x_i‖, computed only as far as a scan reads.

    A scan usually stops after a small fraction of the shard, so the order is built by prefixes:
    each extension takes the next rows by one partition of the keys not yet taken (O(rows)) and
    sorts only those. The prefix only ever grows at its end, so rows already scanned keep their
    places, and every key after the prefix is at most :meth:`bound_at` of its end.
    """

    def __init__(self, key: np.ndarray):
        self.rest = np.array(key, np.float64)  # keys of rows not yet in the prefix; −inf once taken
        self.rows = np.zeros(0, np.int64)
        self.keys = np.zeros(0, np.float64)
        self.next_key = float(self.rest.max()) if len(self.rest) else 0.0

    def extend(self, end: int) -> None:
        """Makes the prefix hold at least ``end`` rows (all of them, at most)."""
        s, have = len(self.rest), len(self.rows)
        if end <= have:
            return
        want = min(s - have, max(end, PREFIX_GROWTH * have, 1) - have)
        if want < s - have:
            part = np.argpartition(-self.rest, want)
            new, self.next_key = part[:want], float(self.rest[part[want]])
        else:
            new, self.next_key = np.flatnonzero(self.rest > -np.inf), 0.0
        new = new[np.lexsort((new, -self.rest[new]))]  # decreasing key, ties to the smaller row
        self.rows = np.concatenate([self.rows, new])
        self.keys = np.concatenate([self.keys, self.rest[new]])
        self.rest[new] = -np.inf

    def bound_at(self, pos: int) -> float:
        """The largest key of the rows at positions ≥ ``pos`` (within or just past the prefix)."""
        return float(self.keys[pos]) if pos < len(self.rows) else self.next_key


def _pruned_class(xt_b, tnorm, rel, eabs, x, alpha_c, order: ScanOrder, k, k2, factor, eta, geo, cls):
    """Candidates of one class's test rows (a block) by the pruned scan of the shard's rows.

    Args:
        xt_b: (b, d+1) float32 test rows explaining this class.
        tnorm: (b,) float64 their norms.
        rel, eabs: (b,) float64: any float32 product g of a row is within rel·|g| + eabs of the
            exact value (see :meth:`Geometry.error`).
        x: (s, d+1) shard features: a resident tensor (then the scan runs in TensorFlow, on
            the tensor's device) or a float32 array (then in NumPy).
        alpha_c: (s,) float32 α of this class (a tensor with a tensor ``x``).
        order: the shard rows by decreasing key |α|·‖x_i‖ (extended here as far as needed).
        k: entries per kind; k2 (≥ k) candidates kept per kind for the exact finish.
        factor, eta: the float32 safety margin (:func:`bound_factor`) and absolute term.
        geo, cls: the shard's :class:`Geometry` and this class (to finish tied rows here).

    Returns:
        (proponent values, rows, opponent values, rows) each (b, k2) by float32 products, best
        first, the pairs scored, and the rows tied at the top after the first block (NumPy
        scan only) with their finished lists, or None: those were scored against the whole
        shard and finished here (:func:`_finish_tied`), and their candidate rows are unset.
        Every row of the exact top-k is among a row's scanned rows.
    """
    b, s = len(xt_b), len(order.rest)
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
    finished = None  # (rows, their finished lists): rows tied at the top, finished densely

    def emit(which, state):
        for slot, arr in zip(out, state):
            slot[active[which]] = arr[which]

    while True:
        end = min(s, pos + width)
        order.extend(end)
        cand = np.sort(order.rows[pos:end])  # ascending rows: a friendlier gather
        if on_device:
            pv, pr, ov, orow = _merge_candidates(xt, x, alpha_c, tf.constant(cand.astype(np.int32)), pv, pr, ov,
                                                 orow, kk)
            state = [pv.numpy(), pr.numpy(), ov.numpy(), orow.numpy()]
        else:
            pv, pr, ov, orow, r = _merge_numpy(xt, x, alpha_c, cand, pv, pr, ov, orow, k2)
            state = [pv, pr, ov, orow]
        pairs += len(active) * (end - pos)
        if pos == 0 and not on_device and end < s and k2 > k:
            tied = np.flatnonzero(_tied(state, rel, eabs, k))
            if len(tied):
                finished = (tied, _finish_tied(x, geo, alpha_c, xt[tied], np.full(len(tied), cls), r[tied], cand, k))
                pairs += len(tied) * (s - end)
                keep = np.setdiff1d(np.arange(b), tied)
                if not len(keep):
                    return out, pairs, finished
                active = keep
                pv, pr, ov, orow, xt = (a[keep] for a in (pv, pr, ov, orow, xt))
                state = [pv, pr, ov, orow]
        pos, width = end, min(2 * width, MAX_BLOCK)
        if pos >= s:
            emit(slice(None), state)
            return out, pairs, finished
        # The next row's bound on any computed value (every later row's is no larger), against
        # the k-th values lowered by what float32 products may be off from the exact finish.
        bound = order.bound_at(pos) * tnorm[active] * factor + eta
        rel_a, eabs_a = rel[active], eabs[active]
        top_k = state[0][:, k - 1].astype(np.float64)
        bottom_k = state[2][:, k - 1].astype(np.float64)
        # The finished k-th values (float32 dot products again) are at least
        # top_k − 2(rel|top_k| + eabs) (at most bottom_k + ...); every unscanned row's finished
        # value is within its bound, so it stays strictly below (above) them.
        stop = ((bound < top_k - TWICE * (rel_a * np.abs(top_k) + eabs_a))
                & (bound < -bottom_k - TWICE * (rel_a * np.abs(bottom_k) + eabs_a)))
        if stop.any():
            emit(stop, state)
            keep = np.flatnonzero(~stop)
            if not len(keep):
                return out, pairs, finished
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


class _Pending:
    """Scanned test rows waiting for the exact finish, gathered over classes: one call of the
    finish per FINISH_ROWS rows instead of one per class (many classes have a few rows each)."""

    def __init__(self, finish):
        self.finish, self.items, self.rows = finish, [], 0

    def add(self, *item) -> None:
        self.items.append(item)
        self.rows += len(item[0])
        if self.rows >= FINISH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.items:
            self.finish(*(np.concatenate(parts) for parts in zip(*self.items)))
        self.items, self.rows = [], 0


def score_pruned(x_scan, x, geo: "Geometry", test_x: RowParts, test_pred, k, k2, block, finish, put):
    """The pruned path: per class, blocks of that class's test rows against the scan order.

    Args:
        x_scan: what the scan reads (a resident tensor, or ``x`` itself).
        x: (s, d+1) float32 shard features.
        geo: the shard's :class:`Geometry`.
        test_x, test_pred: the test features (in parts) and each row's explained class.
        k, k2: entries kept per kind, and candidates kept per kind for the exact finish.
        block: test rows per scan; halved if a device runs out of memory.
        finish: (rows, test features, classes, proponent values, rows, opponent values, rows)
            ↦ None: the exact finish of scanned rows' candidates (:func:`~.finish.finish_exact`).
        put: (rows, classes, finished lists, dense) ↦ None: stores rows finished here directly
            (``dense``: against the whole shard, the rows tied at the top).

    Returns:
        The (test, train) pairs scored.
    """
    s = geo.rows
    if s <= DENSE_BLOCKS * max(FIRST_BLOCK, k2):
        return _score_all(x, geo, test_x, test_pred, k, block, put)
    pairs = 0
    pending = _Pending(finish)
    by_class = np.argsort(test_pred, kind="stable")
    bounds = np.searchsorted(test_pred[by_class], np.arange(geo.alpha_t.shape[0] + 1))
    for c in np.flatnonzero(np.diff(bounds)):
        rows_c = by_class[bounds[c]:bounds[c + 1]]  # ascending: a stable sort of the classes
        order = ScanOrder(np.abs(geo.alpha_t[c]).astype(np.float64) * geo.xnorm)
        alpha_c = geo.alpha_t[c] if isinstance(x_scan, np.ndarray) else tf.constant(geo.alpha_t[c])
        b0 = 0
        while b0 < len(rows_c):
            sel = rows_c[b0:b0 + block]
            xt = _take(test_x, sel)
            tnorm = row_norms(xt, geo.factor)
            rel, eabs = geo.error(xt, test_pred[sel], tnorm)
            try:
                (pv, pr, ov, orow), n, tied = _pruned_class(xt, tnorm, rel, eabs, x_scan, alpha_c, order, k, k2,
                                                            geo.factor, geo.eta[c], geo, c)
            except tf.errors.ResourceExhaustedError:
                if block == 1:
                    raise
                block = max(1, block // 2)
                log.warning("out of memory while scoring: test block now %d", block)
                continue
            pairs += n
            scanned = np.ones(len(sel), bool)
            if tied is not None:
                put(sel[tied[0]], test_pred[sel[tied[0]]], tied[1], True)
                scanned[tied[0]] = False
            if scanned.any():
                pending.add(*(a[scanned] for a in (sel, xt, test_pred[sel], pv, pr, ov, orow)))
            b0 += len(sel)
    pending.flush()
    return pairs


def _score_all(x, geo: "Geometry", test_x: RowParts, test_pred, k, block, put):
    """A shard the scan would cover anyway: every pair once, and the exact finish from them."""
    m = len(test_x)
    for b0 in range(0, m, block):
        b1 = min(m, b0 + block)
        put(np.arange(b0, b1), test_pred[b0:b1], finish_all(x, geo, test_x.rows(b0, b1), test_pred[b0:b1], k))
    return m * geo.rows


class Geometry:
    """Per-shard quantities of the bounds: norms, float32 α by class, the margin, per-class maxima."""

    def __init__(self, x, alpha):
        self.rows, dim = x.shape
        # αᵀ (C, s) float32: a class's α is one contiguous row, read once per class by the scan
        # and gathered by (class, row) in the finish.
        self.alpha_t = np.ascontiguousarray(np.asarray(alpha).T, dtype=np.float32)
        self.factor = bound_factor(dim, tf32_possible())
        self.xnorm = row_norms(x, self.factor)
        # A NaN or infinite key would order nowhere, and no bound would hold for its row.
        if not (np.isfinite(self.xnorm).all() and np.isfinite(self.alpha_t).all()):
            raise ValueError("scoring needs finite features and α: the shard has NaN or infinite values")
        self.nonneg = bool(self.rows == 0 or np.min(x) >= 0)
        n_classes = self.alpha_t.shape[0]
        self.maxkey, a_max = np.zeros(n_classes), np.zeros(n_classes)
        # max_i |α_ij|·‖x_i‖ per class in float32, by blocks of classes (no (C × s) float64 copy),
        # then raised past what rounding took: the norms rounded up to float32, each product
        # within a factor 1 + 2⁻²³ of exact, plus what a product may lose to underflow.
        xn32 = np.nextafter(self.xnorm.astype(np.float32), np.float32(np.inf))
        step = max(1, (1 << 22) // max(1, self.rows))
        for a, b in row_blocks(n_classes, step):
            a_abs = np.abs(self.alpha_t[a:b])
            if self.rows:
                self.maxkey[a:b] = (a_abs * xn32).max(axis=1) * (1.0 + 2.0 ** -22) + TINY32
                a_max[a:b] = a_abs.max(axis=1)
        self.eta = (a_max * dim + 1.0) * TINY32

    def error(self, xt: np.ndarray, pred: np.ndarray, tnorm: Optional[np.ndarray] = None):
        """(rel, abs) per test row: every float32 product g of the row, in any summation order,
        is within rel·|g| + abs of its exact value.

        With non-negative features on both sides a dot product's error is relative to the dot
        product itself (γ·Σ|x_ik x_tk| = γ·x_i·x_t): rel = (f−1)/(2−f). Otherwise it is relative
        to the Cauchy–Schwarz bound: abs = (f−1)·max_i |α_ij|‖x_i‖·‖x_t‖.
        """
        if tnorm is None:
            tnorm = row_norms(xt, self.factor)
        f1 = self.factor - 1.0
        eta = self.eta[pred]
        if self.nonneg:
            pos = xt.min(axis=1) >= 0 if len(xt) else np.zeros(0, bool)
        else:
            pos = np.zeros(len(xt), bool)
        rel = np.where(pos, f1 / (1.0 - f1), 0.0)
        eabs = np.where(pos, eta, f1 * self.maxkey[pred] * tnorm + eta)
        return rel, eabs
