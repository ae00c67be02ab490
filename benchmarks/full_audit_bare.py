"""The bare single-process reference of ``full_audit.py``: the job's math done by hand in one
process (one batched forward pass, an in-memory fit of the head, closed-form α, one blocked
test × train product with an exact top-k), stage by stage.

Why a module of its own: it is the yardstick the job is measured against, and reads best
apart from the script that runs the job and prints the comparison.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict

import numpy as np
from common import K
from sampler import Contention, busy_cpu_seconds, own_cpu_seconds, steal_cpu_seconds

#: λ of the head objective J = mean CE + λ‖Θ‖² (the package's default).
LAM = 0.003
#: Stop the bare head fit when max |∇J| is at most this.
BARE_GRAD_TOL = 1e-7



@dataclasses.dataclass
class BareResult:
    """The bare single-process computation: stage times and what it found."""

    times: Dict[str, float]
    fit_info: dict
    top_ids: np.ndarray  # (m, K) proponent row numbers, best first
    bottom_ids: np.ndarray  # (m, K) opponent row numbers, strongest first
    contention: Contention
    newton_fit: dict  # the job's own fit algorithm run in memory: seconds, max |∇J|, method

    @property
    def total(self) -> float:
        """Seconds of all bare stages."""
        return sum(self.times.values())


def _tf():
    from distributed_influence.tfimport import import_tensorflow

    return import_tensorflow()


def bare_load(model_path: str, train_npz: str, test_npz: str):
    """Loads the model and both .npz files into memory."""
    from distributed_influence.tfimport import import_keras

    model = import_keras().models.load_model(model_path, safe_mode=True, compile=False)
    with np.load(train_npz) as z:
        x, y = z["x"], z["y"].astype(np.int64)
    with np.load(test_npz) as z:
        xt = z["x"]
    return model, x, y, xt


def bare_featurize(model, x: np.ndarray, xt: np.ndarray, batch: int = 2048):
    """One batched forward pass over train and test: augmented features [f, 1] and logits.

    Returns:
        (train features (n, d+1) float32, test features (m, d+1) float32, test logits (m, C)).
    """
    tf = _tf()
    spec = tf.TensorSpec((None,) + tuple(x.shape[1:]), tf.float32)
    forward = tf.function(lambda b: model(b, training=False)[:2], input_signature=[spec])
    both = np.concatenate([x, xt])
    d = int(model.outputs[0].shape[-1])
    feats = np.ones((len(both), d + 1), np.float32)
    logits = np.empty((len(both), int(model.outputs[1].shape[-1])), np.float32)
    for s in range(0, len(both), batch):
        f, z = forward(both[s:s + batch])
        feats[s:s + batch, :d] = f.numpy()
        logits[s:s + batch] = z.numpy()
    n = len(x)
    return feats[:n], feats[n:], logits[n:]


def head_theta(model) -> np.ndarray:
    """The trained head with its bias as the last row: (d+1, C) float64."""
    kernel, bias = model.get_layer("logits").get_weights()
    return np.vstack([kernel, bias[None, :]]).astype(np.float64)


class HeadProblem:
    """J(Θ) = mean CE(softmax(XΘ), y) + λ‖Θ‖² on all features in memory.

    Three views of the same objective: a float32 one for the bulk of L-BFGS (one fused
    TensorFlow call, products in float32, losses summed in float64), an exact float64
    gradient, and the exact Hessian (float32 products, float64 sums) for Newton steps.
    """

    #: Rows per block of the Hessian (bounds its (rows × (d+1)·C) temporary).
    HESSIAN_ROWS = 8192

    def __init__(self, X32: np.ndarray, y: np.ndarray, lam: float):
        tf = _tf()
        self.n, self.d1 = X32.shape
        self.C = int(y.max()) + 1
        self.lam, self.y = lam, y
        self.X32 = X32
        self._x = tf.constant(X32)
        self._t = tf.constant(np.eye(self.C, dtype=np.float32)[y])
        self._X64 = None
        self._f32 = tf.function(self._f32_graph)
        self._hess = tf.function(self._hess_graph, reduce_retracing=True)

    def _f32_graph(self, theta):
        tf = _tf()
        z = tf.matmul(self._x, theta)
        ce = tf.nn.softmax_cross_entropy_with_logits(labels=self._t, logits=z)
        return tf.reduce_sum(tf.cast(ce, tf.float64)), tf.matmul(self._x, tf.nn.softmax(z) - self._t,
                                                                  transpose_a=True)

    def fun32(self, flat: np.ndarray):
        """(J, ∇J) for scipy, computed with float32 products."""
        theta = flat.reshape(self.d1, self.C)
        loss, g = self._f32(_tf().constant(theta, _tf().float32))
        grad = g.numpy().astype(np.float64) / self.n + 2.0 * self.lam * theta
        return float(loss) / self.n + self.lam * float(flat @ flat), grad.ravel()

    def grad64(self, theta: np.ndarray) -> np.ndarray:
        """∇J in float64 throughout (the number a fit's tolerance is checked against)."""
        if self._X64 is None:
            self._X64 = self.X32.astype(np.float64)
        z = self._X64 @ theta
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(self.n), self.y] -= 1.0
        return self._X64.T @ p / self.n + 2.0 * self.lam * theta

    def _hess_graph(self, x, theta):
        tf = _tf()
        p = tf.nn.softmax(tf.matmul(x, theta))
        v = tf.reshape(p[:, :, None] * x[:, None, :], (-1, self.C * self.d1))  # rows p_i ⊗ x_i
        diag = tf.einsum("ic,ij,ik->cjk", p, x, x)  # Xᵀ diag(p_c) X per class
        return diag, tf.matmul(v, v, transpose_a=True)

    def hessian(self, theta: np.ndarray) -> np.ndarray:
        """∇²J at Θ, ((d+1)·C)², indexed like Θ.ravel(): (1/n)Σ (diag p_i − p_i p_iᵀ) ⊗ x_i x_iᵀ + 2λI."""
        tf = _tf()
        C, d1 = self.C, self.d1
        t = tf.constant(theta, tf.float32)
        h = np.zeros((C * d1, C * d1))
        for s in range(0, self.n, self.HESSIAN_ROWS):
            diag, vv = self._hess(self._x[s:s + self.HESSIAN_ROWS], t)
            h -= vv.numpy()
            diag = diag.numpy()
            for c in range(C):
                h[c * d1:(c + 1) * d1, c * d1:(c + 1) * d1] += diag[c]
        h = h.reshape(C, d1, C, d1).transpose(1, 0, 3, 2).reshape(d1 * C, d1 * C)
        return h / self.n + 2.0 * self.lam * np.eye(d1 * C)


