"""The single-process engine end to end, against an independent float64 NumPy oracle."""

import os

import keras
import numpy as np
import oracle
import pyarrow.parquet as pq
import pytest

from distributed_influence.config import AuditConfig
from distributed_influence.engine.job import run_audit

LAM = 0.003
K = 5


def _oracle(files, target):
    model = keras.models.load_model(files["model"], safe_mode=True, compile=False)
    tr, te = np.load(files["train"]), np.load(files["test"])
    f_tr, z_tr, _ = model.predict(tr["x"], verbose=0)
    f_te, z_te, _ = model.predict(te["x"], verbose=0)
    x_tr, x_te = oracle.augment(f_tr), oracle.augment(f_te)
    W, b = model.get_layer("logits").get_weights()
    theta0 = np.vstack([W, b[None]]).astype(np.float64)
    C = W.shape[1]
    t = np.eye(C)[tr["y"]] if target == "labels" else oracle.softmax(z_tr.astype(np.float64))
    theta = oracle.newton_fit(x_tr, t, LAM, theta0)
    alpha = oracle.closed_form_alpha(x_tr, t, theta, LAM)
    pred = np.argmax(z_te, axis=1)
    r = oracle.representer_matrix(x_tr, alpha, x_te, pred)
    return dict(theta=theta, alpha=alpha, pred=pred, r=r, x_tr=x_tr, x_te=x_te, y=tr["y"], z_te=z_te, z_tr=z_tr)


@pytest.mark.parametrize("target,shards,reduce_rows", [("labels", 1, None), ("predictions", 1, None),
                                                       ("labels", 3, 7)])
