"""The surrogate head fit: minimise J(Θ) = (1/n) Σ_i CE(softmax(x_i Θ), t_i) + λ‖Θ‖².

J is strongly convex, so its stationary point is unique and worth reaching exactly: the
decomposition error a user sees is x_t·∇J/(2λ). Each evaluation is a pass over every training
row (bound by memory bandwidth, and a round trip to the workers), so the fit is built to need
few: Newton steps from the trained head, their directions from conjugate gradients on
Hessian-vector products, preconditioned by a randomized Nyström approximation of the Hessian
that one batched pass sketches. The data enters only through two callbacks returning *sums over
rows*, so the same function drives an in-memory fit and one whose rows are spread over Ray
workers. L-BFGS (scipy) remains as the fallback should the Newton phase stall.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Tuple

import numpy as np
from scipy.linalg import solve_triangular
from scipy.sparse.linalg import LinearOperator, cg

log = logging.getLogger(__name__)

#: Where the fallback's float32 L-BFGS phase hands over to Newton-CG.
FLOAT32_GTOL = 1e-5
#: Directions in the Hessian sketch. A few hundred directions capture the head's large
#: eigenvalues and cut the fit's Hessian-vector products several-fold; beyond that each extra
#: direction costs more sketching than it saves. Since the sketch reads only a sample of the
#: rows (SKETCH_STRIDE), this many directions stay cheap.
SKETCH_RANK = 200
#: Cap on the sketch's directions × classes. A sketch pass applies the Hessian to l directions of
#: (d+1)×C each: its flops grow with C·l, while a Hessian product of a head with few classes is
#: bound by reading the features, so the same sketch costs many more products' time when C is
#: large, while a head with many classes and few features gains little from the preconditioner.
#: 2,000 gives a 10-class head the full SKETCH_RANK and a 100-class head only 20 directions.
SKETCH_COLUMNS = 2000
#: The sketch reads every SKETCH_STRIDE-th row (scaled to all rows): a preconditioner only
#: needs the Hessian's large eigenvalues roughly, and a systematic sample of the rows keeps them:
#: a sketch over every 8th row preconditions about as well as one over all rows, at a fraction
#: of the cost, which pays for more directions.
SKETCH_STRIDE = 8
#: Rows the sample keeps at least: fewer rows than SKETCH_MIN_ROWS × stride sample less sparsely.
SKETCH_MIN_ROWS = 4096
#: Fewer directions than this are not worth a sketch pass: CG runs without preconditioner.
MIN_SKETCH_RANK = 8
#: Cap on the sketch's size on the driver (N × rank float64), for very wide heads.
SKETCH_BYTES = 1 << 28
#: Newton steps with max |∇J| above this use float32 evaluations and an Armijo test on J;
#: below it J no longer resolves progress in float32, and steps are judged on the float64 |∇J|.
FLOAT32_NEWTON_GTOL = 1e-4
#: Far from the optimum each CG solve stops at the relative residual min(0.5, FAR_FORCING·√max|∇J|)
#: (an inexact-Newton forcing term: it goes to 0 with the gradient, which keeps Newton's
#: superlinear local convergence). Solving more exactly far away buys little: a smaller factor
#: costs Hessian products without saving evaluations, and a much larger one saves no more.
FAR_FORCING = 2.0
#: A CG solve that needs more iterations than this triggers a fresh sketch at the next step
#: (the Hessian has moved away from the one sketched).
RESKETCH_ITERATIONS = 60
#: Cap on the CG iterations of one Newton step.
MAX_CG_ITERATIONS = 300

SumsFn = Callable[[np.ndarray, str], Tuple[float, np.ndarray]]
HvpFn = Callable[[np.ndarray, np.ndarray, str], np.ndarray]
SketchFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


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
    #: Passes over the training features, by kind: ``evaluations`` (J and ∇J),
    #: ``hessian_products`` (one direction each), ``sketches`` (batched passes) and
    #: ``sketch_directions`` (their directions in all; a sketch pass costs about as many
    #: flops as that many Hessian products, in one read of the features).
    passes: dict = dataclasses.field(default_factory=dict)


def fit_head(
    sums: SumsFn,
    hvp_sums: HvpFn,
    n: int,
    lam: float,
    theta0: np.ndarray,
    tol: float = 1e-10,
    max_iter: int = 1000,
    on_iteration: Optional[Callable[[int, float], None]] = None,
    sketch: str = "always",
    sketch_sums: Optional[SketchFn] = None,
) -> FitResult:
    """Fits the surrogate head to a stationary point.

    Newton steps from the trained head, each direction from CG on float32 Hessian-vector
    products preconditioned by a Nyström sketch of the Hessian (see :func:`_newton_pcg`), steps
    judged in float32 while that resolves progress and on the float64 gradient after. Should
    that stall, the fallback runs float32 then float64 L-BFGS, each finished by plain Newton-CG.

    Args:
        sums: (Θ, precision) ↦ (Σ_i CE_i, Σ_i x_iᵀ(p_i − t_i)) over all training rows,
            computed in ``"float32"`` or ``"float64"``.
        hvp_sums: (Θ, V, precision) ↦ Σ_i of the CE Hessian at Θ applied to V, for V of
            shape (d+1, C) or (d+1, C, l) (l directions in one pass, for the sketch).
        n: number of training rows.
        lam: λ of the L2 penalty (bias row included).
        theta0: (d+1, C) starting head, normally the trained one.
        tol: stop when max |∇J| ≤ tol (measured in float64).
        max_iter: cap on the iterations of each L-BFGS phase of the fallback, and (at least
            50, at most MAX_CG_ITERATIONS) on the CG iterations of one Newton step.
        on_iteration: called with (iteration, max |∇J|) for progress display.
        sketch: ``"always"`` (default): a sketch before the first step, of SKETCH_RANK directions
            or fewer for many classes (see SKETCH_COLUMNS and :func:`sketch_rank`);
            ``"adaptive"``: a Nyström sketch only once a CG solve needed many iterations, sized
            by them. The adaptive policy is cheaper for heads with many classes and few
            features, whose Hessian a sketch barely helps, but much slower for heads with few
            classes and many features, where the sketch saves most Hessian products; until a
            rule picks per problem, the default keeps the common case fast.
        sketch_sums: (Θ, V, stride) ↦ the float32 ``hvp_sums`` over every stride-th row,
            scaled to all rows (``hvp_sums(..., stride=)`` of the sums modules), for the
            sketch; without it the sketch reads every row.

    Returns:
        The :class:`FitResult`; ``converged`` is False when the caps were hit first.
    """
    problem = _Problem(sums, hvp_sums, n, lam, theta0.shape, on_iteration, sketch_sums)
    shape, counter = theta0.shape, problem.counter
    objective, hessian_product, callback = problem.objective, problem.hessian_product, problem.callback
    sketch_pass = problem.sketch_pass
    fun64, fun32 = objective("float64"), objective("float32")
    x = np.asarray(theta0, dtype=np.float64).ravel()
    # The start is judged in float32 (a much cheaper pass) unless it is near the
    # optimum already, where only float64 tells.
    j, g = fun32(x)
    exact = np.max(np.abs(g)) <= max(tol, FLOAT32_NEWTON_GTOL)
    if exact:
        j, g = fun64(x)
    phases = []
    if np.max(np.abs(g)) > tol:
        x, j, g = _newton_pcg(fun32, fun64, hessian_product("float32"), sketch_pass,
                              2.0 * lam, x, j, g, tol, max_iter, callback, always_sketch=sketch == "always",
                              n_classes=shape[1], exact=exact)
        # The method as it ran: a head with many classes gets no sketch (see sketch_rank), and
        # an adaptive fit may need none.
        when = "from the first step" if sketch == "always" else "when CG needs it"
        phases.append("Newton-CG (float32 Hessian products; "
                      + (f"Nyström-preconditioned {when})" if counter["sketches"] else "no preconditioner)"))
        log.info("Newton-CG: max|grad J| = %.3g", np.max(np.abs(g)))
    # Fallback, for a Newton phase that stalled: L-BFGS, then Newton steps without sketch.
    plan = (("float32", FLOAT32_GTOL), ("float64", tol))
    for precision, lbfgs_tol in plan:
        if np.max(np.abs(g)) <= tol:
            break
        # Imported here: only a stalled Newton phase needs it, and SciPy's optimize is slow to
        # import, which every run's driver would pay for at module level.
        from scipy import optimize

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
        passes={"evaluations": counter["evals"], "hessian_products": counter["hvps"],
                "sketches": counter["sketches"], "sketch_directions": counter["directions"],
                "total": counter["evals"] + counter["hvps"] + counter["sketches"]},
        max_abs_grad=max_g,
        objective=float(j),
        converged=max_g <= tol,
        method=" + ".join(phases) or "already stationary",
    )


class _Problem:
    """J, ∇J and Hessian products of the head objective on flat vectors, counting the passes
    over the training rows that each costs (what the manifest reports as the fit's cost)."""

    def __init__(self, sums: SumsFn, hvp_sums: HvpFn, n: int, lam: float, shape: tuple,
                 on_iteration: Optional[Callable[[int, float], None]], sketch_sums: Optional[SketchFn]):
        self.sums, self.hvp_sums, self.sketch_sums = sums, hvp_sums, sketch_sums
        self.n, self.lam, self.shape, self.on_iteration = n, lam, shape, on_iteration
        self.stride = sketch_stride(n) if sketch_sums is not None else 1
        self.counter = {"evals": 0, "iters": 0, "hvps": 0, "sketches": 0, "directions": 0}
        self.last_g: Optional[np.ndarray] = None

    def objective(self, precision: str) -> Callable[[np.ndarray], Tuple[float, np.ndarray]]:
        def fun(flat: np.ndarray):
            theta = flat.reshape(self.shape)
            loss, grad = self.sums(theta, precision)
            self.counter["evals"] += 1
            j = loss / self.n + self.lam * float(np.sum(theta * theta))
            g = grad / self.n + 2.0 * self.lam * theta
            self.last_g = g
            return j, g.ravel()

        return fun

    def hessian_product(self, precision: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        def hessp(flat: np.ndarray, p: np.ndarray) -> np.ndarray:
            self.counter["hvps"] += 1
            v = p.reshape(self.shape)
            hv = self.hvp_sums(flat.reshape(self.shape), v, precision) / self.n + 2.0 * self.lam * v
            return hv.ravel()

        return hessp

    def callback(self, intermediate) -> None:
        self.counter["iters"] += 1
        if self.on_iteration is not None and self.last_g is not None:
            self.on_iteration(self.counter["iters"], float(np.max(np.abs(self.last_g))))

    def sketch_pass(self, flat: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """The data part of the Hessian (without 2λI) applied to many directions in one pass,
        estimated from a sample of the rows."""
        d = directions.reshape(self.shape + (directions.shape[1],))
        self.counter["sketches"] += 1
        self.counter["directions"] += directions.shape[1]
        if self.stride > 1:
            return self.sketch_sums(flat.reshape(self.shape), d, self.stride).reshape(directions.shape) / self.n
        return self.hvp_sums(flat.reshape(self.shape), d, "float32").reshape(directions.shape) / self.n


def nystrom_preconditioner(sketch: Callable[[np.ndarray], np.ndarray], size: int, rank: int,
                           mu: float, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """The inverse of a randomized Nyström preconditioner for A + μI, A symmetric PSD.

    A rank-l sketch Y = AΩ gives A ≈ U Λ Uᵀ (Frangella, Tropp & Udell, "Randomized Nyström
    preconditioning", 2023, Alg. 2.1, with the shift ν that keeps float32 sketches stable). The
    preconditioner P = (U(Λ + μI)Uᵀ + (I − UUᵀ)(λ_l + μ)) / (λ_l + μ) removes the l largest
    eigenvalues from CG's way: the head's Hessian has a few hundred large ones (features from a
    ReLU net are far from isotropic) above a floor of μ = 2λ.

    Args:
        sketch: Ω (size, l) ↦ AΩ (size, l), one batched pass over the data.
        size: dimension of A.
        rank: l (capped at ``size``).
        mu: the known shift μ > 0 (2λ for the head's Hessian).
        seed: seed of Ω, so that fits are reproducible.

    Returns:
        r ↦ P⁻¹r.
    """
    # The driver's linear algebra runs while the workers wait, so it is kept to products with
    # the (size × l) matrices and factorisations of (l × l) ones: Ω orthonormalised by Cholesky
    # QR (G L⁻ᵀ with GᵀG = LLᵀ: exact for a Gaussian G, whose condition number is near 1, and
    # Â depends only on the span of Ω); ‖Y‖₂, the shifted core ΩᵀY_ν and B = Y_ν L⁻ᵀ's Gram
    # matrix BᵀB = L⁻¹ Y_νᵀY_ν L⁻ᵀ from three l × l Gram matrices of Ω and Y (Y_ν = Y + νΩ, so
    # a larger ν needs no new (size × l) product); B itself is never formed: U = B V S⁻¹ =
    # Y_ν (L⁻ᵀ V S⁻¹) is one product. Products with the l × l inverse are faster than
    # triangular solves against (size × l) matrices, and Cholesky QR is faster than
    # Householder QR for orthonormalising Ω.
    rank = max(1, min(rank, size))
    gauss = np.random.default_rng(seed).standard_normal((size, rank))
    omega = gauss @ _lower_inverse(np.linalg.cholesky(gauss.T @ gauss)).T
    del gauss
    y = np.asarray(sketch(omega), np.float64)
    g_yy, g_oy, g_oo = y.T @ y, omega.T @ y, omega.T @ omega
    nu = np.sqrt(size) * np.finfo(np.float32).eps * np.sqrt(max(np.linalg.eigvalsh(g_yy)[-1], 0.0))
    for _ in range(6):
        core = g_oy + nu * g_oo  # Ωᵀ Y_ν
        try:
            chol = np.linalg.cholesky(0.5 * (core + core.T))
            break
        except np.linalg.LinAlgError:
            nu = 10.0 * max(nu, np.finfo(np.float64).tiny)
    else:
        log.info("Nyström sketch not positive definite; CG runs without preconditioner")
        return lambda r: r
    l_inv = _lower_inverse(chol)
    # Â = B Bᵀ; B = U S Vᵀ from BᵀB = V S² Vᵀ, kept where λ̂ = s² − ν > 0 (the columns dropped
    # have λ̂ = 0, and then floor = μ: their terms in P⁻¹ vanish).
    gram = g_yy + nu * (g_oy + g_oy.T) + nu * nu * g_oo  # Y_νᵀ Y_ν
    btb = l_inv @ gram @ l_inv.T
    s2, v = np.linalg.eigh(0.5 * (btb + btb.T))
    s2, v = s2[::-1], v[:, ::-1]
    lam_all = np.maximum(s2 - nu, 0.0)
    floor = lam_all[-1] + mu
    keep = lam_all > 0
    lam_hat = lam_all[keep]
    # U in float32, and Uᵀ too (contiguous): CG applies P⁻¹ once per Hessian product while the
    # workers wait, and the products read U, bound by memory: float32 halves the bytes read,
    # and a preconditioner's rounding does not affect the accuracy of CG's solution.
    # Y_ν is made in Ω's place (Ω is not needed any more) and multiplied in float32 too.
    omega *= nu
    omega += y
    del y
    coef = l_inv.T @ (v[:, keep] / np.sqrt(s2[keep]))
    u = np.asarray(omega, np.float32) @ np.asarray(coef, np.float32)
    u_t = np.ascontiguousarray(u.T)
    scale = np.asarray(floor / (lam_hat + mu) - 1.0, np.float32)

    def apply(r: np.ndarray) -> np.ndarray:
        # floor·U(Λ̂+μ)⁻¹Uᵀr + (r − UUᵀr), with two passes over U instead of three.
        return r + u @ (scale * (u_t @ r.astype(np.float32)))

    return apply


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """L⁻¹ of a lower triangular l × l matrix, for products with (size × l) matrices: faster
    than triangular solves against them (see :func:`nystrom_preconditioner`)."""
    return solve_triangular(lower, np.eye(len(lower)), lower=True)


def sketch_stride(n: int) -> int:
    """The sketch's row stride for n rows: SKETCH_STRIDE, less while the sample would keep
    fewer than SKETCH_MIN_ROWS rows (1: all rows)."""
    return int(max(1, min(SKETCH_STRIDE, n // SKETCH_MIN_ROWS)))


def sketch_rank(size: int, n_classes: int = 1) -> int:
    """The sketch's l: SKETCH_RANK, within ``size``, SKETCH_COLUMNS // C and SKETCH_BYTES of
    float64 on the driver; 0 (no sketch) when that leaves fewer than MIN_SKETCH_RANK."""
    rank = min(SKETCH_RANK, size, SKETCH_COLUMNS // max(1, n_classes), SKETCH_BYTES // (8 * size))
    return rank if rank >= MIN_SKETCH_RANK else 0


def _newton_pcg(fun32, fun64, hessp, sketch, mu, x, j64, g, tol, max_iter, callback, max_steps: int = 50,
                always_sketch: bool = False, n_classes: int = 1, exact: bool = True):
    """Newton steps whose directions come from preconditioned CG; the main phase of the fit.

    Far from the optimum (max |∇J| above FLOAT32_NEWTON_GTOL, or above ``tol`` if that is
    larger) a step is accepted by an Armijo test on J, evaluated in float32 (a strongly convex J
    guarantees progress); should float32 no longer resolve the decrease, the same test runs on
    the float64 J. Near the optimum a step is accepted by a decrease of the float64 max |∇J|,
    the quantity the fit is judged on. Each CG solve is only as exact as the step needs
    (Eisenstat–Walker forcing far away; aimed at tol near the end).

    Args:
        j64, g: J and ∇J at the starting point x: float64, or float32 when ``exact`` is False.

    Returns:
        (x, J(x), ∇J(x)) in float64 at the last accepted point.
    """
    size = x.size
    near = max(tol, FLOAT32_NEWTON_GTOL)  # below this, steps are judged on the float64 |∇J|
    # The sketch is sized to what it saves: its pass costs about as many flops as ``rank``
    # Hessian products, so the first step runs CG without it, and a sketch of at most as many
    # directions as that step's CG iterations is taken only when CG needed more than
    # RESKETCH_ITERATIONS (a Hessian with many large eigenvalues). For a head with many classes
    # and few features a sketch can cost far more than it saves; for one with few classes and
    # many features it saves most Hessian products.
    identity = lambda r: r  # noqa: E731
    precond, resketches, rank = identity, 0, None
    if always_sketch and sketch_rank(size, n_classes):
        precond, rank = None, sketch_rank(size, n_classes)
    far_fun = fun32  # J for the Armijo test, and its value at x once needed:
    far_j = None if exact else j64  # a float32 start gives it already
    # ``exact``: is g the float64 gradient at x (else the float32 one)?
    quad = None  # max|∇J| after / max|∇J|² before the last full step: Newton's quadratic constant
    for _ in range(max_steps):
        gmax = float(np.max(np.abs(g)))
        if not exact and gmax <= near:
            j64, g = fun64(x)
            g, exact = g.reshape(-1), True
            gmax = float(np.max(np.abs(g)))
        if gmax <= tol:
            break
        if precond is None:
            precond = nystrom_preconditioner(lambda om: sketch(x, om), size, rank, mu)
        if gmax > near:
            rtol = min(0.5, FAR_FORCING * np.sqrt(gmax))
        else:
            rtol = _near_rtol(tol, gmax, quad)
        iters = [0]
        op = LinearOperator((size, size), matvec=lambda p: hessp(x, p), dtype=np.float64)
        m = LinearOperator((size, size), matvec=precond, dtype=np.float64)
        step, _info = cg(op, -g.ravel(), rtol=rtol, atol=0.0, maxiter=min(MAX_CG_ITERATIONS, max(50, max_iter)),
                         M=m, callback=lambda _xk: iters.__setitem__(0, iters[0] + 1))
        if iters[0] > RESKETCH_ITERATIONS and resketches < 2:
            if rank is None:  # the first sketch: as many directions as this solve needed
                rank = min(sketch_rank(size, n_classes), iters[0])
            if rank:
                precond, resketches = None, resketches + 1
        accepted = False
        if gmax > near:
            slope = float(np.dot(g.ravel(), step))
            if slope < 0:  # a descent direction (CG's always is, up to rounding)
                if far_j is None:
                    far_j = far_fun(x)[0]
                scale = 1.0
                for _ls in range(30):
                    j_new, g_new = far_fun(x + scale * step)
                    if j_new <= far_j + 1e-4 * scale * slope:
                        exact = far_fun is fun64
                        x, far_j, g, accepted = x + scale * step, j_new, g_new.reshape(-1), True
                        quad = float(np.max(np.abs(g))) / gmax ** 2 if scale == 1.0 else None
                        j64 = j_new if exact else j64
                        break
                    scale *= 0.5
            if not accepted and far_fun is fun32:
                # Float32 J could not resolve this step's decrease: judge far steps in float64.
                far_fun, far_j = fun64, None
                if not exact:
                    j64, g = fun64(x)
                    g, exact = g.reshape(-1), True
                continue
        else:
            found = _step_lowering_grad(fun64, x, step, gmax)
            if found is not None:
                (x, j64, g, scale), accepted, exact, far_j = found, True, True, None
                quad = float(np.max(np.abs(g))) / gmax ** 2 if scale == 1.0 else None
        callback(x)
        if not accepted:
            log.info("Newton-CG stopped: no step makes progress at max|grad J| = %.3g", gmax)
            break
    if not exact:
        j64, g = fun64(x)
    return x, j64, g.reshape(-1)


def _near_rtol(tol: float, gmax: float, quad: Optional[float] = None) -> float:
    """CG's relative tolerance near the optimum.

    After a Newton step, max |∇J| is about the CG residual's share (rtol·gmax) plus the step's
    quadratic term (≈ quad·gmax², ``quad`` measured on the previous full step): aim at tol,
    but never solve more exactly than the quadratic term allows: aiming at tol regardless
    spends CG iterations on accuracy the next step's quadratic term would swamp.
    """
    aim = 0.5 * tol / gmax
    if quad is not None:
        aim = max(aim, 0.5 * quad * gmax)
    return min(0.5, max(1e-6, aim))


def _step_lowering_grad(fun, x, step, gmax):
    """The first of step, step/2, step/4, step/8 whose max |∇J| is below ``gmax``.

    Returns:
        (x, J, ∇J flattened, the scale taken) there, or None when none of them lowers max |∇J|.
    """
    for scale in (1.0, 0.5, 0.25, 0.125):
        j_new, g_new = fun(x + scale * step)
        if float(np.max(np.abs(g_new))) < gmax:
            return x + scale * step, j_new, g_new.reshape(-1), scale
    return None


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
        step, _info = cg(op, -g.ravel(), rtol=_near_rtol(tol, gmax), atol=0.0, maxiter=max(50, max_iter))
        found = _step_lowering_grad(fun, x, step, gmax)
        if found is not None:
            x, j, g, _scale = found
        callback(x)
        if found is None:
            log.info("Newton polish stopped: no step reduces max|grad J| below %.3g", gmax)
            break
    return x, j, g