#: Largest head ((d+1)·C parameters) for which the bare fit builds the exact Hessian.
MAX_HESSIAN = 4000
#: Feature width of the seed's CNN: the flattened 5×5×64 output of the second pooling layer.
FLATTEN_DIM = 5 * 5 * 64


def bare_fit(X32: np.ndarray, y: np.ndarray, theta0: np.ndarray, lam: float, tol: float):
    """The head fit: float32 L-BFGS from the trained head, then exact Newton steps if cheap.

    L-BFGS with float32 sums stalls near max |∇J| ≈ 1e-5 (docs/method.md, "The fit"), where J no longer
    resolves its own decrease. When the head is small ((d+1)·C ≤ MAX_HESSIAN), one Newton step
    with the exact Hessian (factored once, reused while it keeps dividing |∇J| by 10) and a
    float64 gradient reaches ≪ 1e-7; for the seed's d = 1600 the Hessian (16010²) would cost
    far more than the whole job, so the bare fit stops where float32 L-BFGS stalls.

    Returns:
        (Θ (d+1, C) float64, info dict: L-BFGS iterations and evaluations, max |∇J| after
        L-BFGS, Newton steps, Hessians built, final max |∇J| in float64).
    """
    from scipy import linalg, optimize

    prob = HeadProblem(X32, y, lam)
    opts = {"maxiter": 5000, "maxcor": 30, "ftol": 0.0, "gtol": max(tol, 1e-5), "maxls": 50}
    res = optimize.minimize(prob.fun32, theta0.ravel(), jac=True, method="L-BFGS-B", options=opts)
    theta = res.x.reshape(theta0.shape)
    g = prob.grad64(theta)
    info = {"lbfgs_iterations": int(res.nit), "lbfgs_evaluations": int(res.nfev),
            "lbfgs_max_grad": float(np.max(np.abs(g))), "newton_steps": 0, "hessians": 0}
    factor = None
    for _ in range(10 if theta.size <= MAX_HESSIAN else 0):
        if np.max(np.abs(g)) <= tol:
            break
        if factor is None:
            factor = linalg.cho_factor(prob.hessian(theta))
            info["hessians"] += 1
        theta = theta - linalg.cho_solve(factor, g.ravel()).reshape(theta.shape)
        g_new = prob.grad64(theta)
        info["newton_steps"] += 1
        if np.max(np.abs(g_new)) > 0.1 * np.max(np.abs(g)):
            factor = None  # the Hessian moved: rebuild it at the next step
        g = g_new
    info["max_grad"] = float(np.max(np.abs(g)))
    return theta, info


