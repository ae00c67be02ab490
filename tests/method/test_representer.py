"""The math of docs/method.md against closed forms, finite differences and an explicit Newton fit."""

import numpy as np
import oracle
import pytest
import tensorflow as tf

from distributed_influence.method import cpu_sums
from distributed_influence.method import logits as logits_mod
from distributed_influence.method import representer as rp
from distributed_influence.method.fit import fit_head

LAM = 0.003
#: The fit's sums: TensorFlow (GPU workers) and NumPy (CPU workers), one formula, both checked.
SUMS = [pytest.param(rp, id="tensorflow"), pytest.param(cpu_sums, id="numpy")]


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(7)
    n, d, C = 80, 5, 4
    f = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, C, size=n)
    theta0 = rng.normal(scale=0.3, size=(d + 1, C))
    return rp.augment(f), labels, theta0


@pytest.mark.parametrize("target", ["labels", "predictions"])
def test_alpha_by_tape_equals_closed_form(problem, target):
    x, labels, theta = problem
    C = theta.shape[1]
    t = rp.one_hot(labels, C) if target == "labels" else oracle.softmax(x.astype(np.float64) @ (theta * 0.7))
    alpha = rp.alpha_by_tape(x, theta, t, LAM, len(x))
    expected = oracle.closed_form_alpha(x.astype(np.float64), t, theta, LAM)
    rel = np.abs(alpha - expected).max() / np.abs(expected).max()
    assert rel <= 1e-6
    # Elementwise too, where the value is not tiny.
    big = np.abs(expected) > 1e-3 * np.abs(expected).max()
    assert np.all(np.abs(alpha - expected)[big] <= 1e-6 * np.abs(expected)[big])


def test_gradient_of_a_slice_is_none_but_alpha_of_that_class_is_right(problem):
    """The bug this project exists for: the slice is made after the loss, off its path."""
    x, labels, theta = problem
    C = theta.shape[1]
    t = rp.one_hot(labels, C)
    j = 2
    x64 = tf.constant(x, tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        logits = tf.matmul(x64, tf.constant(theta))
        tape.watch(logits)
        loss = tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=t, logits=logits))
    assert tape.gradient(loss, logits[:, j]) is None
    alpha = rp.alpha_by_tape(x, theta, t, LAM, len(x))
    expected = oracle.closed_form_alpha(x.astype(np.float64), t, theta, LAM)[:, j]
    np.testing.assert_allclose(alpha[:, j], expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("sums", SUMS)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_objective_sums_match_finite_differences(problem, sums, precision):
    x, labels, theta = problem
    t = rp.one_hot(labels, theta.shape[1])
    loss, grad = sums.objective_sums(x, t, theta, precision)
    rel, atol = (1e-12, 1e-8) if precision == "float64" else (1e-6, 1e-6)
    x64 = x.astype(np.float64)
    j_ref, _ = oracle.objective(x64, t, theta, 0.0)
    assert loss == pytest.approx(j_ref * len(x), rel=rel)
    eps = 1e-6
    num = np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[idx] = eps
        num[idx] = (oracle.objective(x64, t, theta + e, 0.0)[0] - oracle.objective(x64, t, theta - e, 0.0)[0]) / (2 * eps)
    np.testing.assert_allclose(grad / len(x), num, atol=atol)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_numpy_sums_with_many_classes_and_blocks_match_the_oracle(monkeypatch, precision):
    """≥ 8 classes take the transposed float64 product, and 30-row blocks the reused cast buffer
    (with a ragged last block): loss and gradient still equal the explicit formula."""
    monkeypatch.setattr(cpu_sums, "ROWS", 30)
    rng = np.random.default_rng(11)
    x = rp.augment(rng.normal(size=(95, 6)).astype(np.float32))
    t = rp.one_hot(rng.integers(0, 12, size=95), 12)
    theta = rng.normal(scale=0.4, size=(7, 12))
    j_ref, g_ref = oracle.objective(x.astype(np.float64), t, theta, 0.0)
    loss, grad = cpu_sums.objective_sums(x, t, theta, precision)
    rel = 1e-12 if precision == "float64" else 1e-5
    assert loss == pytest.approx(j_ref * len(x), rel=rel)
    np.testing.assert_allclose(grad, g_ref * len(x), rtol=rel, atol=rel)
    probs = np.concatenate(cpu_sums.softmax_blocks(x, theta, precision))
    z = x.astype(np.float64) @ theta
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, expected / expected.sum(axis=1, keepdims=True), rtol=rel, atol=rel)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("classes", [1, 3, 12])
def test_objective_with_probs_is_the_two_separate_calls_bit_for_bit(monkeypatch, precision, classes):
    """The fit keeps an evaluation's softmax(XΘ) for the Hessian products at that Θ: it must be
    exactly what those products would have computed, and the sums exactly the plain ones."""
    monkeypatch.setattr(cpu_sums, "ROWS", 30)
    rng = np.random.default_rng(5)
    x = rp.augment(rng.normal(size=(95, 6)).astype(np.float32))
    labels = rng.integers(0, max(2, classes), size=95)
    t = labels[:, None].astype(np.float64) if classes == 1 else rp.one_hot(labels, classes)
    theta = rng.normal(scale=0.4, size=(7, classes))
    loss, grad, probs = cpu_sums.objective_sums_and_probs(x, t, theta, precision)
    loss_ref, grad_ref = cpu_sums.objective_sums(x, t, theta, precision)
    assert loss == loss_ref
    np.testing.assert_array_equal(grad, grad_ref)
    ref = cpu_sums.softmax_blocks(x, theta, precision)
    assert [len(p) for p in probs] == [len(p) for p in ref] == [30, 30, 30, 5]
    for p, r in zip(probs, ref):
        np.testing.assert_array_equal(p, r)


