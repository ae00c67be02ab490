"""Binary classifiers (one sigmoid output): the logistic surrogate against independent NumPy
oracles, both model shapes through the CLI, and the label audit on 10% flipped labels."""

import keras
import numpy as np
import oracle
import pyarrow.parquet as pq
import pytest
from conftest import blobs

from distributed_influence.cli import main
from distributed_influence.data.model import Featurizer, load_model, read_model_bytes, split_model
from distributed_influence.method import cpu_sums
from distributed_influence.method import logits as logits_mod
from distributed_influence.method import representer as rp
from distributed_influence.method.fit import fit_head

LAM = 0.003
K = 5
TEST_FLIPS = 6  # test labels flipped: predictions the model gets wrong, for error_influence
N_TRAIN, N_TEST = 200, 30


def fused_sigmoid_model(x, y):
    """Sequential, ending in Dense(1, activation="sigmoid")."""
    keras.utils.set_random_seed(7)
    m = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(8, activation="relu", name="hidden"),
                          keras.layers.Dense(1, activation="sigmoid")])
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    m.fit(x, y, epochs=20, batch_size=32, verbose=0)
    return m


def activation_sigmoid_model(x, y):
    """Functional, ending in Dense(1) followed by a sigmoid Activation."""
    keras.utils.set_random_seed(8)
    inp = keras.Input((x.shape[1],))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inp)
    z = keras.layers.Dense(1, name="logit")(h)
    m = keras.Model(inp, keras.layers.Activation("sigmoid")(z))
    m.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    m.fit(x, y, epochs=20, batch_size=32, verbose=0)
    return m


SHAPES = {"dense_sigmoid": fused_sigmoid_model, "dense_then_sigmoid": activation_sigmoid_model}


