"""The dense scoring path: every (test, train) pair, the reference that the pruned path equals.

One (test block × shard) matrix product per block, reduced on the spot to each test row's top-k
(proponents: largest values; opponents: smallest) and, when asked, per-train sums of |r|.
"""

from __future__ import annotations

import logging

import numpy as np

from distributed_influence.method.representer import RowParts, tf

log = logging.getLogger(__name__)

#: Chunk width of the dense path's two-level top-k.
TOPK_CHUNK = 64


def topk_chunk(n: int) -> int:
    """Chunk width for a row of n values: a divisor of n near TOPK_CHUNK when there is one
    (then the row is cut without a padded copy), else TOPK_CHUNK itself."""
    for width in sorted(range(TOPK_CHUNK // 2, 2 * TOPK_CHUNK + 1), key=lambda w: abs(w - TOPK_CHUNK)):
        if n % width == 0:
            return width
    return TOPK_CHUNK


def _chunks(r, chunk: int, pad: bool, fill: float):
    # ``pad`` is a Python bool (part of the trace's signature): a traced function relaxed to an
    # unknown row length must still reshape in place when the length is a multiple of chunk.
    b, s = tf.shape(r)[0], tf.shape(r)[1]
    if not pad:
        return tf.reshape(r, [b, -1, chunk])
    padded = tf.pad(r, [[0, 0], [0, (-s) % chunk]], constant_values=fill)
    return tf.reshape(padded, [b, -1, chunk])


def _top_k_by_chunks(r, k, chunk: int, pad: bool, largest: bool = True):
    """Exact top-k of each row (largest first, ties to the lower index) in two cheap passes.

    The row is cut into chunks; the k chunks with the largest maxima (ties: lower chunk) hold
    every element of the row's top-k, because an element outside them is beaten by the maxima
    of k chunks that come before it in (value desc, index asc) order. Taking the chunks back in
    index order keeps "ties to the lower index" in the final ``top_k`` over k·chunk candidates,
    instead of a heap pass over the whole row. ``largest=False`` gives the k smallest (smallest
    first) the same way, from chunk minima, without a negated copy of the row.
    """
    b = tf.shape(r)[0]
    sign = 1.0 if largest else -1.0
    chunks = _chunks(r, chunk, pad, float("-inf") if largest else float("inf"))
    extreme = tf.reduce_max(chunks, axis=2) if largest else -tf.reduce_min(chunks, axis=2)
    picked = tf.sort(tf.math.top_k(extreme, k=k).indices, axis=1)
    candidates = sign * tf.reshape(tf.gather(chunks, picked, batch_dims=1), [b, k * chunk])
    position = tf.reshape(picked[:, :, None] * chunk + tf.range(chunk)[None, None, :], [b, k * chunk])
    best = tf.math.top_k(candidates, k=k)
    return sign * best.values, tf.gather(position, best.indices, batch_dims=1)


def _top_k(r, k, chunk: int, pad: bool, largest: bool):
    if chunk:
        return _top_k_by_chunks(r, k, chunk, pad, largest)
    top = tf.math.top_k(r if largest else -r, k=k, sorted=True)
    return (top.values if largest else -top.values), top.indices


@tf.function(reduce_retracing=True, autograph=False)
def _score_block(xt, x, alpha_t, pred, k, with_abs, chunk, pad):
    # r[t, i] = α_{i, j_t} (x_i · x_t): one large matrix product, then an elementwise scale by
    # rows of αᵀ (C, s), gathered already in (test, train) order.
    r = tf.matmul(xt, x, transpose_b=True) * tf.gather(alpha_t, pred)
    top_v, top_i = _top_k(r, k, chunk, pad, True)
    bottom_v, bottom_i = _top_k(r, k, chunk, pad, False)
    abs_sum = tf.reduce_sum(tf.abs(r), axis=0) if with_abs else tf.zeros([0])
    return top_v, top_i, bottom_v, bottom_i, abs_sum


def score_block(xt, x, alpha_t, pred: np.ndarray, k: int, with_abs: bool = True):
    """Representer values of a shard for a block of test examples, reduced on the spot.

    The (b, s) matrix of values lives only inside this call: it is reduced to a per-test
    top-k (largest = proponents, smallest = opponents) and, when asked, per-train sums of
    |r|. Ties go to the lower row index, so rows must be sorted by id for "smaller id first".

    Args:
        xt: (b, d+1) float32 augmented test features.
        x: (s, d+1) float32 augmented shard features (array or resident tensor).
        alpha_t: αᵀ (C, s) float32 of the shard (array or resident tensor): its rows are
            gathered per test example.
        pred: (b,) int class j_t explained for each test example.
        k: entries kept per test example (≤ s).
        with_abs: also return Σ_t |r_ti| over the block.

    Returns:
        dict with ``top_values``/``top_index`` and ``bottom_values``/``bottom_index`` (b, k)
        and, with ``with_abs``, ``col_abs_sum`` (s,) float32.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    n = int(x.shape[0])
    # Chunked selection pays off once the shard holds many chunks per kept entry.
    chunk = topk_chunk(n) if n >= 8 * k * TOPK_CHUNK else 0
    tv, ti, bv, bi, cas = _score_block(
        tf.convert_to_tensor(xt, tf.float32), x, tf.convert_to_tensor(alpha_t, tf.float32),
        tf.constant(pred, tf.int64), tf.constant(k), bool(with_abs), chunk, bool(chunk and n % chunk),
    )
    out = {"top_values": tv.numpy(), "top_index": ti.numpy(),
           "bottom_values": bv.numpy(), "bottom_index": bi.numpy()}
    if with_abs:
        out["col_abs_sum"] = cas.numpy()
    return out


def score_dense(x_t, alpha_t, test_x: RowParts, test_pred, k, block, with_abs, put):
    """The dense path: every pair, ``block`` test rows at a time (halved on out-of-memory)."""
    m = len(test_x)
    col_abs = np.zeros(int(x_t.shape[0])) if with_abs else None
    b0 = 0
    while b0 < m:
        b1 = min(m, b0 + block)
        xt, pred = test_x.rows(b0, b1), test_pred[b0:b1]
        try:
            res = score_block(xt, x_t, alpha_t, pred, k, with_abs=with_abs)
        except tf.errors.ResourceExhaustedError:
            if block == 1:
                raise
            block = max(1, block // 2)  # the (block × shard) matrix did not fit: halve it
            log.warning("out of memory while scoring: test block now %d", block)
            continue
        if with_abs:
            col_abs += res["col_abs_sum"]
        put(np.arange(b0, b1), xt, pred, res["top_values"], res["top_index"],
            res["bottom_values"], res["bottom_index"])
        b0 = b1
    return col_abs, m * int(x_t.shape[0])
