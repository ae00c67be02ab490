"""The head fit's machinery against explicit matrices: batched Hessian products, the Nyström
preconditioner, and the fit with a partial sketch and with its fallback."""

import numpy as np
import oracle
import pytest

from distributed_influence.method import cpu_sums
from distributed_influence.method import fit as fitmod
from distributed_influence.method import representer as rp
from distributed_influence.method.fit import fit_head, nystrom_preconditioner

LAM = 0.003
#: The fit's sums: TensorFlow (GPU workers) and NumPy (CPU workers).
SUMS = [pytest.param(rp, id="tensorflow"), pytest.param(cpu_sums, id="numpy")]


@pytest.fixture(scope="module")
def wide():
    """A head with more parameters than the sketch directions used below."""
    rng = np.random.default_rng(11)
    n, d, C = 300, 24, 5
    f = np.abs(rng.normal(size=(n, d))).astype(np.float32) * rng.uniform(0.1, 3.0, size=d).astype(np.float32)
    labels = rng.integers(0, C, size=n)
    theta0 = rng.normal(scale=0.2, size=(d + 1, C))
    return rp.augment(f), labels, theta0


@pytest.mark.parametrize("sums", SUMS)
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_many_direction_hvp_equals_explicit_hessian(wide, precision, sums, monkeypatch):
    x, _labels, theta = wide
    # Small chunks, so that the column chunks and row blocks are all exercised.
    monkeypatch.setattr(rp, "MULTI_HVP_COLUMNS", 15)
    monkeypatch.setattr(rp, "MULTI_HVP_ROWS", 70)
    monkeypatch.setattr(cpu_sums, "ROWS", 70)
    # 3 directions at a time:
    monkeypatch.setattr(cpu_sums, "BLOCK_BYTES", 70 * theta.shape[1] * 3 * np.dtype(precision).itemsize)
    v = np.random.default_rng(2).normal(size=theta.shape + (7,))
    got = sums.hvp_sums(x, theta, v, precision) / len(x)
    h = oracle.data_hessian(x.astype(np.float64), theta)
    want = np.stack([(h @ v[:, :, j].ravel()).reshape(theta.shape) for j in range(v.shape[2])], axis=2)
    tol = 1e-5 if precision == "float32" else 1e-11
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def _explicit_psd(size, rank, seed):
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(size, rank)))[0]
    return (q * np.geomspace(100.0, 0.5, rank)) @ q.T


def test_nystrom_with_the_whole_range_makes_the_system_perfectly_conditioned():
    """A rank-5 A sketched with 10 directions is captured: P⁻¹(A + μI) = μI, up to the shift ν
    (float32 rounding of the sketch's norm) that keeps the factorisation stable."""
    size, mu = 40, 0.01
    a = _explicit_psd(size, 5, 0)
    pinv = nystrom_preconditioner(lambda om: a @ om, size, 10, mu)
    m = np.column_stack([pinv(col) for col in (a + mu * np.eye(size)).T])
    ev = np.linalg.eigvals(m).real
    assert ev.max() / ev.min() <= 1.02
    assert np.allclose(ev, mu, rtol=1e-2)


def test_nystrom_with_few_directions_still_cuts_the_condition_number():
    """Sketching 20 of 40 directions of a full-rank A bounds κ by about λ_21/μ, not λ_1/μ."""
    size, mu = 40, 0.01
    a = _explicit_psd(size, size, 1)
    h = a + mu * np.eye(size)
    pinv = nystrom_preconditioner(lambda om: a @ om, size, 20, mu)
    m = np.column_stack([pinv(col) for col in h.T])
    ev = np.sort(np.linalg.eigvals(m).real)
    lam = np.sort(np.linalg.eigvalsh(a))[::-1]
    assert ev.min() > 0
    assert ev.max() / ev.min() < (lam[0] + mu) / mu / 100  # at least 100× better than none
    assert ev.max() / ev.min() <= 10 * (lam[20] + mu) / mu