@pytest.fixture(scope="module")
def binary_data():
    """Two Gaussian blobs; 10% of the training labels flipped (the model is trained on them)."""
    x_tr, y_tr = blobs(N_TRAIN, seed=20, n_classes=2)
    x_te, y_te = blobs(N_TEST, seed=21, n_classes=2)
    flipped = np.sort(np.random.default_rng(3).choice(N_TRAIN, size=N_TRAIN // 10, replace=False))
    noisy = y_tr.copy()
    noisy[flipped] = 1 - noisy[flipped]
    return x_tr, noisy, x_te, y_te, flipped


@pytest.fixture(scope="module", params=sorted(SHAPES))
def binary_audit(request, binary_data, tmp_path_factory):
    """A real `.keras` binary model of each shape, audited through the CLI (in-process)."""
    x_tr, y_tr, x_te, y_te, flipped = binary_data
    root = tmp_path_factory.mktemp(request.param)
    model = SHAPES[request.param](x_tr, y_tr)
    paths = {"model": str(root / "m.keras"), "train": str(root / "train.npz"), "test": str(root / "test.npz"),
             "out": str(root / "out")}
    model.save(paths["model"])
    np.savez(paths["train"], x=x_tr, y=y_tr)
    # A few test labels the model (right on every test blob) then gets "wrong": error_influence
    # has test rows of both classes to sum.
    y_saved = y_te.copy()
    y_saved[:TEST_FLIPS] = 1 - y_saved[:TEST_FLIPS]
    np.savez(paths["test"], x=x_te, y=y_saved)
    code = main(["audit", "--model", paths["model"], "--train", paths["train"], "--test", paths["test"],
                 "--out", paths["out"], "--k", str(K), "--lam", str(LAM), "--in-process"])
    assert code == 0
    return paths


def test_both_shapes_split_into_features_and_one_logit(binary_audit, binary_data):
    x_tr = binary_data[0]
    loaded = load_model(read_model_bytes(binary_audit["model"]), "m.keras")
    split = split_model(loaded, name="m.keras")
    assert (split.binary, split.n_outputs, split.n_classes, split.feature_dim) == (True, 1, 2, 8)
    _feats, logits = Featurizer(split, batch_size=64)(x_tr)
    np.testing.assert_allclose(oracle.sigmoid(logits.astype(np.float64)), loaded.predict(x_tr, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_sigmoid_on_several_outputs_is_still_refused(tmp_path):
    from distributed_influence.errors import ModelError

    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="sigmoid")])
    path = str(tmp_path / "multilabel.keras")
    m.save(path)
    with pytest.raises(ModelError, match="no linear head"):
        split_model(load_model(read_model_bytes(path), "multilabel.keras"), name="multilabel.keras")


def test_logistic_math_against_numpy_oracle():
    """Objective, Hessian products, fit and α of a (d+1)×1 head against the closed forms."""
    rng = np.random.default_rng(5)
    n, d = 120, 7
    x = rp.augment(rng.normal(size=(n, d)).astype(np.float32))
    t = (rng.uniform(size=n) < 0.5).astype(np.float64)
    x64 = x.astype(np.float64)
    w0 = rng.normal(scale=0.3, size=(d + 1, 1))

    loss, grad = rp.objective_sums(x, t[:, None], w0)
    j, g = oracle.logistic_objective(x64, t, w0[:, 0], LAM)
    np.testing.assert_allclose(loss / n + LAM * np.sum(w0 ** 2), j, rtol=1e-12)
    np.testing.assert_allclose(grad[:, 0] / n + 2 * LAM * w0[:, 0], g, rtol=1e-10, atol=1e-14)

    p = oracle.sigmoid(x64 @ w0[:, 0])
    hess = (x64 * (p * (1 - p))[:, None]).T @ x64
    v = rng.normal(size=(d + 1, 1))
    np.testing.assert_allclose(rp.hvp_sums(x, w0, v), hess @ v, rtol=1e-10)
    vs = rng.normal(size=(d + 1, 1, 4))
    np.testing.assert_allclose(rp.hvp_sums(x, w0, vs)[:, 0, :], hess @ vs[:, 0, :], rtol=1e-10)
    # The NumPy sums of CPU workers: the same closed forms.
    loss_np, grad_np = cpu_sums.objective_sums(x, t[:, None], w0)
    np.testing.assert_allclose(loss_np / n + LAM * np.sum(w0 ** 2), j, rtol=1e-12)
    np.testing.assert_allclose(grad_np[:, 0] / n + 2 * LAM * w0[:, 0], g, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(cpu_sums.hvp_sums(x, w0, v), hess @ v, rtol=1e-10)
    np.testing.assert_allclose(cpu_sums.hvp_sums(x, w0, vs)[:, 0, :], hess @ vs[:, 0, :], rtol=1e-10)

    fit = fit_head(lambda th, prec: rp.objective_sums(x, t[:, None], th, prec),
                   lambda th, vv, prec: rp.hvp_sums(x, th, vv, prec), n, LAM, w0, tol=1e-11)
    w = oracle.logistic_newton_fit(x64, t, LAM)
    assert fit.converged and fit.max_abs_grad <= 1e-11
    np.testing.assert_allclose(fit.theta[:, 0], w, rtol=1e-7, atol=1e-9)

    alpha = rp.alpha_by_tape(x, fit.theta, t[:, None], LAM, n)
    assert alpha.shape == (n, 1)
    np.testing.assert_allclose(alpha[:, 0], oracle.closed_form_binary_alpha(x64, t, w, LAM), rtol=1e-6, atol=1e-12)
    # Θ = Σ_i x_iᵀ α_i at the stationary point: the exact decomposition for z and for −z.
    np.testing.assert_allclose(x64.T @ alpha, fit.theta, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(logits_mod.per_class(alpha), np.hstack([-alpha, alpha]))


def _oracle(paths, binary_data):
    """Features from the Keras model's own layers; everything else in float64 NumPy."""
    x_tr, y_tr, x_te, _y_te, _ = binary_data
    model = keras.models.load_model(paths["model"], safe_mode=True, compile=False)
    hidden = keras.Model(model.inputs[0], model.get_layer("hidden").output)
    head = next(layer for layer in model.layers if isinstance(layer, keras.layers.Dense) and layer.units == 1)
    W, b = head.get_weights()
    f_tr, f_te = hidden.predict(x_tr, verbose=0), hidden.predict(x_te, verbose=0)
    xa_tr, xa_te = oracle.augment(f_tr), oracle.augment(f_te)
    z_tr = (f_tr.astype(np.float64) @ W + b)[:, 0]
    z_te = (f_te.astype(np.float64) @ W + b)[:, 0]
    w = oracle.logistic_newton_fit(xa_tr, y_tr.astype(np.float64), LAM)
    alpha = oracle.closed_form_binary_alpha(xa_tr, y_tr.astype(np.float64), w, LAM)
    alpha2 = np.stack([-alpha, alpha], axis=1)  # class 0 explains −z, class 1 explains z
    pred = (z_te > 0).astype(np.int64)
    r = oracle.representer_matrix(xa_tr, alpha2, xa_te, pred)
    return dict(w=w, alpha2=alpha2, pred=pred, r=r, xa_te=xa_te, z_tr=z_tr, z_te=z_te, y=y_tr)


def test_binary_audit_tables_match_oracle(binary_audit, binary_data):
    out = binary_audit["out"]
    ref = _oracle(binary_audit, binary_data)
    n = N_TRAIN
    topk = pq.read_table(f"{out}/influence_topk").to_pydict()
    test = pq.read_table(f"{out}/test_scores").to_pydict()
    train = pq.read_table(f"{out}/train_scores").to_pydict()

    scale = np.abs(ref["r"]).max()
    for kind, largest in (("proponent", True), ("opponent", False)):
        ref_v, ref_i = oracle.sorted_topk(ref["r"], np.arange(n), K, largest)
        sel = np.array(topk["kind"]) == kind
        np.testing.assert_array_equal(np.array(topk["train_id"])[sel].reshape(-1, K), ref_i)
        np.testing.assert_allclose(np.array(topk["representer_value"])[sel].reshape(-1, K), ref_v,
                                   rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(np.array(topk["alpha"])[sel].reshape(-1, K),
                                   ref["alpha2"][ref_i, ref["pred"][:, None]], rtol=1e-4,
                                   atol=1e-6 * np.abs(ref["alpha2"]).max())

    # The explained logit is z for class 1 and −z for class 0; Σ_i r_i(t) equals it.
    sign = np.where(ref["pred"] == 1, 1.0, -1.0)
    np.testing.assert_array_equal(test["predicted_class"], ref["pred"])
    assert set(ref["pred"]) == {0, 1}
    z = np.array(test["surrogate_logit"], dtype=np.float64)
    np.testing.assert_allclose(z, sign * (ref["xa_te"] @ ref["w"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(test["model_logit"], sign * ref["z_te"], rtol=1e-5, atol=1e-5)
    rep = np.array(test["representer_sum"], dtype=np.float64)
    assert np.all(np.abs(rep - z) <= 1e-6 * np.maximum(1.0, np.abs(z)))
    np.testing.assert_allclose(rep, ref["r"].sum(axis=1), rtol=1e-4, atol=1e-4)
    import json

    manifest = json.load(open(f"{out}/manifest.json"))
    assert manifest["n_classes"] == 2 and manifest["decomposition"]["max_relative_error"] <= 1e-6

    # Label audit: α_{i,y_i} = ±α_i, |α_i| = |σ(z_i) − y_i|/(2λn); the model's own view of each row.
    a_lab = ref["alpha2"][np.arange(n), ref["y"]]
    np.testing.assert_allclose(train["alpha_label"], a_lab, rtol=1e-4, atol=1e-6 * np.abs(a_lab).max())
    np.testing.assert_array_equal(np.argsort(train["audit_rank"]), np.argsort(-np.abs(a_lab), kind="stable"))
    np.testing.assert_array_equal(train["predicted_class"], (ref["z_tr"] > 0).astype(int))
    p1 = oracle.sigmoid(ref["z_tr"])
    np.testing.assert_allclose(train["label_probability"], np.where(ref["y"] == 1, p1, 1 - p1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(train["predicted_probability"], np.maximum(p1, 1 - p1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(train["influence_sum"], ref["r"].sum(axis=0), rtol=1e-4, atol=1e-5 * scale)
    # error_influence: the rows of r of the test examples the model gets wrong, each at its
    # predicted class (−α for class 0, α for class 1).
    wrong = np.asarray(test["label"]) != ref["pred"]
    assert 0 < wrong.sum() < len(wrong) and len(set(ref["pred"][wrong])) == 2
    np.testing.assert_allclose(train["error_influence"], ref["r"][wrong].sum(axis=0), rtol=1e-4, atol=1e-5 * scale)


def test_binary_label_audit_finds_flipped_labels(binary_audit, binary_data):
    flipped = binary_data[4]
    train = pq.read_table(f"{binary_audit['out']}/train_scores").to_pydict()
    ranks = np.asarray(train["audit_rank"])[np.isin(train["train_id"], flipped)]
    found = np.mean(ranks <= 0.2 * N_TRAIN)
    assert found >= 0.8, f"only {found:.0%} of the flipped labels in the top 20%"


def test_binary_report_reviews_the_flipped_labels(binary_audit, binary_data, tmp_path):
    """The label review of a binary audit: a table (flat data), both classes counted, the
    flipped labels at the top of suspects.csv."""
    import os
    import re
    import shutil

    from distributed_influence.report import gallery
    from distributed_influence.report.page import write_report

    flipped = binary_data[4]
    out = str(tmp_path / "out")
    shutil.copytree(binary_audit["out"], out)
    known = tmp_path / "flipped.txt"
    known.write_text(" ".join(map(str, flipped)))
    page = write_report(out, known_bad=str(known), n_examples=2, n_review=20)
    text = open(page, encoding="utf-8").read()
    data = gallery.read_review_data(os.path.join(out, "report", gallery.DATA_JS))
    assert len(data["suspects"]) == 20 and data["thumbs"] is None  # flat data: a table
    assert data["n_classes"] == 2 and {s["label"] for s in data["suspects"]} <= {0, 1}
    assert re.search(r"<tr[^>]*><td>0</td><td>\d+</td>", text) and re.search(r"<tr[^>]*><td>1</td><td>\d+</td>", text)
    rows = [line.split(",") for line in open(f"{out}/report/suspects.csv").read().splitlines()[1:]]
    assert len(rows) == 20  # max(20 reviewed, 10% of 200)
    assert np.mean(np.isin([int(r[0]) for r in rows], flipped)) >= 0.8
    assert all(int(r[2]) != int(r[1]) for r in rows[:10])  # the model disagrees with the top suspects


def test_binary_explain_equals_the_audit(binary_audit, tmp_path):
    """New test examples explained from the binary audit's train index give the audit's tables."""
    from distributed_influence.engine.explain import run_explain

    out = str(tmp_path / "explained")
    run_explain(binary_audit["out"], binary_audit["model"], binary_audit["test"], out)
    for name in ("influence_topk", "test_scores"):
        a = pq.read_table(f"{binary_audit['out']}/{name}")
        b = pq.read_table(f"{out}/{name}")
        assert a.column_names == b.column_names and a.num_rows == b.num_rows
        for col in a.column_names:
            x, y = a.column(col).to_numpy(zero_copy_only=False), b.column(col).to_numpy(zero_copy_only=False)
            if col == "decomposition_error":
                assert np.all(y <= 1e-5)
            elif x.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=f"{name}:{col}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{name}:{col}")
