"""The pruned scoring path against the dense path and an independent NumPy oracle.

Adversarial cases for an early-stopping top-k: heavy ties, k beyond the positive values or the
shard, a class nobody asks about, a one-row shard, all-equal α, negative features, test rows
whose features are all zero, and training rows parallel to a test row (where the Cauchy–Schwarz
bound is reached and only the float32 margin keeps it safe). Exact cases use small integers and
α in multiples of 1/8, so float32 products are exact and the oracle's float64 order is the order.
"""

import numpy as np
import oracle
import pytest

from distributed_influence.config import AuditConfig
from distributed_influence.errors import ConfigError
from distributed_influence.method import pruning, scoring
from distributed_influence.method.representer import tf
from distributed_influence.method.topk import merge_topk

KINDS = (("proponent", True), ("opponent", False))


@pytest.fixture(autouse=True, params=["default blocks", "small blocks"])
def scan(request, monkeypatch):
    """Every case twice: with the shipped block sizes (these small shards are then scored
    densely once, as :data:`pruning.DENSE_BLOCKS` says) and with tiny scan blocks, so the scan
    runs many steps, extends its order prefix and stops rows mid-shard."""
    if request.param == "small blocks":
        monkeypatch.setattr(pruning, "FIRST_BLOCK", 3)
        monkeypatch.setattr(pruning, "MAX_BLOCK", 12)
        monkeypatch.setattr(pruning, "DENSE_BLOCKS", 0)
        monkeypatch.setattr(pruning, "PREFIX_GROWTH", 2)
        monkeypatch.setattr(pruning, "FINISH_ROWS", 7)
    return request.param


def _problem(seed, n=60, m=14, d=3, C=3, lo=-2, hi=3, dup=0):
    """Integer features (exact float32 products), α in eighths, ids not in row order."""
    rng = np.random.default_rng(seed)
    f = rng.integers(lo, hi, size=(n, d)).astype(np.float32)
    alpha = rng.integers(-3, 4, size=(n, C)) / 8.0
    if dup:  # duplicated rows with duplicated α: exact ties between different ids
        f[-dup:], alpha[-dup:] = f[:dup], alpha[:dup]
    x = np.hstack([f, np.ones((n, 1), np.float32)])
    xt = np.hstack([rng.integers(lo, hi, size=(m, d)).astype(np.float32), np.ones((m, 1), np.float32)])
    pred = rng.integers(0, C, size=m)
    ids = rng.permutation(np.arange(500, 500 + 7 * n, 7))
    order = np.argsort(ids)
    return x[order], alpha[order], xt, pred, ids[order]


def _both(x, alpha, xt, pred, ids, k, block=5, **kw):
    """Both methods; ``pruned_device`` is the pruned scan in TensorFlow on a resident tensor (a
    GPU worker's path; here on the CPU), ``pruned`` the NumPy scan of CPU workers."""
    kw.setdefault("train_sums", True)
    res = {method: scoring.score_shard(x, ids, alpha, xt, pred, k, block, method=method, **kw)
           for method in ("pruned", "dense")}
    res["pruned_device"] = scoring.score_shard(x, ids, alpha, xt, pred, k, block, method="pruned",
                                               x_tf=tf.constant(x), **kw)
    return res