def bare_newton_fit(X32: np.ndarray, y: np.ndarray, theta0: np.ndarray, lam: float, tol: float) -> dict:
    """The job's own fit (Nyström-preconditioned Newton-CG, :func:`fit.fit_head`) on all
    features in memory: a second reference, for the same fit quality as the job's.

    Returns:
        dict with ``seconds``, ``max_grad`` and ``method``.
    """
    from distributed_influence.method import representer as rp
    from distributed_influence.method.fit import fit_head

    tf = _tf()
    x = tf.constant(X32)
    targets = rp.one_hot(y, theta0.shape[1])
    t32 = tf.constant(targets, tf.float32)
    cache: dict = {}

    def sums(theta, precision):
        return rp.objective_sums(x, t32 if precision == "float32" else targets, theta, precision)

    def hvp(theta, v, precision):
        key = (theta.tobytes(), precision)  # softmax(XΘ) is reused for one Newton step
        if cache.get("key") != key:
            cache["key"], cache["probs"] = key, rp.softmax_blocks(x, theta, precision)
        return rp.hvp_sums(x, theta, v, precision, probs=cache["probs"])

    def sketch(theta, v, stride):  # the job's sketch: a sample of the rows
        return rp.hvp_sums(x, theta, v, "float32", stride=stride)

    t0 = time.perf_counter()
    res = fit_head(sums, hvp, len(X32), lam, theta0, tol=tol, sketch_sums=sketch)
    return {"seconds": time.perf_counter() - t0, "max_grad": res.max_abs_grad, "method": res.method}


