"""Streaming, sharded top-k against sorting whole rows of the full matrix."""

import numpy as np
import oracle
import pytest

from distributed_influence.method.scoring import score_shard
from distributed_influence.method.topk import merge_topk


def _exact_problem(seed, n=40, m=9, d=3, C=3):
    """Small-integer features and α in multiples of 1/8: float32 products are exact, ties abound."""
    rng = np.random.default_rng(seed)
    f = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    x = np.hstack([f, np.ones((n, 1), np.float32)])
    alpha = rng.integers(-3, 4, size=(n, C)) / 8.0
    xt = np.hstack([rng.integers(-2, 3, size=(m, d)).astype(np.float32), np.ones((m, 1), np.float32)])
    pred = rng.integers(0, C, size=m)
    ids = rng.permutation(np.arange(1000, 1000 + 3 * n, 3))  # not in row order
    return x, alpha, xt, pred, ids


def _sharded(x, alpha, xt, pred, ids, bounds, k, block, method="pruned"):
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        order = np.argsort(ids[a:b])
        parts.append(score_shard(x[a:b][order], ids[a:b][order], alpha[a:b][order], xt, pred, k, block,
                                 method=method, abs_sums=True))
    return parts


@pytest.mark.parametrize("bounds,k,block", [
    ([0, 40], 5, 4),            # one shard, several test blocks
    ([0, 3, 17, 40], 7, 2),     # k larger than a shard (3 rows) and than a test block
    ([0, 11, 12, 30, 40], 12, 100),
])
@pytest.mark.parametrize("method", ["pruned", "dense"])
def test_sharded_streaming_topk_equals_full_sort(bounds, k, block, method):
    x, alpha, xt, pred, ids = _exact_problem(seed=len(bounds) + k)
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt.astype(np.float64), pred)
    assert len(np.unique(r)) < r.size / 4  # the case really has many ties
    parts = _sharded(x, alpha, xt, pred, ids, bounds, k, block, method)
    for kind, largest in (("proponent", True), ("opponent", False)):
        vals, got_ids, got_alpha, got_sim = merge_topk(
            [p["topk"][kind]["values"] for p in parts], [p["topk"][kind]["ids"] for p in parts], k, largest,
            extras=[[p["topk"][kind]["alpha"] for p in parts], [p["topk"][kind]["similarity"] for p in parts]])
        ref_v, ref_i = oracle.sorted_topk(r, ids, k, largest)
        np.testing.assert_array_equal(got_ids, ref_i)
        np.testing.assert_allclose(vals, ref_v, rtol=1e-5, atol=1e-6)
        row = {i: n for n, i in enumerate(ids)}
        rows = np.vectorize(row.get)(got_ids)
        np.testing.assert_allclose(got_alpha, alpha[rows, pred[:, None]], rtol=1e-6)
        np.testing.assert_allclose(got_sim, np.einsum("tkd,td->tk", x[rows].astype(np.float64), xt), rtol=1e-6)
    # Per-train sums over all test examples.
    infl = np.concatenate([p["influence_sum"] for p in parts])
    absd = np.concatenate([p["influence_abs_sum"] for p in parts])
    sorted_ids = np.concatenate([np.sort(ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    col = {i: n for n, i in enumerate(ids)}
    cols = [col[i] for i in sorted_ids]
    np.testing.assert_allclose(infl, r.sum(axis=0)[cols], atol=1e-9)
    np.testing.assert_allclose(absd, np.abs(r).sum(axis=0)[cols], atol=1e-9)


def test_random_values_match_full_sort_to_1e5():
    rng = np.random.default_rng(5)
    n, m, d, C = 300, 25, 16, 5
    x = np.hstack([rng.normal(size=(n, d)), np.ones((n, 1))]).astype(np.float32)
    alpha = rng.normal(size=(n, C)) * 1e-3
    xt = np.hstack([rng.normal(size=(m, d)), np.ones((m, 1))]).astype(np.float32)
    pred = rng.integers(0, C, size=m)
    ids = np.arange(n)
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt.astype(np.float64), pred)
    parts = _sharded(x, alpha, xt, pred, ids, [0, 77, 150, 300], 10, 8)
    for kind, largest in (("proponent", True), ("opponent", False)):
        v, i = merge_topk([p["topk"][kind]["values"] for p in parts], [p["topk"][kind]["ids"] for p in parts], 10, largest)
        ref_v, ref_i = oracle.sorted_topk(r, ids, 10, largest)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(v, ref_v, rtol=1e-5)


def test_merge_refuses_k_beyond_candidates():
    with pytest.raises(ValueError):
        merge_topk([np.zeros((2, 2))], [np.zeros((2, 2), np.int64)], 3, True)


def test_score_shard_requires_rows_sorted_by_id():
    x, alpha, xt, pred, ids = _exact_problem(0)
    with pytest.raises(ValueError):
        score_shard(x, ids, alpha, xt, pred, 3, 4)


def test_nonnegative_features_use_the_closed_form_sums_and_match_the_full_matrix():
    """ReLU-like features: Σ_t |r| comes from per-class sums, not a pass over the values."""
    rng = np.random.default_rng(11)
    n, m, d, C = 200, 30, 12, 4
    x = np.hstack([np.abs(rng.normal(size=(n, d))), np.ones((n, 1))]).astype(np.float32)
    x[:, 3] = 0.0  # a dead unit
    alpha = rng.normal(size=(n, C)) * 1e-3
    xt = np.hstack([np.abs(rng.normal(size=(m, d))), np.ones((m, 1))]).astype(np.float32)
    pred = rng.integers(0, C, size=m)
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt.astype(np.float64), pred)
    parts = _sharded(x, alpha, xt, pred, np.arange(n), [0, 90, 200], 6, 7)
    np.testing.assert_allclose(np.concatenate([p["influence_sum"] for p in parts]), r.sum(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([p["influence_abs_sum"] for p in parts]), np.abs(r).sum(axis=0), rtol=1e-9)


@pytest.mark.parametrize("n", [1543, 1600])
def test_chunked_selection_on_a_large_shard_equals_full_sort_with_ties(n):
    """Shards of ≥ 8·k·64 rows take the two-level (chunk extremes) selection: still exact.

    1543 is prime, so its last chunk is padded; 1600 is cut into chunks of 64 without padding.
    """
    from distributed_influence.method.dense import TOPK_CHUNK, topk_chunk

    k = 3
    assert n >= 8 * k * TOPK_CHUNK
    assert (n % topk_chunk(n) != 0) == (n == 1543)
    x, alpha, xt, pred, ids = _exact_problem(seed=21, n=n, m=12)
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt.astype(np.float64), pred)
    assert len(np.unique(r)) < r.size / 20  # heavy ties
    parts = _sharded(x, alpha, xt, pred, ids, [0, n], k, 5, method="dense")
    for kind, largest in (("proponent", True), ("opponent", False)):
        vals, got = merge_topk([p["topk"][kind]["values"] for p in parts], [p["topk"][kind]["ids"] for p in parts],
                               k, largest)
        ref_v, ref_i = oracle.sorted_topk(r, ids, k, largest)
        np.testing.assert_array_equal(got, ref_i)
        np.testing.assert_allclose(vals, ref_v, rtol=1e-6)


@pytest.mark.parametrize("nonneg", [False, True])
def test_test_features_in_parts_score_like_one_array(nonneg):
    """Test features arrive as one part per worker that computed them, and are scored in place:
    blocks that straddle parts, and an empty part, change nothing (both |r| sum methods)."""
    x, alpha, xt, pred, ids = _exact_problem(seed=5, m=11)
    if nonneg:
        x, xt = np.abs(x), np.abs(xt)
    order = np.argsort(ids)
    whole = score_shard(x[order], ids[order], alpha[order], xt, pred, 4, 3, abs_sums=True)
    pieces = [xt[:2], xt[2:2], xt[2:7], xt[7:]]
    parted = score_shard(x[order], ids[order], alpha[order], pieces, pred, 4, 3, abs_sums=True)
    for kind in ("proponent", "opponent"):
        for field in ("values", "ids", "alpha", "similarity"):
            np.testing.assert_array_equal(parted["topk"][kind][field], whole["topk"][kind][field])
    for key in ("influence_sum", "influence_abs_sum"):
        np.testing.assert_allclose(parted[key], whole[key], rtol=1e-12, atol=1e-12)