def _check(x, alpha, xt, pred, ids, k, block=5, exact=True, **kw):
    """Pruned == dense (ids, order and values bit for bit) == the oracle's full sort.

    Without per-train sums by default: with negative features they would make pruned run dense.
    """
    kw.setdefault("train_sums", False)
    res = _both(x, alpha, xt, pred, ids, k, block, **kw)
    # (The scans' pair counts may differ: their float32 products may differ in the last bits.)
    assert res["pruned"]["scoring"]["method"] == res["pruned_device"]["scoring"]["method"] == "pruned"
    assert res["dense"]["scoring"]["pairs_scored"] == res["dense"]["scoring"]["pairs_total"]
    xt_all = np.concatenate(xt) if isinstance(xt, list) else xt
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt_all.astype(np.float64), pred)
    kk = min(k, len(ids))
    for kind, largest in KINDS:
        p, d = res["pruned"]["topk"][kind], res["dense"]["topk"][kind]
        for field in ("ids", "values", "alpha", "similarity"):
            np.testing.assert_array_equal(p[field], d[field], err_msg=f"{kind} {field}")
            np.testing.assert_array_equal(res["pruned_device"]["topk"][kind][field], d[field],
                                          err_msg=f"device scan: {kind} {field}")
        ref_v, ref_i = oracle.sorted_topk(r, ids, kk, largest)
        if exact:
            np.testing.assert_array_equal(p["ids"], ref_i, err_msg=kind)
        if exact:
            np.testing.assert_array_equal(p["values"], ref_v.astype(np.float32), err_msg=kind)
        else:  # float32 dot products (pairwise sums) and the rounding of α: a few units in the last place
            np.testing.assert_allclose(p["values"], ref_v, rtol=1e-6, atol=1e-30)
    return res, r


def test_heavy_ties_from_duplicated_rows_and_alpha(scan):
    x, alpha, xt, pred, ids = _problem(1, n=80, dup=30)
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt.astype(np.float64), pred)
    assert len(np.unique(r)) < r.size / 8
    res, _ = _check(x, alpha, xt, pred, ids, k=6)
    # Exact ties across the k-th place cannot be certified from candidates: finished densely.
    # (A small shard with the shipped blocks is scored once, densely, and finished from all pairs.)
    for method in ("pruned", "dense") if scan == "small blocks" else ("dense",):
        rec = res[method]["scoring"]
        assert rec["rows_rescored"] >= rec["rows_finished_densely"] > 0, rec
    for method in ("pruned", "dense"):
        rec = res[method]["scoring"]
        assert rec["pairs_scored"] <= rec["pairs_total"] + rec["rows_finished_densely"] * len(ids), rec
    if scan == "default blocks":
        assert res["pruned"]["scoring"]["pairs_scored"] == res["pruned"]["scoring"]["pairs_total"]


def test_rows_tied_at_the_top_are_scored_once_not_twice(scan):
    """An untrained backbone: every training row has (nearly) the same features and, per class,
    the same α, so thousands of rows tie at every test row's k-th place. Each pair is still
    scored at most once (no scan plus a second pass), and the lists equal brute force."""
    rng = np.random.default_rng(21)
    n, m, d, C = 3000, 12, 5, 3
    base = rng.integers(0, 3, size=d).astype(np.float32)
    x = np.hstack([np.tile(base, (n, 1)), np.ones((n, 1), np.float32)])
    x[::7, 0] += 1  # a few rows differ, so not every value is the same
    labels = rng.integers(0, C, size=n)
    alpha = np.where(np.eye(C)[labels] > 0, 2 / 8, -1 / 8)
    xt = np.hstack([rng.integers(0, 3, size=(m, d)), np.ones((m, 1))]).astype(np.float32)
    pred = rng.integers(0, C, size=m)
    res, _ = _check(x, alpha, xt, pred, np.arange(n), k=5, block=5)
    rec = res["pruned"]["scoring"]
    assert rec["pairs_scored"] <= rec["pairs_total"], rec


def test_k_larger_than_the_positive_values_scans_on():
    x, alpha, xt, pred, ids = _problem(2, n=50, lo=0)  # features ≥ 0: every similarity ≥ 1
    alpha[:] = -np.abs(alpha) - 1 / 8  # every α negative ...
    alpha[[3, 17], :] = 2 / 8  # ... but two: only two rows can be proponents with r > 0
    res, r = _check(x, alpha, xt, pred, ids, k=5)
    # Rank 3-5 proponents are ≤ 0 values: the row had to scan everything (nothing pruned), at
    # most plus the rows whose ties at the k-th place needed the whole shard once more.
    rec = res["pruned"]["scoring"]
    assert rec["pairs_total"] <= rec["pairs_scored"] <= rec["pairs_total"] + rec["rows_finished_densely"] * len(ids), rec