@pytest.mark.parametrize("sums", SUMS)
@pytest.mark.parametrize("target", ["labels", "predictions"])
def test_fit_with_a_partial_sketch_reaches_the_explicit_newton_optimum(wide, target, sums, monkeypatch):
    x, labels, theta0 = wide
    monkeypatch.setattr(fitmod, "SKETCH_RANK", 12)  # 12 of 125 directions
    C = theta0.shape[1]
    t = rp.one_hot(labels, C) if target == "labels" else oracle.softmax(x.astype(np.float64) @ theta0)
    res = fit_head(lambda th, prec: sums.objective_sums(x, t, th, prec),
                   lambda th, v, prec: sums.hvp_sums(x, th, v, prec), len(x), LAM, theta0, tol=1e-10)
    assert res.converged and res.max_abs_grad <= 1e-10
    assert res.method.startswith("Newton-CG") and "L-BFGS" not in res.method  # no fallback
    # the partial sketch ran (12 directions each time; a CG solve that grows long sketches again)
    assert res.passes["sketches"] >= 1 and res.passes["sketch_directions"] <= 12 * res.passes["sketches"]
    ref = oracle.newton_fit(x.astype(np.float64), t, LAM, theta0)
    assert np.abs(oracle.objective(x.astype(np.float64), t, ref, LAM)[1]).max() <= 1e-10
    np.testing.assert_allclose(res.theta, ref, atol=1e-7)


def test_fit_falls_back_to_lbfgs_when_newton_directions_are_useless(wide):
    """Float32 Hessian products pointing the wrong way make every Newton step fail its test;
    the fallback (L-BFGS, then Newton on float64 products) must still reach the optimum."""
    x, labels, theta0 = wide
    t = rp.one_hot(labels, theta0.shape[1])

    def hvp(th, v, prec):
        true = rp.hvp_sums(x, th, v, prec)
        return -true if prec == "float32" else true

    res = fit_head(lambda th, prec: rp.objective_sums(x, t, th, prec), hvp, len(x), LAM, theta0, tol=1e-10)
    assert res.converged and res.max_abs_grad <= 1e-10
    assert "L-BFGS-B" in res.method
    ref = oracle.newton_fit(x.astype(np.float64), t, LAM, theta0)
    np.testing.assert_allclose(res.theta, ref, atol=1e-7)


def test_newton_judges_far_steps_in_float64_when_float32_j_cannot_resolve_them(wide):
    """A float32 J that resolves nothing (NaN: every comparison false) fails every Armijo test:
    the Newton phase must then judge its steps on the float64 J, not give up to the fallback
    (which would show as L-BFGS in the method)."""
    x, labels, theta0 = wide
    t = rp.one_hot(labels, theta0.shape[1])

    def sums(th, prec):
        loss, grad = rp.objective_sums(x, t, th, prec)
        return (float("nan") if prec == "float32" else loss), grad

    res = fit_head(sums, lambda th, v, prec: rp.hvp_sums(x, th, v, prec), len(x), LAM, theta0, tol=1e-10)
    assert res.converged and res.max_abs_grad <= 1e-10
    assert "L-BFGS" not in res.method
    np.testing.assert_allclose(res.theta, oracle.newton_fit(x.astype(np.float64), t, LAM, theta0), atol=1e-7)


def test_near_optimum_cg_tolerance_aims_at_tol_but_not_below_the_quadratic_term():
    from distributed_influence.method.fit import _near_rtol

    # No quadratic estimate yet: aim at tol (half of it) in one step.
    assert _near_rtol(1e-10, 1e-6) == pytest.approx(0.5 * 1e-10 / 1e-6)
    # The last full step showed |g_new| ≈ 150·|g|²: at |g| = 1e-5 the next gradient cannot drop
    # below ~1.5e-8 however exact the solve, so CG stops at a residual of that order.
    assert _near_rtol(1e-10, 1e-5, quad=150.0) == pytest.approx(0.5 * 150.0 * 1e-5)
    # Bounded: never looser than 0.5, never tighter than 1e-6.
    assert _near_rtol(1e-10, 1.5e-10) == 0.5 * 1e-10 / 1.5e-10
    assert _near_rtol(1e-10, 2e-11 * 1e6) == pytest.approx(2.5e-6)
    assert _near_rtol(1e-14, 1.0) == 1e-6
    assert _near_rtol(1e-10, 1e-2, quad=1e6) == 0.5


