"""The exact finish shared by both scoring paths: from float32 candidates to the exact top-k.

Both paths find candidates with float32 matrix products, whose summation order follows the
shapes, so the same pair may differ in the last bits between them. The finish proves which
candidates belong to the top-k from intervals around each product (:meth:`~.pruning.Geometry.error`),
then scores the kept pairs again one by one with a summation order that depends only on d
(:func:`canonical_dots`) and orders them by (value, id). Why that is exact is argued in
:mod:`distributed_influence.method.scoring` and ``docs/method.md``.
"""

from __future__ import annotations

import numpy as np

#: (test, train) pairs per step of the canonical re-scoring: its float32 buffer of (pairs × (d+1)).
CANON_PAIRS = 40
#: Values per step of :func:`finish_all`: its (test rows × shard rows) block of float32 values,
#: with a few float64 and int64 arrays of that shape (about 40 MB in all).
FINISH_ELEMENTS = 1 << 20
#: Intervals are doubled (and a little) where computed values meet finished ones: the finished
#: values are float32 dot products too, within the same interval of the exact value.
TWICE = 2.01


def canonical_dots(x: np.ndarray, rows: np.ndarray, xt: np.ndarray) -> np.ndarray:
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


def select(val: np.ndarray, rows: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Positions of the top-k of each row by (value, row): ties to the smaller row (id)."""
    return np.lexsort((rows, -val if largest else val), axis=-1)[:, :k]


def _finished(x, alpha_t, xt, pred, cand, k, largest):
    """The kept candidates (b, K) re-scored canonically and ordered: (values, rows, dots) (b, k)."""
    dots = canonical_dots(x, cand, xt)
    val = alpha_t[pred[:, None], cand] * dots
    pick = select(val, cand, k, largest)
    return (np.take_along_axis(val, pick, 1), np.take_along_axis(cand, pick, 1),
            np.take_along_axis(dots, pick, 1))


def finish_exact(x, geo, xt, pred, cands, k: int, complete: bool):
    """The exact top-k from a path's float32 candidates, with values both paths agree on.

    Both paths keep k2 > k candidates per kind, best first by their float32 products g. Each g
    is within rel·|g| + abs of its exact value (:meth:`~.pruning.Geometry.error`).

    - Membership: when the intervals of the k-th and (k+1)-th candidates are disjoint, even
      doubled (the finish's own float32 values may be off as much again), the first k
      candidates are the top-k by exact and by finished values alike. Otherwise (ties or
      near-ties across the k-th place) all k2 candidates are kept, and the result is certain
      when the k2-th candidate's interval lies below the new k-th value; a row where even that
      fails (more than k2 rows within reach of the k-th place: an exact tie, say) is finished
      by :func:`finish_all`, against the whole shard.
    - Values and order: the kept rows are scored again pair by pair (:func:`canonical_dots`,
      then the float32 product with α) and ordered by (value, id). That does not depend on
      either path's matrix products, so both paths, and the merge of shards, compare the same
      numbers: the tables are equal bit for bit.

    Args:
        complete: the candidates are every row of the shard (it holds at most k2 rows): then
            nothing can be missing from them.

    Returns:
        ([(values, rows, similarity) for proponents, for opponents] each (b, k), rows finished
        against the whole shard, rows whose k2 candidates were re-scored).
    """
    b = len(xt)
    rel, eabs = geo.error(xt, pred)
    out, full, wide = [], np.zeros(b, bool), np.zeros(b, bool)
    for (gv, gr), largest in zip(cands, (True, False)):
        vals = np.empty((b, k), np.float32)
        rows = np.empty((b, k), np.int64)
        sims = np.empty((b, k), np.float32)
        g = gv.astype(np.float64)
        half = TWICE * (rel[:, None] * np.abs(g) + eabs[:, None])
        hi, lo = g + half, g - half
        if gv.shape[1] > k:
            certain = (lo[:, k - 1] > hi[:, k]) if largest else (hi[:, k - 1] < lo[:, k])
        else:
            certain = np.ones(b, bool)
        wide |= ~certain
        for sel, width in ((np.flatnonzero(certain), k), (np.flatnonzero(~certain), gv.shape[1])):
            if not len(sel):
                continue
            vals[sel], rows[sel], sims[sel] = _finished(x, geo.alpha_t, xt[sel], pred[sel], gr[sel, :width], k,
                                                        largest)
            if width > k and not complete:
                ck = vals[sel, -1].astype(np.float64)
                ok = (hi[sel, -1] < ck) if largest else (lo[sel, -1] > ck)
                full[sel[~ok]] = True
        out.append([vals, rows, sims])
    redo = np.flatnonzero(full)
    if len(redo):
        whole = finish_all(x, geo, xt[redo], pred[redo], k)
        for kind in range(2):
            for field in range(3):
                out[kind][field][redo] = whole[kind][field]
    return out, len(redo), int(wide.sum())


def finish_all(x, geo, xt, pred, k: int):
    """The exact top-k of test rows against every row of the shard, in one pass over it.

    For test rows whose candidates cannot certify the k-th place (an exact tie across it, say),
    and for shards the bound cannot prune (one the first scan blocks cover anyway). Each block
    of (test rows × shard) float32 values is computed once, by one matrix product, and finished
    by :func:`finish_values`.

    Returns:
        [(values, rows, similarity) for proponents, for opponents], each (b, k).
    """
    x32 = np.asarray(x, np.float32)

    def values(a, e):
        g = np.matmul(xt[a:e], x32.T)
        g *= geo.alpha_t[pred[a:e]]
        return g

    return finish_blocks(x, geo, xt, pred, k, np.arange(len(x)), values)


def finish_blocks(x, geo, xt, pred, k: int, cols: np.ndarray, values):
    """:func:`finish_values` over blocks of test rows (:func:`value_blocks`), the float32 values
    of rows [a, e) against the shard rows ``cols`` (all of them, any order) made by
    ``values(a, e)``; the lists put together.

    Returns:
        [(values, rows, similarity) for proponents, for opponents], each (b, k).
    """
    b = len(xt)
    out = [[np.empty((b, k), np.float32), np.empty((b, k), np.int64), np.empty((b, k), np.float32)]
           for _ in range(2)]
    for a, e in value_blocks(b, len(cols)):
        for kind, got in enumerate(finish_values(x, geo, xt[a:e], pred[a:e], values(a, e), cols, k)):
            for field in range(3):
                out[kind][field][a:e] = got[field]
    return [tuple(o) for o in out]


def value_blocks(b: int, s: int):
    """[start, stop) ranges of test rows whose (rows × s) values fit FINISH_ELEMENTS."""
    step = max(1, FINISH_ELEMENTS // max(1, s))
    return [(a, min(b, a + step)) for a in range(0, b, step)]


def finish_values(x, geo, xt, pred, g: np.ndarray, cols: np.ndarray, k: int):
    """The exact top-k from float32 values ``g`` (b, c) of every shard row, rows ``cols`` (c,).

    A training row can only enter the top-k when the top of its interval reaches the k-th
    largest bottom (for proponents; the mirror for opponents): every other row has k rows whose
    finished values are certainly larger, strictly. Only those rows are re-scored canonically,
    test rows grouped by how many they have, so that one row with many ties does not make the
    others re-score as many. Holds about five (b × c) arrays of 8 bytes at once.

    Returns:
        [(values, rows, similarity) for proponents, for opponents], each (b, k).
    """
    b, c = g.shape
    rel, eabs = geo.error(xt, pred)
    hi = np.abs(g, dtype=np.float64)
    hi *= TWICE * rel[:, None]
    hi += TWICE * eabs[:, None]  # the interval's half-width, then its top
    lo = g - hi
    hi += g
    done = []
    for largest in (True, False):
        # Proponents: rows whose top reaches the k-th largest bottom; opponents: rows whose
        # bottom reaches the k-th smallest top.
        if largest:
            kth = np.partition(lo, c - k, axis=1)[:, c - k].copy()
            reach = np.count_nonzero(hi >= kth[:, None], axis=1)
        else:
            kth = np.partition(hi, k - 1, axis=1)[:, k - 1].copy()
            reach = np.count_nonzero(lo <= kth[:, None], axis=1)
        out = [np.empty((b, k), np.float32), np.empty((b, k), np.int64), np.empty((b, k), np.float32)]
        for rows, width in _by_width(reach):
            if width >= c:
                pos = np.broadcast_to(np.arange(c), (len(rows), c))
            elif largest:
                pos = np.argpartition(hi[rows], c - width, axis=1)[:, c - width:]
            else:
                pos = np.argpartition(lo[rows], width - 1, axis=1)[:, :width]
            got = _finished(x, geo.alpha_t, xt[rows], pred[rows], np.ascontiguousarray(cols[pos]), k, largest)
            for field in range(3):
                out[field][rows] = got[field]
        done.append(tuple(out))
    return done


def _by_width(widths: np.ndarray):
    """(test rows, width) groups: rows whose widths lie within a factor of two, with the
    largest width of each group."""
    order = np.argsort(widths, kind="stable")
    w = widths[order]
    edges = np.flatnonzero(np.diff(np.floor(np.log2(np.maximum(w, 1))))) + 1
    for rows in np.split(order, edges):
        if len(rows):
            yield rows, int(widths[rows].max())