def test_a_class_without_test_rows_and_several_test_blocks():
    x, alpha, xt, pred, ids = _problem(3, n=70, m=23, C=4)
    pred = np.where(pred == 2, 0, pred)  # class 2 is nobody's prediction
    _check(x, alpha, xt, pred, ids, k=4, block=3)


def test_a_shard_of_one_row_and_k_beyond_the_shard():
    x, alpha, xt, pred, ids = _problem(4, n=1, m=9)
    res, _ = _check(x, alpha, xt, pred, ids, k=3)
    assert res["pruned"]["topk"]["proponent"]["ids"].shape == (9, 1)
    x, alpha, xt, pred, ids = _problem(5, n=12, m=9)
    res, _ = _check(x, alpha, xt, pred, ids, k=15)  # k ≥ shard size: capped, everything scanned
    assert res["pruned"]["topk"]["opponent"]["ids"].shape == (9, 12)
    assert res["pruned"]["scoring"]["pairs_scored"] == 9 * 12


def test_all_equal_alpha():
    x, alpha, xt, pred, ids = _problem(6, n=64, lo=0, hi=3)
    alpha[:] = 1 / 8
    _check(x, alpha, xt, pred, ids, k=5)
    alpha[:] = 0.0  # all values 0: ties everywhere, smaller ids first
    res, _ = _check(x, alpha, xt, pred, ids, k=5)
    np.testing.assert_array_equal(res["pruned"]["topk"]["proponent"]["ids"], np.broadcast_to(ids[:5], (len(xt), 5)))


def test_test_rows_with_zero_features():
    x, alpha, xt, pred, ids = _problem(7, n=40)
    xt[::2, :-1] = 0.0  # x_t = [0, ..., 0, 1]: r_i(t) = α_ij, ‖x_t‖ = 1
    _check(x, alpha, xt, pred, ids, k=4)


def test_negative_features_keep_pruning_and_leave_the_abs_sums_out():
    """Signed features: Σ_t |r| has no closed form. By default it is not computed (never
    guessed) and the shard is pruned; with ``abs_sums`` it comes from every pair, densely."""
    x, alpha, xt, pred, ids = _problem(8, n=50)
    assert x.min() < 0
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt.astype(np.float64), pred)
    res, _ = _check(x, alpha, xt, pred, ids, k=4, train_sums=True)
    for method in ("pruned", "dense"):
        assert "influence_abs_sum" not in res[method]
        assert res[method]["scoring"]["abs_sum"] == scoring.ABS_SKIPPED
        np.testing.assert_allclose(res[method]["influence_sum"], r.sum(axis=0), rtol=1e-9, atol=1e-12)
    assert res["pruned"]["scoring"]["method"] == "pruned" and res["pruned"]["scoring"]["reason"] == ""

    res = _both(x, alpha, xt, pred, ids, 4, abs_sums=True)
    rec = res["pruned"]["scoring"]
    assert rec["method"] == "dense" and rec["reason"] == scoring.REASON_NEGATIVE and rec["abs_sum"] == scoring.ABS_PAIRS
    for method in ("pruned", "dense"):
        np.testing.assert_allclose(res[method]["influence_abs_sum"], np.abs(r).sum(axis=0), rtol=1e-6)
        np.testing.assert_allclose(res[method]["influence_sum"], r.sum(axis=0), rtol=1e-9, atol=1e-12)
    # Without per-train sums (explain) nothing needs every pair: pruned stays pruned, and exact.
    res, _ = _check(x, alpha, xt, pred, ids, k=4, train_sums=False, abs_sums=True)
    assert "influence_abs_sum" not in res["pruned"] and res["pruned"]["scoring"]["abs_sum"] == scoring.ABS_NOT_ASKED