@pytest.mark.parametrize("sums", SUMS)
def test_sketch_row_sample_scaled_to_all_rows_is_exact_on_repeated_rows(wide, sums):
    """With every row repeated ``stride`` times in a row, every stride-th row holds each row
    once: the sampled sum, scaled to all rows, must equal the explicit Hessian of all rows."""
    x, _labels, theta = wide
    stride = 4
    xr = np.repeat(x, stride, axis=0)
    v = np.random.default_rng(5).normal(size=theta.shape + (3,))
    got = sums.hvp_sums(xr, theta, v, "float64", stride=stride) / len(xr)
    h = oracle.data_hessian(x.astype(np.float64), theta)  # the mean over rows: the same for xr
    want = np.stack([(h @ v[:, :, j].ravel()).reshape(theta.shape) for j in range(v.shape[2])], axis=2)
    assert np.abs(got - want).max() <= 1e-11 * np.abs(want).max()


@pytest.mark.parametrize("sums", SUMS)
def test_fit_with_a_sampled_sketch_reaches_the_explicit_newton_optimum(wide, sums, monkeypatch):
    """The sketch may read a sample of the rows (a preconditioner needs the Hessian only
    roughly): the fit must still end at the exact optimum, and the sample must be used."""
    x, labels, theta0 = wide
    monkeypatch.setattr(fitmod, "SKETCH_MIN_ROWS", 50)  # 300 rows: a stride of 6
    assert fitmod.sketch_stride(len(x)) == 6
    t = rp.one_hot(labels, theta0.shape[1])
    strides = []

    def sketch(th, v, stride):
        strides.append(stride)
        return sums.hvp_sums(x, th, v, "float32", stride=stride)

    res = fit_head(lambda th, prec: sums.objective_sums(x, t, th, prec),
                   lambda th, v, prec: sums.hvp_sums(x, th, v, prec), len(x), LAM, theta0, tol=1e-10,
                   sketch_sums=sketch)
    assert res.converged and res.max_abs_grad <= 1e-10 and "L-BFGS" not in res.method
    assert strides and set(strides) == {6} and res.passes["sketches"] == len(strides)
    np.testing.assert_allclose(res.theta, oracle.newton_fit(x.astype(np.float64), t, LAM, theta0), atol=1e-7)
    assert "Nyström-preconditioned from the first step" in res.method


def test_a_head_with_too_many_classes_for_a_sketch_is_fitted_and_reported_without_one(wide, monkeypatch):
    """sketch_rank gives 0 when SKETCH_COLUMNS // C leaves too few directions: the fit still
    reaches the optimum by plain Newton-CG, and its method says that no preconditioner ran."""
    x, labels, theta0 = wide
    monkeypatch.setattr(fitmod, "SKETCH_COLUMNS", 5 * (fitmod.MIN_SKETCH_RANK - 1))
    assert fitmod.sketch_rank(theta0.size, theta0.shape[1]) == 0
    t = rp.one_hot(labels, theta0.shape[1])
    res = fit_head(lambda th, prec: cpu_sums.objective_sums(x, t, th, prec),
                   lambda th, v, prec: cpu_sums.hvp_sums(x, th, v, prec), len(x), LAM, theta0, tol=1e-10,
                   sketch_sums=lambda th, v, stride: cpu_sums.hvp_sums(x, th, v, "float32", stride=stride))
    assert res.converged and res.passes["sketches"] == 0
    assert res.method == "Newton-CG (float32 Hessian products; no preconditioner)"
    np.testing.assert_allclose(res.theta, oracle.newton_fit(x.astype(np.float64), t, LAM, theta0), atol=1e-7)
