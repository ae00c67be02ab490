"""The surrogate head fit: minimise J(Θ) = (1/n) Σ_i CE(softmax(x_i Θ), t_i) + λ‖Θ‖².

J is strongly convex, so its stationary point is unique and worth reaching exactly: the
decomposition error a user sees is x_t·∇J/(2λ). The fit runs L-BFGS (scipy) on float32 sums
from the trained head, then Newton steps (conjugate gradients on Hessian-vector products,
each step accepted when it lowers the float64 max |∇J|) until max |∇J| ≤ tol. The data enters only through two callbacks returning *sums over rows*, so the
same function drives an in-memory fit and one whose rows are spread over Ray workers.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Tuple

import numpy as np
from scipy import optimize
from scipy.sparse.linalg import LinearOperator, cg

log = logging.getLogger(__name__)

#: Where the float32 L-BFGS phase hands over to Newton-CG (measured best of 1e-6..1e-3).
FLOAT32_GTOL = 1e-5

SumsFn = Callable[[np.ndarray, str], Tuple[float, np.ndarray]]
HvpFn = Callable[[np.ndarray, np.ndarray, str], np.ndarray]


@dataclasses.dataclass
class FitResult:
    """Outcome of the head fit, reported in the manifest."""

    theta: np.ndarray
    iterations: int
    evaluations: int
    max_abs_grad: float
    objective: float
    converged: bool
    method: str


def fit_head(
    sums: SumsFn,
    hvp_sums: HvpFn,
    n: int,
    lam: float,
    theta0: np.ndarray,
    tol: float = 1e-10,
    max_iter: int = 1000,
    on_iteration: Optional[Callable[[int, float], None]] = None,
) -> FitResult:
    """Fits the surrogate head to a stationary point.

    Three phases, each as cheap as the accuracy it needs: L-BFGS on float32 sums (about 4×
    cheaper per evaluation; handed over at max |∇J| ~ 1e-5, near where float32 stalls), then
    Newton steps whose direction comes from CG on float32 Hessian-vector products and whose
    acceptance is judged on the float64 gradient. Should that stall, float64 L-BFGS and float64
    Newton steps finish the job.

    Args:
        sums: (Θ, precision) ↦ (Σ_i CE_i, Σ_i x_iᵀ(p_i − t_i)) over all training rows,
            computed in ``"float32"`` or ``"float64"``.
        hvp_sums: (Θ, V, precision) ↦ Σ_i of the CE Hessian at Θ applied to V.
        n: number of training rows.
        lam: λ of the L2 penalty (bias row included).
        theta0: (d+1, C) starting head, normally the trained one.
        tol: stop when max |∇J| ≤ tol (measured in float64).
        max_iter: cap on the iterations of each phase.
        on_iteration: called with (iteration, max |∇J|) for progress display.

    Returns:
        The :class:`FitResult`; ``converged`` is False when the caps were hit first.
    """
    shape = theta0.shape
    counter = {"evals": 0, "iters": 0}
    last = {}

    def objective(precision: str):
        def fun(flat: np.ndarray):
            theta = flat.reshape(shape)
            loss, grad = sums(theta, precision)
            counter["evals"] += 1
            j = loss / n + lam * float(np.sum(theta * theta))
            g = grad / n + 2.0 * lam * theta
            last["g"] = g
            return j, g.ravel()

        return fun

    def hessian_product(precision: str):
        def hessp(flat: np.ndarray, p: np.ndarray) -> np.ndarray:
            hv = hvp_sums(flat.reshape(shape), p.reshape(shape), precision) / n + 2.0 * lam * p.reshape(shape)
            return hv.ravel()

        return hessp

    def callback(intermediate):
        counter["iters"] += 1
        if on_iteration is not None and "g" in last:
            on_iteration(counter["iters"], float(np.max(np.abs(last["g"]))))

    fun64 = objective("float64")
    x = np.asarray(theta0, dtype=np.float64).ravel()
    j, g = fun64(x)
    phases = []
    plan = (("float32", FLOAT32_GTOL), ("float64", tol))
    for precision, lbfgs_tol in plan:
        if np.max(np.abs(g)) <= tol:
            break
        res = optimize.minimize(
            objective(precision), x, jac=True, method="L-BFGS-B", callback=callback,
            options={"maxiter": max_iter, "maxcor": 30, "ftol": 0.0, "gtol": max(tol, lbfgs_tol), "maxls": 50},
        )
        x = res.x
        j, g = fun64(x)
        phases.append(f"{precision} L-BFGS-B")
        log.info("%s L-BFGS-B: %d iterations, max|grad J| = %.3g", precision, res.nit, np.max(np.abs(g)))
        if np.max(np.abs(g)) > tol:
            x, j, g = _newton_polish(fun64, hessian_product(precision), x, j, g, tol, max_iter, callback)
            phases.append(f"Newton-CG ({precision} Hessian products)")
            log.info("Newton-CG: max|grad J| = %.3g", np.max(np.abs(g)))
    max_g = float(np.max(np.abs(g)))
    return FitResult(
        theta=x.reshape(shape),
        iterations=counter["iters"],
        evaluations=counter["evals"],
        max_abs_grad=max_g,
        objective=float(j),
        converged=max_g <= tol,
        method=" + ".join(phases) or "already stationary",
    )


def _newton_polish(fun, hessp, x, j, g, tol, max_iter, callback, max_steps: int = 20):
    """Inexact Newton steps (CG on Hessian-vector products), accepted on |∇J| decrease.

    Returns:
        (x, J(x), ∇J(x)) at the last accepted point.
    """
    n = x.size
    for _ in range(max_steps):
        gmax = float(np.max(np.abs(g)))
        if gmax <= tol:
            break
        op = LinearOperator((n, n), matvec=lambda p: hessp(x, p), dtype=np.float64)
        # Solve only as exactly as this step needs: near the optimum a Newton step divides
        # |∇J| by about the CG residual, so aim at tol in one step (within float32 reach).
        rtol = min(1e-2, max(1e-6, 0.1 * tol / gmax))
        step, _info = cg(op, -g.ravel(), rtol=rtol, atol=0.0, maxiter=max(50, max_iter))
        accepted = False
        for scale in (1.0, 0.5, 0.25, 0.125):
            j_new, g_new = fun(x + scale * step)
            if float(np.max(np.abs(g_new))) < gmax:
                x, j, g = x + scale * step, j_new, g_new.reshape(g.shape)
                accepted = True
                break
        callback(x)
        if not accepted:
            log.info("Newton polish stopped: no step reduces max|grad J| below %.3g", gmax)
            break
    return x, j, g