def test_nonnegative_features_keep_pruning_with_closed_form_abs_sums():
    x, alpha, xt, pred, ids = _problem(9, n=50, lo=0, hi=3)
    res, r = _check(x, alpha, xt, pred, ids, k=4, train_sums=True)
    np.testing.assert_allclose(res["pruned"]["influence_abs_sum"], np.abs(r).sum(axis=0), rtol=1e-9)
    assert res["pruned"]["scoring"]["abs_sum"] == scoring.ABS_CLOSED


def test_pruning_skips_rows_and_stays_exact_when_few_rows_are_hard():
    """Most α tiny, as for a well-fit model: most pairs are never scored, results unchanged."""
    rng = np.random.default_rng(10)
    n, m, d, C = 6000, 40, 16, 3
    x = np.hstack([np.abs(rng.normal(size=(n, d))), np.ones((n, 1))]).astype(np.float32)
    alpha = rng.normal(size=(n, C)) * 1e-6
    hard = rng.choice(n, 60, replace=False)
    alpha[hard] = rng.normal(size=(60, C)) * 1e-2
    xt = np.hstack([np.abs(rng.normal(size=(m, d))), np.ones((m, 1))]).astype(np.float32)
    pred = rng.integers(0, C, size=m)
    res, _ = _check(x, alpha, xt, pred, np.arange(n), k=5, block=16, exact=False)
    rec = res["pruned"]["scoring"]
    assert rec["pairs_total"] == m * n and rec["pairs_scored"] <= 0.15 * m * n, rec


def test_training_rows_parallel_to_a_test_row_reach_the_bound():
    """x_i = x_t: |r| equals the Cauchy–Schwarz bound, so only the float32 margin keeps the
    stop test safe when the computed product rounds up. Many such rows at distinct, close |α|."""
    rng = np.random.default_rng(11)
    d, m, C = 40, 6, 2
    xt = np.hstack([rng.random((m, d)), np.ones((m, 1))]).astype(np.float32)
    copies = np.repeat(xt, 50, axis=0)
    others = np.hstack([rng.random((300, d)), np.ones((300, 1))]).astype(np.float32)
    x = np.vstack([copies, others])
    alpha = (1 + rng.integers(0, 4, size=(len(x), C)) * 1e-7) * rng.choice([-1, 1], size=(len(x), C))
    pred = rng.integers(0, C, size=m)
    _check(x, alpha, xt, pred, np.arange(len(x)), k=7, block=4, exact=False)


def test_random_features_pruned_equals_dense_bit_for_bit():
    rng = np.random.default_rng(12)
    n, m, d, C = 3000, 50, 64, 5
    x = np.hstack([np.maximum(rng.normal(size=(n, d)), 0), np.ones((n, 1))]).astype(np.float32)
    alpha = rng.standard_t(2, size=(n, C)) * 1e-4
    xt = np.hstack([np.maximum(rng.normal(size=(m, d)), 0), np.ones((m, 1))]).astype(np.float32)
    pred = rng.integers(0, C, size=m)
    parts = [xt[:17], xt[17:17], xt[17:]]  # test features in parts, one empty
    _check(x, alpha, parts, pred, np.arange(n), k=10, block=8, exact=False)


def test_shards_merge_to_the_global_topk():
    x, alpha, xt, pred, ids = _problem(13, n=90, dup=20)
    r = oracle.representer_matrix(x.astype(np.float64), alpha, xt.astype(np.float64), pred)
    parts = [scoring.score_shard(x[a:b], ids[a:b], alpha[a:b], xt, pred, 6, 4, train_sums=False)
             for a, b in ((0, 1), (1, 40), (40, 90))]
    for kind, largest in KINDS:
        v, i = merge_topk([p["topk"][kind]["values"] for p in parts], [p["topk"][kind]["ids"] for p in parts],
                          6, largest)
        ref_v, ref_i = oracle.sorted_topk(r, ids, 6, largest)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(v, ref_v.astype(np.float32))