def bare_alpha(X32: np.ndarray, y: np.ndarray, theta: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form α = (softmax(XΘ) − onehot(y)) / (−2λn), float64 (n, C)."""
    z = X32.astype(np.float64) @ theta
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return p / (-2.0 * lam * len(y))


def chunk_size(n: int) -> int:
    """A divisor of n near 128 for the two-level top-k, or 0 when there is none in [32, 1024]."""
    for g in sorted(range(32, 1025), key=lambda v: abs(v - 128)):
        if n % g == 0 and n // g >= K:
            return g
    return 0


def make_scorer(X: np.ndarray, alpha: np.ndarray, k: int):
    """A compiled scorer of test rows that share a predicted class c.

    α is folded into the training features per call (X ∘ α[:, c], n·(d+1) multiplies), so the
    values r = Xt (X ∘ α[:, c])ᵀ come straight out of one matrix product, with no (b × n)
    gather and no elementwise pass over r. Top-k is two-level and exact: the k largest values
    of a row lie in the k chunks (of g contiguous columns) with the largest maxima, so only
    those k·g candidates are sorted (likewise minima for opponents). Ties go to the lower
    column, as with ``tf.math.top_k`` on the whole row.

    Returns:
        ``block(xt (b, d+1) float32, c) -> (top values, top columns, bottom values, bottom columns)``.
    """
    tf = _tf()
    n, d1 = X.shape
    g = chunk_size(n)
    x_const = tf.constant(X)
    alpha_t = tf.constant(np.ascontiguousarray(alpha.T, dtype=np.float32))  # (C, n)

    def select(r, chunk_extreme, sign):
        if not g:
            t = tf.math.top_k(sign * r, k=k)
            return sign * t.values, t.indices
        b = tf.shape(r)[0]
        rc = tf.reshape(r, (b, n // g, g))
        _, ci = tf.math.top_k(sign * chunk_extreme(rc, axis=2), k=k)
        ci = tf.sort(ci, axis=1)
        cand = tf.reshape(tf.gather(rc, ci, batch_dims=1), (b, k * g))
        v, i = tf.math.top_k(sign * cand, k=k)
        return sign * v, tf.gather(ci, i // g, batch_dims=1) * g + i % g

    @tf.function(input_signature=[tf.TensorSpec((None, d1), tf.float32), tf.TensorSpec((), tf.int32)])
    def block(xt, c):
        folded = x_const * tf.gather(alpha_t, c)[:, None]
        r = tf.matmul(xt, folded, transpose_b=True)
        tv, ti = select(r, tf.reduce_max, 1.0)
        bv, bi = select(r, tf.reduce_min, -1.0)
        return tv, ti, bv, bi

    return block


def influence_sums(X: np.ndarray, alpha: np.ndarray, Xt: np.ndarray, pred: np.ndarray):
    """Per-train Σ_t r_i(t) and Σ_t |r_i(t)| without the m × n matrix.

    Σ_t α_{i,c_t} x_i·x_t = Σ_c α_ic x_i·S_c with S_c the sum of the test features predicted c.
    When all features are ≥ 0 (ReLU features and the bias 1) every similarity is ≥ 1, so
    |r| = |α| · similarity and the absolute sum follows the same way; otherwise it is None.
    """
    n_classes = alpha.shape[1]
    S = np.zeros((n_classes, X.shape[1]))
    np.add.at(S, pred, Xt.astype(np.float64))
    sim = X.astype(np.float64) @ S.T  # (n, C)
    nonneg = bool((X >= 0).all() and (Xt >= 0).all())
    return np.sum(alpha * sim, axis=1), (np.sum(np.abs(alpha) * sim, axis=1) if nonneg else None)


def bare_score(X: np.ndarray, alpha: np.ndarray, Xt: np.ndarray, pred: np.ndarray, block: int = 2048):
    """Top-k proponents and opponents of every test row, ``block`` rows of one class at a time.

    Returns:
        (top ids (m, K), top values (m, K), bottom ids (m, K), influence sums (n,),
        |influence| sums (n,) or None).
    """
    scorer = make_scorer(X, alpha, K)
    m = len(Xt)
    top_i, bot_i = np.empty((m, K), np.int64), np.empty((m, K), np.int64)
    top_v = np.empty((m, K), np.float32)
    for c in np.unique(pred):
        rows = np.flatnonzero(pred == c)
        for s in range(0, len(rows), block):
            r = rows[s:s + block]
            tv, ti, _bv, bi = scorer(Xt[r], np.int32(c))
            top_v[r], top_i[r], bot_i[r] = tv.numpy(), ti.numpy(), bi.numpy()
    col, col_abs = influence_sums(X, alpha, Xt, pred)
    if col_abs is None:
        col_abs = abs_sums_by_pass(X, alpha, Xt, pred, block)
    return top_i, top_v, bot_i, col, col_abs


def abs_sums_by_pass(X: np.ndarray, alpha: np.ndarray, Xt: np.ndarray, pred: np.ndarray, block: int):
    """Σ_t |r_i(t)| by blocks of test rows, for features with negative entries."""
    tf = _tf()
    x_const = tf.constant(X)
    alpha_t = tf.constant(np.ascontiguousarray(alpha.T, dtype=np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, X.shape[1]), tf.float32),
                                  tf.TensorSpec((None,), tf.int32)])
    def block_sums(xt, p):
        r = tf.matmul(xt, x_const, transpose_b=True) * tf.gather(alpha_t, p)
        return tf.reduce_sum(tf.abs(r), axis=0)

    out = np.zeros(len(X))
    for s in range(0, len(Xt), block):
        out += block_sums(Xt[s:s + block], pred[s:s + block].astype(np.int32)).numpy()
    return out


def run_bare(model_path: str, train_npz: str, test_npz: str) -> BareResult:
    """The same math as the job, as fast as we can do it in this process, stage by stage."""
    times: Dict[str, float] = {}
    busy0, own0, steal0 = busy_cpu_seconds(), own_cpu_seconds(), steal_cpu_seconds()
    t_all = time.perf_counter()

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        times[name] = time.perf_counter() - t0
        return out

    model, x, y, xt = timed("load", bare_load, model_path, train_npz, test_npz)
    X, Xt, test_logits = timed("featurize", bare_featurize, model, x, xt)
    theta, info = timed("fit", bare_fit, X, y, head_theta(model), LAM, BARE_GRAD_TOL)
    alpha = timed("alpha", bare_alpha, X, y, theta, LAM)
    pred = np.argmax(test_logits, axis=1)
    nonneg = bool((X >= 0).all() and (Xt >= 0).all())
    top_i, _top_v, bot_i, _, _ = timed("score", bare_score, X, alpha, Xt, pred)
    info["abs_sums"] = "closed form (features >= 0)" if nonneg else "by a pass over the values"
    wall = time.perf_counter() - t_all
    foreign = busy_cpu_seconds() - busy0 - (own_cpu_seconds() - own0)
    steal = steal_cpu_seconds() - steal0
    from distributed_influence.config import AuditConfig

    job_tol = {f.name: f.default for f in dataclasses.fields(AuditConfig)}["grad_tol"]  # the job's default
    newton = bare_newton_fit(X, y, head_theta(model), LAM, job_tol)
    return BareResult(times, info, top_i, bot_i, Contention(wall, max(0.0, foreign), steal), newton)