def test_in_process_audit_matches_oracle(files, tmp_path, monkeypatch, target, shards, reduce_rows):
    """Also with 3 shards merged by 3 reduce ranges of 7, 7 and 6 test rows, read from partials
    whose row groups (of 3 rows) do not line up with the ranges."""
    from distributed_influence.engine import reduce as rd

    if reduce_rows:
        monkeypatch.setattr(rd, "REDUCE_ROWS", reduce_rows)
        monkeypatch.setattr(rd, "PARTIAL_GROUP", 3)
    out = str(tmp_path / "out")
    cfg = AuditConfig(model=files["model"], train=files["train"], test=files["test"], out=out,
                      k=K, lam=LAM, target=target, shards=shards)
    manifest = run_audit(cfg, use_ray=False)
    n_parts = 3 if reduce_rows else 1
    for name, parts in (("influence_topk", n_parts), ("test_scores", n_parts), ("train_scores", shards)):
        listed = [f"{name}/part-{i:05d}.parquet" for i in range(parts)]
        assert manifest["tables"][name] == listed
        assert sorted(os.listdir(os.path.join(out, name))) == [f.split("/")[1] for f in listed]
    assert sorted(os.listdir(out)) == ["index", "influence_topk", "manifest.json", "test_scores", "train_scores"]
    ref = _oracle(files, target)
    n = len(ref["y"])

    assert manifest["head_fit"]["max_abs_grad"] <= 1e-7
    assert manifest["decomposition"]["theta_residual"] <= 1e-4

    topk = pq.read_table(f"{out}/influence_topk").to_pydict()
    test = pq.read_table(f"{out}/test_scores").to_pydict()
    train = pq.read_table(f"{out}/train_scores").to_pydict()
    np.testing.assert_array_equal(test["test_id"], np.arange(20))  # parts in test-id order
    np.testing.assert_array_equal(train["train_id"], np.arange(n))

    # Top-k per test example equals sorting the full matrix.
    scale = np.abs(ref["r"]).max()
    for kind, largest in (("proponent", True), ("opponent", False)):
        ref_v, ref_i = oracle.sorted_topk(ref["r"], np.arange(n), K, largest)
        sel = np.array(topk["kind"]) == kind
        got_i = np.array(topk["train_id"])[sel].reshape(-1, K)
        got_v = np.array(topk["representer_value"])[sel].reshape(-1, K)
        np.testing.assert_array_equal(got_i, ref_i)
        np.testing.assert_allclose(got_v, ref_v, rtol=1e-4, atol=1e-5 * scale)
        got_a = np.array(topk["alpha"])[sel].reshape(-1, K)
        np.testing.assert_allclose(got_a, ref["alpha"][ref_i, ref["pred"][:, None]], rtol=1e-4, atol=1e-6 * np.abs(ref["alpha"]).max())
        got_s = np.array(topk["similarity"])[sel].reshape(-1, K)
        np.testing.assert_allclose(got_s, np.einsum("tkd,td->tk", ref["x_tr"][ref_i], ref["x_te"]), rtol=1e-4)

    # Decomposition: Σ_i r_ij(t) = z_tj, and it matches the brute-force sum.
    z = np.array(test["surrogate_logit"], dtype=np.float64)
    rep = np.array(test["representer_sum"], dtype=np.float64)
    assert np.all(np.abs(rep - z) <= 1e-4 * np.maximum(1, np.abs(z)))
    np.testing.assert_allclose(rep, ref["r"].sum(axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(z, np.einsum("td,dt->t", ref["x_te"], ref["theta"][:, ref["pred"]]), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(test["predicted_class"], ref["pred"])
    np.testing.assert_allclose(test["model_logit"], ref["z_te"][np.arange(len(z)), ref["pred"]], rtol=1e-5, atol=1e-5)

    # Label audit and per-train sums.
    a_lab = ref["alpha"][np.arange(n), ref["y"]]
    np.testing.assert_allclose(train["alpha_label"], a_lab, rtol=1e-4, atol=1e-6 * np.abs(a_lab).max())
    np.testing.assert_array_equal(np.argsort(train["audit_rank"]), np.argsort(-np.abs(a_lab), kind="stable"))
    np.testing.assert_allclose(train["influence_sum"], ref["r"].sum(axis=0), rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(train["influence_abs_sum"], np.abs(ref["r"]).sum(axis=0), rtol=1e-4)
    # The model's own view of each training example: its class, its probability of the label and
    # of that class.
    z_tr = ref["z_tr"].astype(np.float64)
    np.testing.assert_array_equal(train["predicted_class"], np.argmax(z_tr, axis=1))
    np.testing.assert_allclose(train["label_probability"], oracle.softmax(z_tr)[np.arange(n), ref["y"]],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(train["predicted_probability"], oracle.softmax(z_tr).max(axis=1), rtol=1e-5, atol=1e-7)



@pytest.fixture(scope="module")
def signed_files(data, tmp_path_factory):
    """A model whose penultimate features are tanh outputs: signed, like GELU or LayerNorm ones."""
    from conftest import sequential_activation_model

    x_tr, y_tr, x_te, y_te = data
    root = tmp_path_factory.mktemp("signed")
    model = sequential_activation_model(x_tr, y_tr)
    model.save(str(root / "model.keras"))
    np.savez(root / "train.npz", x=x_tr, y=y_tr)
    np.savez(root / "test.npz", x=x_te, y=y_te)
    return {"model": str(root / "model.keras"), "train": str(root / "train.npz"), "test": str(root / "test.npz")}


def test_signed_features_prune_and_leave_abs_sums_null_unless_asked(signed_files, tmp_path):
    """Signed features: by default influence_abs_sum is null (with the reason in the manifest)
    and scoring stays pruned; --abs-sums fills it from every pair. Both against brute force
    over the train index the audit wrote, and the top-k tables equal either way."""
    from distributed_influence.method import records
    from distributed_influence.store import index

    runs = {}
    for abs_sums in (False, True):
        out = str(tmp_path / f"abs{abs_sums}")
        cfg = AuditConfig(**signed_files, out=out, k=K, lam=LAM, shards=2, abs_sums=abs_sums)
        runs[abs_sums] = (out, run_audit(cfg, use_ray=False))
    out, m = runs[False]
    sc = m["scoring"]
    assert sc["method"] == "pruned" and sc["reason"] is None
    assert sc["influence_abs_sum"] == {"how": records.ABS_SKIPPED, "reason": records.ABS_SUM_SKIPPED}
    train = pq.read_table(f"{out}/train_scores")
    assert train.column("influence_abs_sum").null_count == train.num_rows
    assert train.column("influence_sum").null_count == 0
    out_abs, m_abs = runs[True]
    assert m_abs["scoring"]["method"] == "dense" and m_abs["scoring"]["reason"] == records.REASON_NEGATIVE
    assert m_abs["scoring"]["influence_abs_sum"] == {"how": records.ABS_PAIRS, "reason": None}
    assert m["run_key"] != m_abs["run_key"]  # --abs-sums changes a column: not resumed from the other
    assert pq.read_table(f"{out}/influence_topk").equals(pq.read_table(f"{out_abs}/influence_topk"))

    shards = [index.read_shard(p) for p in index.shard_files(f"{out}/index")]
    x = np.concatenate([s["x"] for s in shards]).astype(np.float64)
    alpha = np.concatenate([s["alpha"] for s in shards])
    assert x[:, :-1].min() < 0
    model = keras.models.load_model(signed_files["model"], safe_mode=True, compile=False)
    features = keras.Model(model.inputs, model.layers[0].output)
    x_te = oracle.augment(features.predict(np.load(signed_files["test"])["x"], verbose=0))
    pred = np.asarray(pq.read_table(f"{out}/test_scores").column("predicted_class"))
    r = oracle.representer_matrix(x, alpha, x_te, pred)
    got = pq.read_table(f"{out_abs}/train_scores").to_pydict()
    np.testing.assert_allclose(got["influence_abs_sum"], np.abs(r).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(train.column("influence_sum").to_numpy(), r.sum(axis=0), rtol=1e-4,
                               atol=1e-5 * np.abs(r).max())


def test_error_influence_is_the_sum_over_the_wrong_test_rows(files, tmp_path):
    """error_influence against a brute-force NumPy sum of r_ti over the test rows the model gets
    wrong, toward their (wrong) predicted class, from the α and features of the train index the
    audit wrote; and null, with the reason, when the test source has no labels."""
    from distributed_influence.method import records
    from distributed_influence.store import index

    out = str(tmp_path / "out")
    manifest = run_audit(AuditConfig(model=files["model"], train=files["train"], test=files["test"], out=out,
                                     k=K, lam=LAM, shards=2), use_ray=False)
    assert manifest["scoring"]["error_influence"] == {"how": records.ERR_CLOSED, "reason": None}
    shards = [index.read_shard(p) for p in index.shard_files(f"{out}/index")]
    x = np.concatenate([s["x"] for s in shards]).astype(np.float64)
    alpha = np.concatenate([s["alpha"] for s in shards])
    model = keras.models.load_model(files["model"], safe_mode=True, compile=False)
    te = np.load(files["test"])
    f_te, z_te, _ = model.predict(te["x"], verbose=0)
    pred = np.argmax(z_te, axis=1)
    wrong = te["y"] != pred
    assert 0 < wrong.sum() < len(wrong)  # both kinds of test rows: the sum must pick the wrong ones
    r = oracle.representer_matrix(x, alpha, oracle.augment(f_te), pred)
    want = r[wrong].sum(axis=0)
    got = pq.read_table(f"{out}/train_scores").column("error_influence").to_numpy()
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel <= 1e-6
    assert not np.allclose(got, r.sum(axis=0), rtol=1e-3)  # not influence_sum under another name

    unlabelled = str(tmp_path / "test_unlabelled.npz")
    np.savez(unlabelled, x=te["x"])
    out2 = str(tmp_path / "out2")
    manifest2 = run_audit(AuditConfig(model=files["model"], train=files["train"], test=unlabelled, out=out2,
                                      k=K, lam=LAM, shards=2), use_ray=False)
    assert manifest2["scoring"]["error_influence"] == {"how": records.ERR_NO_LABELS, "reason": records.ERR_SKIPPED}
    train2 = pq.read_table(f"{out2}/train_scores")
    assert train2.column("error_influence").null_count == train2.num_rows
    assert train2.column("influence_sum").null_count == 0