@pytest.mark.parametrize("sums", SUMS)
def test_hvp_matches_gradient_differences(problem, sums):
    x, labels, theta = problem
    t = rp.one_hot(labels, theta.shape[1])
    v = np.random.default_rng(3).normal(size=theta.shape)
    eps = 1e-5
    gp = oracle.objective(x.astype(np.float64), t, theta + eps * v, 0.0)[1] * len(x)
    gm = oracle.objective(x.astype(np.float64), t, theta - eps * v, 0.0)[1] * len(x)
    np.testing.assert_allclose(sums.hvp_sums(x, theta, v), (gp - gm) / (2 * eps), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sums, block", [pytest.param(rp, "ROW_BLOCK", id="tensorflow"),
                                         pytest.param(cpu_sums, "ROWS", id="numpy")])
def test_objective_sums_add_over_row_splits(problem, monkeypatch, sums, block):
    x, labels, theta = problem
    monkeypatch.setattr(sums, block, 30)  # the float64 sums run in row blocks inside too
    t = rp.one_hot(labels, theta.shape[1])
    whole = sums.objective_sums(x, t, theta)
    parts = [sums.objective_sums(x[a:b], t[a:b], theta) for a, b in ((0, 13), (13, 50), (50, 80))]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-12)
    np.testing.assert_allclose(sum(p[1] for p in parts), whole[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target", ["labels", "predictions"])
def test_fit_reaches_stationary_point_and_theta_is_sum_of_alphas(problem, target):
    x, labels, theta0 = problem
    C = theta0.shape[1]
    t = rp.one_hot(labels, C) if target == "labels" else oracle.softmax(x.astype(np.float64) @ theta0)
    res = fit_head(lambda th, prec: rp.objective_sums(x, t, th, prec),
                   lambda th, v, prec: rp.hvp_sums(x, th, v, prec), len(x), LAM, theta0, tol=1e-10)
    assert res.converged and res.max_abs_grad <= 1e-7
    # The stationary point of an independent explicit-Hessian Newton fit.
    ref = oracle.newton_fit(x.astype(np.float64), t, LAM, theta0)
    np.testing.assert_allclose(res.theta, ref, atol=1e-7)
    alpha = rp.alpha_by_tape(x, res.theta, t, LAM, len(x))
    recon = x.astype(np.float64).T @ alpha
    assert np.abs(res.theta - recon).max() / np.abs(res.theta).max() <= 1e-4
    # x_t · Σ_i x_iᵀ α_i equals the surrogate logit for any point.
    xt = rp.augment(np.random.default_rng(9).normal(size=(10, x.shape[1] - 1)))
    z = xt.astype(np.float64) @ res.theta
    s = xt.astype(np.float64) @ recon
    assert np.all(np.abs(s - z) <= 1e-4 * np.maximum(1, np.abs(z)))


def test_fidelity_moments_give_pearson_and_mean_abs(problem):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 3))
    b = a + rng.normal(scale=0.1, size=a.shape)
    m = logits_mod.fidelity_moments(a[:10], b[:10]) + logits_mod.fidelity_moments(a[10:], b[10:])
    fid = logits_mod.fidelity_from_moments(m)
    assert fid["pearson"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], rel=1e-10)
    assert fid["mean_abs_diff"] == pytest.approx(np.mean(np.abs(a - b)), rel=1e-12)