def test_the_margin_bounds_every_computed_value():
    """The inequality the stop test rests on, checked pair by pair on computed float32 values,
    including parallel rows and rows of very different scales."""
    import tensorflow as tf

    rng = np.random.default_rng(14)
    d = 200
    base = np.hstack([rng.random((20, d)), np.ones((20, 1))]).astype(np.float32)
    x = np.vstack([base, base * 3.7, np.hstack([rng.normal(size=(50, d)) * 1e3, np.ones((50, 1))])]).astype(np.float32)
    xt = np.vstack([base, np.hstack([rng.normal(size=(10, d)) * 1e-3, np.ones((10, 1))])]).astype(np.float32)
    a = np.float32(rng.normal(size=len(x)))
    r = (tf.matmul(xt, x, transpose_b=True) * a[None, :]).numpy().astype(np.float64)
    norm = lambda v: np.linalg.norm(v.astype(np.float64), axis=1)  # noqa: E731
    bound = (np.abs(a.astype(np.float64)) * norm(x))[None, :] * norm(xt)[:, None]
    factor = pruning.bound_factor(d + 1)
    assert np.all(np.abs(r) <= bound * factor)
    assert factor - 1 < 1e-4  # a margin, not a loophole
    # The norms the path uses are upper bounds of the exact ones.
    assert np.all(pruning.row_norms(x, factor) >= norm(x))


def test_unknown_method_and_unsorted_ids_are_refused():
    x, alpha, xt, pred, ids = _problem(15)
    with pytest.raises(ValueError, match="scoring method"):
        scoring.score_shard(x, ids, alpha, xt, pred, 3, 4, method="approximate")
    with pytest.raises(ValueError, match="sorted"):
        scoring.score_shard(x, ids[::-1].copy(), alpha, xt, pred, 3, 4)


def test_config_validates_scoring_and_keeps_it_out_of_the_digest():
    kw = dict(model="m.keras", train="a.npz", test="b.npz", out="o")
    assert AuditConfig(**kw).scoring == "pruned"
    assert AuditConfig(**kw, scoring="dense").digest() == AuditConfig(**kw).digest()
    with pytest.raises(ConfigError, match="--scoring"):
        AuditConfig(**kw, scoring="fast")


def test_audit_tables_pruned_equal_dense(files, reference, tmp_path):
    """The in-process job with --scoring dense writes exactly the default (pruned) tables."""
    import os

    import pyarrow.parquet as pq
    from conftest import audit_config

    from distributed_influence.engine.job import run_audit

    out = str(tmp_path / "dense")
    m = run_audit(audit_config(files, out, k=4, scoring="dense"), use_ray=False)
    assert m["scoring"]["method"] == "dense" and m["scoring"]["pairs_scored_fraction"] == 1.0
    ref = pq.read_table(_table(reference, "influence_topk"))
    import json

    with open(os.path.join(reference, "manifest.json")) as fh:
        assert json.load(fh)["scoring"]["method"] == "pruned"
    for name in ("influence_topk", "train_scores", "test_scores"):
        a, b = pq.read_table(_table(reference, name)), pq.read_table(_table(out, name))
        assert a.schema == b.schema and a.num_rows == b.num_rows
        for col in a.column_names:
            if col == "decomposition_error":
                continue
            x, y = a.column(col).to_numpy(zero_copy_only=False), b.column(col).to_numpy(zero_copy_only=False)
            np.testing.assert_array_equal(x, y, err_msg=f"{name}.{col}")
    assert ref.num_rows > 0


def _table(out, name):
    """A table as a Parquet dataset directory or, before the scale-out layout, one file."""
    import os

    path = os.path.join(out, name)
    return path if os.path.isdir(path) else path + ".parquet"
