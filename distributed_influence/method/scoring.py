"""Scoring a shard: the per-test top-k of representer values, dense or pruned (pure TF/NumPy).

r_i(t) = α_{i,j}(x_i·x_t), with j the class explained for test example t (docs/method.md, "Representer values").
Two paths give the same tables:

- **dense** (the reference): every (test, train) pair, one (test block × shard) matrix product
  per block, reduced on the spot to the top-k.
- **pruned** (the default): by Cauchy–Schwarz |r_i(t)| ≤ |α_{i,j}|·‖x_i‖·‖x_t‖. For each class j,
  the shard's rows are scanned in decreasing key |α_{i,j}|·‖x_i‖, block by block, against all
  test rows explaining j; a test row stops as soon as the next row's bound is strictly below both
  its k-th proponent value and its k-th opponent magnitude, because then no unscanned row can
  enter either list. Most training rows are fit well (tiny |α|), so a test row usually stops
  after a small fraction of the shard.

Exactness of the pruned path, in detail:

- The bound must hold for the *computed* float32 values, not only the exact ones. A float32 dot
  product of d+1 terms, in any summation order (FMA or not), is within γ_{d+1}·Σ|x_ik x_tk| ≤
  γ_{d+1}·‖x_i‖‖x_t‖ of the exact one (γ_n = n·u/(1−n·u), u = 2⁻²⁴; the sum of |products| is at
  most ‖x_i‖‖x_t‖ by Cauchy–Schwarz), and the product with α adds one more rounding. So the
  bound is inflated by the factor 1 + 2(d+3)·u ≥ (1+γ_{d+1})(1+u) (which also absorbs the float64
  rounding of the norms and keys), plus an absolute (|α|·(d+1)+1)·2⁻¹⁴⁹ for products that
  underflow. When TensorFloat-32 matrix products may run (a GPU with TF32 enabled, TensorFlow's
  default on Ampere), the inputs are rounded to 10-bit mantissas first: the factor grows by
  another 2⁻⁹.
- Until a test row has k values of a kind, that kind's threshold is −∞ (proponents) or +∞
  (opponents) and the row cannot stop; with fewer than k positive values among the scanned rows
  the k-th proponent value is ≤ 0 and the row cannot stop either (bounds are ≥ 0). So k larger
  than the number of positive values, or than the shard, simply scans further, to the end.
- Order, ties and values: float32 matrix products of the same pair differ between the paths
  (their summation order follows the shapes), so neither path orders or reports them. Both
  keep 2k candidates per kind; :func:`~.finish.finish_exact` proves the membership of the top-k from
  intervals around each product (or re-scores all 2k, or in the worst case finishes the row
  from one more matrix product over the whole shard, :func:`~.finish.finish_all`), then scores
  the kept pairs again one by one with a summation order that depends only on d
  (:func:`~.finish.canonical_dots`) and orders them by (value, id): ties go to the smaller id, and both
  paths (and the merge of shards) see the same numbers. The stop test subtracts twice the
  interval from the k-th values, so no unscanned row can reach or tie with them.

``influence_abs_sum`` (Σ_t |r_i(t)|) needs every pair unless all features are ≥ 0 (then it has a
closed form, like ``influence_sum`` always has). When features take negative values it is never
guessed: by default it is not computed (a null column, the reason in the ``scoring`` record) and
the shard is pruned; with ``abs_sums`` (``--abs-sums``) :func:`score_shard` scores that shard
densely instead, and says so (method ``dense`` with the reason).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from distributed_influence.method.dense import score_dense
from distributed_influence.method.finish import finish_exact
from distributed_influence.method.pruning import Geometry, score_pruned
from distributed_influence.method.records import (  # noqa: F401 - re-exported: the record's vocabulary
    ABS_CLOSED,
    ABS_NOT_ASKED,
    ABS_PAIRS,
    ABS_SKIPPED,
    ABS_SUM_SKIPPED,
    METHODS,
    REASON_NEGATIVE,
)
from distributed_influence.method.representer import (
    RowParts,
    block_train_sums,
    class_sums,
    linear_logits,
    row_blocks,
    tf,
)

log = logging.getLogger(__name__)

KINDS = ("proponent", "opponent")

#: Rows per block of the per-train sums: a block's (rows × C) float64 similarities stay small.
SUM_ROWS = 1024

#: Candidates kept per kind, as a multiple of k, for the exact finish (see :func:`~distributed_influence.method.finish.finish_exact`).
CANDIDATES = 2


def nonnegative(x: np.ndarray, test_x: RowParts) -> bool:
    """Whether every training and test feature is ≥ 0: then Σ_t |r| has a closed form."""
    return bool((len(x) == 0 or np.min(x) >= 0) and all(len(p) == 0 or np.min(p) >= 0 for p in test_x.parts))


def _train_sums(x: np.ndarray, alpha: np.ndarray, test_x: RowParts, test_pred: np.ndarray) -> dict:
    """The per-train sums that have a closed form: ``influence_sum`` always, and
    ``influence_abs_sum`` when every feature is non-negative (else it is left out).

    Σ_t r_ti = Σ_c α_ic (x_i · S_c) by linearity: the per-train sums need no pass over the
    (test × train) values (see :func:`~distributed_influence.method.representer.block_train_sums`).
    Workers get them from the α pass instead (``sums=``); this is the same arithmetic for a
    caller that has α only.
    """
    out = {"influence_sum": np.empty(len(x))}
    if nonnegative(x, test_x):
        out["influence_abs_sum"] = np.empty(len(x))
    s_t = class_sums(test_x, test_pred, alpha.shape[1]).T
    for a, b in row_blocks(len(x), SUM_ROWS):  # no (s × C) array of similarities at once
        block_train_sums(alpha[a:b], linear_logits(x[a:b], s_t), out, a)
    return out


def score_shard(x: np.ndarray, ids: np.ndarray, alpha: np.ndarray, test_x,
                test_pred: np.ndarray, k: int, block: int, x_tf=None, sums: Optional[dict] = None,
                method: str = "pruned", train_sums: bool = True, abs_sums: bool = False) -> dict:
    """Scores one shard against all test examples: per-test top-k and per-train sums.

    Nothing of size (test × shard) is kept: the dense path holds one (block × shard) matrix at a
    time, the pruned path one (block × candidate block), and where it scores rows against the
    whole shard (a shard of a few scan blocks, rows tied at the top, exact ties at the k-th
    place) blocks of at most ``finish.FINISH_ELEMENTS`` values. Rows must be sorted by id, so
    that ties go to the smaller id.

    Args:
        x: (s, d+1) float32 augmented features of the shard, rows sorted by id.
        ids: (s,) int64 training ids, ascending.
        alpha: (s, C) float64 α of the shard, or its :class:`~distributed_influence.method.pruning.Geometry`
            (then ``sums`` must be given when ``train_sums``): scoring reads α only in float32,
            so a caller that built the geometry can drop the float64 α (at C = 1,000 twice the
            size of the shard's features) before the scoring's own temporaries are allocated.
        test_x: (m, d+1) float32 augmented test features, as one array or a list of row parts
            (read in place, see :class:`~distributed_influence.method.representer.RowParts`).
        test_pred: (m,) class explained for each test example.
        k: entries kept per test example and kind (capped at the shard size).
        block: test examples per block; halved if a block runs out of device memory.
        x_tf: ``x`` as a resident tensor, if the caller keeps one (saves a copy per call).
        sums: the per-train sums of the closed form if already computed (``alpha_pass``, with
            ``influence_abs_sum`` exactly when :func:`nonnegative`), else computed here.
        method: ``pruned`` (default) or ``dense``; both give the same tables.
        train_sums: also compute ``influence_sum`` and, when it has a closed form (features ≥ 0),
            ``influence_abs_sum`` (``explain`` needs neither).
        abs_sums: with negative features, compute ``influence_abs_sum`` anyway, from every pair:
            a ``pruned`` request is then scored densely, and the ``scoring`` record says so.
            Without it the sum is left out (a null column), never approximated.

    Returns:
        dict with ``topk[kind]`` arrays ``values``, ``ids``, ``alpha``, ``similarity`` of shape
        (m, min(k, s)) for kind in proponent/opponent; with ``train_sums``, per-train
        ``influence_sum`` and (when computed) ``influence_abs_sum`` (s,) float64; and
        ``scoring``: the method used, ``pairs_scored`` (pairs whose value a matrix product
        computed, at most once per pair and pass), ``pairs_total`` (m·s), ``rows_rescored``
        (test rows whose 2k candidates were re-scored, near-ties at the k-th place),
        ``rows_finished_densely`` (of those, the rows scored against the whole shard, see
        :func:`~distributed_influence.method.finish.finish_exact`), ``reason`` (why dense, or
        ""), ``abs_sum`` (how ``influence_abs_sum`` was obtained: ABS_CLOSED, ABS_PAIRS,
        ABS_SKIPPED or ABS_NOT_ASKED) and ``seconds`` (of this call: the top-k scoring
        without α or the index).
    """
    if method not in METHODS:
        raise ValueError(f"scoring method must be one of {METHODS}, got {method!r}")
    t0 = time.perf_counter()
    if len(ids) > 1 and np.any(np.diff(ids) <= 0):
        raise ValueError("score_shard needs rows sorted by strictly increasing id")
    k = min(k, len(ids))
    test_x = test_x if isinstance(test_x, RowParts) else RowParts(test_x)
    m = len(test_x)
    if isinstance(alpha, Geometry):
        geo, alpha = alpha, None
        if train_sums and sums is None:
            raise ValueError("score_shard needs the per-train sums, or α in float64 to compute them")
    out = {} if not train_sums else dict(sums) if sums is not None else _train_sums(x, alpha, test_x, test_pred)
    abs_how = ABS_NOT_ASKED if not train_sums else ABS_CLOSED if "influence_abs_sum" in out else \
        ABS_PAIRS if abs_sums else ABS_SKIPPED
    reason = None
    if method == "pruned" and abs_how == ABS_PAIRS:
        method, reason = "dense", REASON_NEGATIVE
        log.info("scoring densely: %s", REASON_NEGATIVE)

    topk = {kind: {"values": np.empty((m, k), np.float32), "ids": np.empty((m, k), np.int64),
                   "alpha": np.empty((m, k), np.float32), "similarity": np.empty((m, k), np.float32)}
            for kind in KINDS}
    s = len(ids)
    k2 = min(s, CANDIDATES * k)  # candidates per kind for the exact finish
    if alpha is not None:
        geo = Geometry(x, alpha)
        del alpha  # the float32 αᵀ of the geometry is all that scoring reads
    # Test rows finished against the whole shard; whose 2k candidates were re-scored; of the
    # first, those finished so after a scan (a second pass over their pairs).
    redone = [0, 0, 0]

    def put(rows, pred, done, dense=False):
        if dense:
            redone[0] += len(rows)
        for kind, (vals, idx, dots) in zip(KINDS, done):
            o = topk[kind]
            o["values"][rows] = vals
            o["ids"][rows] = ids[idx]
            o["alpha"][rows] = geo.alpha_t[pred[:, None], idx]  # float32, as the column is
            o["similarity"][rows] = dots

    def finish(rows, xt, pred, top_v, top_i, bottom_v, bottom_i, complete=s <= k2):
        done, n_redo, n_rescored = finish_exact(x, geo, xt, pred, [(top_v, top_i), (bottom_v, bottom_i)], k,
                                                complete)
        redone[0] += n_redo
        redone[1] += n_rescored
        redone[2] += n_redo
        put(rows, pred, done)

    if s == 0:  # an empty shard: nothing to find (its lists have no columns)
        pairs = 0
    elif method == "dense":
        x_t = tf.convert_to_tensor(x if x_tf is None else x_tf, tf.float32)
        alpha_t = tf.constant(geo.alpha_t)  # (C, s): rows gathered per test row
        col_abs, pairs = score_dense(x_t, alpha_t, test_x, test_pred, k2, block, abs_how == ABS_PAIRS, finish)
        if abs_how == ABS_PAIRS:
            out["influence_abs_sum"] = col_abs
    else:
        # A resident tensor (a GPU worker's) is scanned where it lives; else the scan runs in
        # NumPy on the array itself, with no TensorFlow copy of the shard.
        x_scan = np.asarray(x, np.float32) if x_tf is None else x_tf
        pairs = score_pruned(x_scan, np.asarray(x, np.float32), geo, test_x, test_pred, k, k2, block, finish, put)
        # Rows finished against the whole shard after their scan were scored once more by a
        # matrix product (score_pruned counts the tied rows' pairs itself: scored once).
        pairs += redone[2] * s
    out["topk"] = topk
    out["scoring"] = {"method": method, "pairs_scored": int(pairs), "pairs_total": int(m * s),
                      "rows_finished_densely": int(redone[0]), "rows_rescored": int(redone[1]),
                      "reason": reason or "", "abs_sum": abs_how, "seconds": time.perf_counter() - t0}
    return out