def test_alpha_pass_gives_alpha_head_and_per_train_sums_in_float64(problem, monkeypatch):
    x, labels, theta = problem
    monkeypatch.setattr(rp, "CAST_BLOCK", 30)  # several row blocks (the pass casts CAST_BLOCK rows at a time)
    monkeypatch.setattr(rp, "ROW_BLOCK", 45)  # and several tapes, across the cast blocks' edges
    C = theta.shape[1]
    t = rp.one_hot(labels, C)
    sums = np.random.default_rng(4).normal(size=(C, x.shape[1]))
    alpha, head, train = rp.alpha_pass(x, theta, t, LAM, len(x), sums, abs_sums=True)
    x64 = x.astype(np.float64)
    expected = oracle.closed_form_alpha(x64, t, theta, LAM)
    np.testing.assert_allclose(alpha, expected, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(head, x64.T @ expected, rtol=1e-9, atol=1e-12)
    sims = x64 @ sums.T  # x_i·S_c: Σ_t r_ti = Σ_c α_ic (x_i·S_c), and |α| for the abs form
    np.testing.assert_allclose(train["influence_sum"], np.sum(expected * sims, axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(train["influence_abs_sum"], np.sum(np.abs(expected) * sims, axis=1), rtol=1e-9,
                               atol=1e-12)
    assert "influence_abs_sum" not in rp.alpha_pass(x, theta, t, LAM, len(x), sums)[2]
    # error_influence: the same closed form on E_c, computed in the same product as S_c's.
    errors = np.random.default_rng(5).normal(size=(C, x.shape[1]))
    both = rp.alpha_pass(x, theta, t, LAM, len(x), sums, error_sums=errors)[2]
    np.testing.assert_allclose(both["error_influence"], np.sum(expected * (x64 @ errors.T), axis=1), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_array_equal(both["influence_sum"], train["influence_sum"])


def test_class_sums_leave_out_negative_classes():
    """E_c sums only the wrongly predicted rows (class ≥ 0); −1 marks the right ones."""
    from distributed_influence.method.logits import error_classes

    rng = np.random.default_rng(6)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    labels, pred = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2]), np.array([0, 2, 2, 1, 1, 0, 1, 1, 2])
    cls = error_classes(labels, pred)
    np.testing.assert_array_equal(cls, [-1, 2, -1, 1, -1, 0, 1, -1, -1])
    assert error_classes(None, pred) is None
    want = np.zeros((3, 4))
    for row, c in zip(x.astype(np.float64), cls):
        if c >= 0:
            want[c] += row
    np.testing.assert_allclose(rp.class_sums([x[:4], x[4:]], cls, 3), want, rtol=1e-12)


def test_a_float32_evaluation_serves_the_next_hessian_products_of_its_shard(monkeypatch):
    """The worker keeps an accepted point's softmax(XΘ) from its float32 evaluation: the Hessian
    products there compute none of their own, and give what they would have given without it."""
    from distributed_influence.engine.plan import ShardSpec
    from distributed_influence.engine.shard import ShardData, ShardWorker

    rng = np.random.default_rng(2)
    x = rp.augment(rng.normal(size=(70, 5)).astype(np.float32))
    labels = rng.integers(0, 3, size=70)
    logits = rng.normal(size=(70, 3)).astype(np.float32)
    worker = ShardWorker(b"", None)  # objective and hvp read only the shard's data
    worker._shards[0] = ShardData(x, logits, labels, np.arange(70), rp.RowTargets(labels, logits, "labels"))
    spec = ShardSpec(0, 0, 70)
    theta = rng.normal(scale=0.3, size=(6, 3)).astype(np.float32)
    v = rng.normal(size=(6, 3)).astype(np.float32)
    expected = cpu_sums.hvp_sums(x, theta, v, "float32")  # computes its own softmax
    calls = []
    real = cpu_sums.softmax_blocks
    monkeypatch.setattr(cpu_sums, "softmax_blocks", lambda *a: calls.append(1) or real(*a))
    worker.objective(spec, theta, "float32")
    np.testing.assert_array_equal(worker.hvp(spec, theta, v, "float32"), expected)
    assert calls == []  # served by the evaluation
    worker.hvp(spec, theta + np.float32(0.01), v, "float32")  # another point: computed there
    assert calls == [1]
    worker.objective(spec, theta, "float64")  # a float64 evaluation keeps nothing for float32
    worker.hvp(spec, theta, v, "float32")
    assert calls == [1, 1]
