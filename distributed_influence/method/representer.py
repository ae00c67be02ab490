"""The math of Representer Point Selection (Yeh et al., 2018), as pure functions.

Notation (docs/method.md): x_i = [f_i, 1] are the features with the bias folded in, Θ is the
(d+1)×C head, z_i = x_i Θ. Every function here works on one block of rows and returns *sums*,
so a distributed job adds the partial results of its shards and gets exactly the single-process
numbers. Nothing here knows about Ray.

Binary classifiers (one sigmoid output, Θ of shape (d+1)×1) use the same functions: with C = 1
the link is the sigmoid instead of the softmax and the loss the sigmoid cross-entropy, and the
gradient Xᵀ(p − t) and the Hessian product Xᵀ(P∘U − P∘rowsum(P∘U)) = Xᵀ(p(1−p)∘U) keep their
form. A test row then explains the logit of its predicted class: z for class 1, −z for class 0,
which :func:`~distributed_influence.method.logits.per_class` writes as two columns so that scoring works as for C classes.

Precision: features stay float32 (they are what the model computed); the head fit, α and the
decomposition run in float64 because the fit's residual gradient is exactly the error a user
sees in the decomposition (docs/method.md, "The fit"), and float32 sums stall far above 1e-7.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np

from distributed_influence.method.cpu_sums import rows_times
from distributed_influence.method.logits import per_class
from distributed_influence.tfimport import import_tensorflow

tf = import_tensorflow()
log = logging.getLogger(__name__)

#: Rows per float64 block in the objective: bounds the float64 copy of a shard's features.
ROW_BLOCK = 8192
#: Logits per tape of the α pass at most (rows × C): its float64 tensors (logits, targets,
#: gradient, α) then hold a few tens of MB whatever the number of classes.
TAPE_ELEMENTS = 1 << 20
#: Rows per float64 cast of features (:func:`float64_blocks`): a 13 MB buffer at d = 1600.
CAST_BLOCK = 1024
#: Bounds of one step of a many-direction Hessian product: columns of U = XV, and rows.
MULTI_HVP_COLUMNS = 1024
MULTI_HVP_ROWS = 4096


def augment(features: np.ndarray) -> np.ndarray:
    """Appends the constant 1 that folds the bias into the head: (n, d) → (n, d+1) float32."""
    f = np.asarray(features, dtype=np.float32)
    return np.concatenate([f, np.ones((len(f), 1), dtype=np.float32)], axis=1)


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), n_classes), dtype=np.float64)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+e^−z), without overflow warnings


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Class probabilities (n, C) of model logits: softmax, or [1 − σ(z), σ(z)] for one column."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 1:
        p = sigmoid(logits)
        return np.concatenate([1.0 - p, p], axis=1)
    return softmax(logits)


def label_probabilities(logits: np.ndarray, *labels: np.ndarray):
    """Each row's probability of its label (:func:`probabilities`), a block of rows at a time:
    the (n, C) float64 matrix of all of them is 1.5 × a shard's features at C = 100.

    Given several label arrays (the given labels and the model's classes, say), one softmax
    per block serves them all.

    Returns:
        (n,) float64, or a tuple of them, one per label array.
    """
    n = len(labels[0])
    outs = [np.empty(n, dtype=np.float64) for _ in labels]
    for a, b in row_blocks(n, ROW_BLOCK):
        p = probabilities(logits[a:b])
        for out, lab in zip(outs, labels):
            out[a:b] = p[np.arange(b - a), lab[a:b]]
    return outs[0] if len(outs) == 1 else tuple(outs)


def fit_targets(labels: np.ndarray, logits: np.ndarray, target: str) -> np.ndarray:
    """The targets t_i of the head fit, shaped like the logits (n, C) float64.

    ``labels``: one-hot labels (the label 0/1 itself for one sigmoid output); ``predictions``:
    the model's softmax (its σ(z)).
    """
    n_out = np.asarray(logits).shape[1]
    if target == "labels":
        return label_targets(labels, n_out)
    return sigmoid(logits) if n_out == 1 else softmax(logits)


def label_targets(labels: np.ndarray, n_out: int) -> np.ndarray:
    """Targets of a fit to labels: one-hot (n, C), or the label 0/1 itself for one output."""
    if n_out == 1:
        return np.asarray(labels, dtype=np.float64).reshape(-1, 1)
    return one_hot(labels, n_out)


class RowTargets:
    """The fit's targets t_i of a shard's rows, made block by block (``targets[a:b]``) from the
    labels or the logits the worker keeps anyway.

    Kept whole they would be an (n, C) float64 matrix: with 100 classes and d = 128 that is
    1.5 × the shard's features, a large share of a worker's peak memory.
    """

    def __init__(self, labels: np.ndarray, logits: np.ndarray, target: str):
        self.labels, self.target = labels, target
        self.shape = (len(logits), np.shape(logits)[1])
        # One-hot labels need only the number of classes: the logits are kept for "predictions".
        self.logits = logits if target != "labels" else None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if self.logits is None:
            return label_targets(self.labels[rows], self.shape[1])
        return fit_targets(self.labels[rows], self.logits[rows], self.target)

    def dense(self) -> np.ndarray:
        return self[:]


PRECISIONS = {"float64": tf.float64, "float32": tf.float32}


def _row_blocks(x, t, precision: str):
    """Row blocks of a shard: float64 work is done blockwise to bound the upcast copy.

    A single block is the arrays themselves: slicing a resident tensor would copy it whole on
    every one of the fit's hundreds of evaluations.
    """
    n = int(x.shape[0])
    step = ROW_BLOCK if precision == "float64" else max(n, 1)
    if step >= n:
        yield x, t
        return
    for s in range(0, n, step):
        yield x[s : s + step], (None if t is None else t[s : s + step])


def _loss_sum(t, z, binary: bool):
    """Σ_i L(z_i, t_i): softmax cross-entropy, or sigmoid cross-entropy for one output."""
    if binary:
        return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=t, logits=z))
    return tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=t, logits=z))


def _link(z, binary: bool):
    return tf.sigmoid(z) if binary else tf.nn.softmax(z)


@tf.function(reduce_retracing=True, autograph=False)
def _objective_block(x, t, theta, binary):
    # ``binary`` is a Python bool: part of the trace's signature, so each link traces once.
    xc = tf.cast(x, theta.dtype)
    z = tf.matmul(xc, theta)
    tc = tf.cast(t, theta.dtype)
    loss = _loss_sum(tc, z, binary)
    grad = tf.matmul(xc, _link(z, binary) - tc, transpose_a=True)
    return loss, grad


def objective_sums(x, targets, theta: np.ndarray, precision: str = "float64") -> Tuple[float, np.ndarray]:
    """Σ_i CE(softmax(x_i Θ), t_i) and its gradient Σ_i x_iᵀ(p_i − t_i) over a block of rows.

    With one column (a binary classifier) the loss is the sigmoid cross-entropy and p_i = σ(z_i).

    The full objective is J = sum/n + λ‖Θ‖², ∇J = grad/n + 2λΘ; the regulariser is added once
    by whoever knows n (the driver), so shards only return sums.

    Args:
        x: (n, d+1) float32 augmented features (array or resident tensor).
        targets: (n, C) target distributions (one-hot labels or model softmax).
        theta: (d+1, C) head.
        precision: ``float64`` (the fit's final, exact evaluations) or ``float32`` (its cheap
            first phase: several times faster, accurate to ~1e-6 relative).

    Returns:
        (loss sum as float, gradient sum (d+1, C) float64).
    """
    dtype = PRECISIONS[precision]
    theta = tf.constant(theta, dtype=dtype)
    loss = 0.0
    grad = np.zeros(theta.shape, dtype=np.float64)
    for xb, tb in _row_blocks(x, targets, precision):
        lb, gb = _objective_block(xb, tb, theta, int(theta.shape[1]) == 1)
        loss += float(lb)
        grad += gb.numpy()
    return loss, grad


@tf.function(reduce_retracing=True, autograph=False)
def _probs_block(x, theta, binary):
    return _link(tf.matmul(tf.cast(x, theta.dtype), theta), binary)


@tf.function(reduce_retracing=True, autograph=False)
def _hvp_block(x, p, v):
    xc = tf.cast(x, v.dtype)
    pu = p * tf.matmul(xc, v)
    return tf.matmul(xc, pu - p * tf.reduce_sum(pu, axis=1, keepdims=True), transpose_a=True)


def softmax_blocks(x, theta: np.ndarray, precision: str = "float64") -> list:
    """softmax(XΘ) (σ(XΘ) for one column) per row block: fixed during one Newton step, so
    computed once for all its Hessian-vector products (each then reads the features twice
    instead of three times)."""
    binary = int(np.shape(theta)[1]) == 1
    theta = tf.constant(theta, dtype=PRECISIONS[precision])
    return [_probs_block(xb, theta, binary) for xb, _ in _row_blocks(x, None, precision)]


def hvp_sums(x, theta: np.ndarray, v: np.ndarray, precision: str = "float64", probs=None,
             stride: int = 1) -> np.ndarray:
    """Σ_i of the cross-entropy Hessian at Θ applied to V: Xᵀ(P∘U − P∘rowsum(P∘U)), U = XV.

    The same formula is the logistic Hessian Xᵀ(p(1−p)∘U) for one column, where P = σ(XΘ).

    Hessian-vector products let Newton steps finish the fit to ~1e-12, which L-BFGS alone
    does not reach reliably (docs/method.md, "The fit"). They only steer the step, so float32 products
    are enough; the gradient that judges each step stays float64.

    Args:
        v: (d+1, C) one direction, or (d+1, C, l) l directions at once. A pass over the
            features costs about the same for one direction as for dozens (it is bound by
            reading the features from memory), which is what makes the fit's sketch of the
            Hessian cheap.
        probs: :func:`softmax_blocks` at this Θ and precision, if already at hand.
        stride: > 1: the sum over every stride-th row only, scaled to all rows (the fit's
            sketch of the Hessian, see ``fit.sketch_stride``); ``probs`` is then ignored.

    Returns:
        float64 array shaped like ``v``.
    """
    if stride > 1:
        sample = x[::stride]
        return hvp_sums(sample, theta, v, precision) * (int(x.shape[0]) / max(1, int(sample.shape[0])))
    if probs is None:
        probs = softmax_blocks(x, theta, precision)
    dtype = PRECISIONS[precision]
    out = np.zeros(v.shape, dtype=np.float64)
    if v.ndim == 2:
        vt = tf.constant(v, dtype=dtype)
        for (xb, _), p in zip(_row_blocks(x, None, precision), probs):
            out += _hvp_block(xb, p, vt).numpy()
        return out
    # Many directions: columns in chunks and rows in blocks bound the (rows × C·l) temporaries.
    step = max(1, MULTI_HVP_COLUMNS // v.shape[1])
    for c0 in range(0, v.shape[2], step):
        vt = tf.constant(v[:, :, c0:c0 + step], dtype=dtype)
        for (xb, _), p in zip(_row_blocks(x, None, precision), probs):
            rows = int(xb.shape[0])
            for a, b in row_blocks(rows, MULTI_HVP_ROWS):
                xs = xb if (a, b) == (0, rows) else xb[a:b]
                out[:, :, c0:c0 + step] += _hvp_multi_block(xs, p[a:b], vt).numpy()
    return out


@tf.function(reduce_retracing=True, autograph=False)
def _hvp_multi_block(x, p, v):
    d1, n_classes, width = tf.shape(v)[0], tf.shape(v)[1], tf.shape(v)[2]
    xc = tf.cast(x, v.dtype)
    u = tf.reshape(tf.matmul(xc, tf.reshape(v, [d1, n_classes * width])), [-1, n_classes, width])
    pu = p[:, :, None] * u
    w = pu - p[:, :, None] * tf.reduce_sum(pu, axis=1, keepdims=True)
    out = tf.matmul(xc, tf.reshape(w, [-1, n_classes * width]), transpose_a=True)
    return tf.reshape(out, [d1, n_classes, width])


def alpha_by_tape(x: np.ndarray, theta: np.ndarray, targets: np.ndarray, lam: float, n_total: int) -> np.ndarray:
    """α_i = −1/(2λn) · ∂L(z_i, t_i)/∂z_i for a batch, by one GradientTape.

    The *whole* logits tensor is watched by the tape (computed before it, or in
    :func:`alpha_pass` by NumPy, the same float64 values); the gradient of the summed
    per-example loss w.r.t. it is (n, C), and classes are sliced only afterwards. Taking the
    gradient w.r.t. ``logits[:, j]`` instead returns None, because that slice is created after
    the loss and is not on the path to it (the bug this project exists to get right).

    Args:
        x: (n, d+1) float32 augmented features of the batch.
        theta: (d+1, C) float64 fitted head.
        targets: (n, C) float64 targets t_i.
        lam: the fit's λ.
        n_total: the number of training examples in the *whole* training set (the n of J).

    Returns:
        (n, C) float64 α; (n, 1) for a binary head, which :func:`~distributed_influence.method.logits.per_class` turns into the α
        of classes 0 and 1.
    """
    return _alpha_block(tf.cast(tf.constant(x), tf.float64), theta, targets, lam, n_total).numpy()


def _alpha_block(x64, theta: np.ndarray, targets: np.ndarray, lam: float, n_total: int):
    return _alpha_of_logits(tf.matmul(x64, tf.constant(theta, dtype=tf.float64)), targets, lam, n_total)


def _alpha_of_logits(logits, targets: np.ndarray, lam: float, n_total: int):
    """The tape of :func:`alpha_by_tape` on logits already computed: the whole (rows, C) tensor
    is watched, the per-example losses summed, and the gradient taken w.r.t. all of it."""
    logits = tf.convert_to_tensor(logits, dtype=tf.float64)
    t = tf.constant(targets, dtype=tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        # Summed (not averaged) per-example loss: each row's gradient is its own ∂L_i/∂z_i.
        # One column: the sigmoid cross-entropy of a binary classifier's single logit.
        loss = _loss_sum(t, logits, int(logits.shape[1]) == 1)
    grad = tape.gradient(loss, logits)
    return grad / (-2.0 * lam * n_total)


def alpha_pass(x: np.ndarray, theta: np.ndarray, targets: np.ndarray, lam: float, n_total: int,
               class_sums: np.ndarray, abs_sums: bool = False, error_sums: Optional[np.ndarray] = None):
    """α of a shard (the tape of :func:`alpha_by_tape`), Σ_i x_iᵀα_i and the per-train sums.

    All three need the shard's features in float64: each row block is cast (into one reused
    buffer, :func:`float64_blocks`) and one NumPy product gives the block's logits; only the
    (rows, C) logits go through TensorFlow's tape, ROW_BLOCK rows per tape; a second cast pass
    gives Σ_i x_iᵀα_i and, from each block's x_i·S_c, the per-train sums (:func:`train_sums`).
    Why two passes: a tape has a fixed cost, so one tape per (small) cast block would cost far
    more than a tape per ROW_BLOCK rows, and the second cast costs less than the tapes it saves.
    The similarities x_i·S_c are never kept whole: at C = 1,000 they would be another (n, C)
    float64 array, the size of α, through the whole scoring.

    Args:
        x: (n, d+1) float32 augmented features.
        theta, targets, lam, n_total: as for :func:`alpha_by_tape`.
        class_sums: (C, d+1) float64 S_c, the sums of test features per explained class.
        abs_sums: also Σ_t |r_ti| by the closed form, valid only when every feature (train and
            test) is ≥ 0 (the caller knows; see :func:`train_sums`).
        error_sums: (C, d+1) float64 E_c, the sums of the features of the test rows the model
            gets wrong, per predicted class (:func:`class_sums` with −1 for the right ones), for
            ``error_influence``. Its similarities come from the same product as S_c's (the two
            stacked side by side), so the extra sum costs a wider GEMM, not a second pass.

    Returns:
        (α (n, C), Σ_i x_iᵀα_i (d+1, C), {"influence_sum": (n,), "influence_abs_sum": (n,)
        with ``abs_sums``, "error_influence": (n,) with ``error_sums``}), all float64.
    """
    alpha = np.empty((len(x), theta.shape[1]))  # the logits first, then α in their place
    theta64 = np.asarray(theta, np.float64)
    theta_t = np.ascontiguousarray(theta64.T)
    for a, b, x64 in float64_blocks(x):
        alpha[a:b] = rows_times(x64, theta64, theta_t)
    # Rows per tape: ROW_BLOCK (read now: tests split a few rows into tapes), fewer for a wide
    # head, whose tape holds several (rows × C) float64 tensors at once.
    tape_rows = max(1, min(ROW_BLOCK, TAPE_ELEMENTS // max(1, theta.shape[1])))
    for a, b in row_blocks(len(x), tape_rows):
        alpha[a:b] = _alpha_of_logits(alpha[a:b], targets[a:b], lam, n_total).numpy()
    head = np.zeros(theta.shape)
    sums = {"influence_sum": np.empty(len(x))}
    if abs_sums:
        sums["influence_abs_sum"] = np.empty(len(x))
    stacked = np.asarray(class_sums, np.float64)
    if error_sums is not None:
        sums["error_influence"] = np.empty(len(x))
        stacked = np.concatenate([stacked, np.asarray(error_sums, np.float64)])
    s64 = stacked.T
    s_t = np.ascontiguousarray(stacked)
    for a, b, x64 in float64_blocks(x):
        head += (alpha[a:b].T @ x64).T
        # A binary head's α as [−α, α] (classes 0 and 1), like the class sums.
        block_train_sums(per_class(alpha[a:b]), rows_times(x64, s64, s_t), sums, a)
    return alpha, head, sums


def block_train_sums(alpha: np.ndarray, sims: np.ndarray, out: dict, start: int) -> None:
    """The per-train sums of rows [start, start + len(alpha)) from their α and x_i·S_c:
    Σ_t r_ti = Σ_c α_ic (x_i·S_c) by linearity, and, when every similarity is positive
    (non-negative features: x_i·x_t ≥ 1 with the bias 1), Σ_t |r_ti| = Σ_c |α_ic| (x_i·S_c).
    Summed row by row, so the values do not depend on the blocks.

    With ``error_influence`` in ``out``, ``sims`` holds x_i·E_c after the C columns of x_i·S_c
    (E_c: the wrongly predicted test rows of predicted class c), and Σ_c α_ic (x_i·E_c) is
    Σ_{t wrong} r_ti toward each such row's (wrong) predicted class."""
    stop = start + len(alpha)
    n_classes = alpha.shape[1]
    on_explained = sims[:, :n_classes]
    out["influence_sum"][start:stop] = np.sum(alpha * on_explained, axis=1)
    if "influence_abs_sum" in out:
        out["influence_abs_sum"][start:stop] = np.sum(np.abs(alpha) * on_explained, axis=1)
    if "error_influence" in out:
        out["error_influence"][start:stop] = np.sum(alpha * sims[:, n_classes:], axis=1)


def row_blocks(n: int, size: int = ROW_BLOCK):
    """[start, stop) ranges covering n rows: float64 work on features goes block by block, so
    no process ever holds a float64 copy of a whole shard (twice the float32 features)."""
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def float64_blocks(x: np.ndarray, size: Optional[int] = None):
    """(start, stop, rows [start, stop) of x in float64) for all rows, ``size`` (default
    CAST_BLOCK) at a time, cast into one reused buffer: workers map every allocation above a few
    MB afresh (``cluster.actor.MMAP_THRESHOLD``), so a new float64 block per step would cost fresh
    zeroed pages each time."""
    size = size or CAST_BLOCK
    buf = np.empty((min(size, len(x)), x.shape[1]))
    for a, b in row_blocks(len(x), size):
        np.copyto(buf[:b - a], x[a:b])
        yield a, b, buf[:b - a]


def linear_logits(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """x_i Θ for every row in float64 (n, C), e.g. the surrogate's logits."""
    theta = np.asarray(theta, np.float64)
    theta_t = np.ascontiguousarray(theta.T)
    out = np.empty((len(x), theta.shape[1]))
    for a, b, x64 in float64_blocks(x):
        out[a:b] = rows_times(x64, theta, theta_t)
    return out


class RowParts:
    """Row-wise parts (e.g. object-store arrays, one per worker that computed them) read as one
    matrix without concatenating them: a slice within a part is a zero-copy view; only a slice
    across parts (one test block) is copied."""

    def __init__(self, parts):
        self.parts = [parts] if isinstance(parts, np.ndarray) else list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b)."""
        pieces = []
        for p, s in zip(self.parts, self.starts[:-1]):
            lo, hi = max(a - s, 0), min(b - s, len(p))
            if lo < hi:
                pieces.append(p[lo:hi])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else self.parts[0][:0]

    def pieces(self, pred: np.ndarray):
        """(part, the part's slice of ``pred``) for each part."""
        return [(p, pred[s:s + len(p)]) for p, s in zip(self.parts, self.starts[:-1])]


def class_sums(test_x, test_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """S_c = Σ_{t: j_t = c} x_t, float64 (C, d+1), as one product with the one-hot of j_t per
    part of the test features (an array or a :class:`RowParts`). Rows whose class is negative
    are left out (the right predictions, for the sums over the wrong ones)."""
    parts = RowParts(test_x) if not isinstance(test_x, RowParts) else test_x
    out = np.zeros((n_classes, parts.parts[0].shape[1] if parts.parts else 0))
    for p, pred in parts.pieces(test_pred):
        for a, b, x64 in float64_blocks(np.asarray(p)):
            cls = np.asarray(pred[a:b])
            keep = cls >= 0
            if not keep.all():
                x64, cls = x64[keep], cls[keep]
            out += one_hot(cls, n_classes).T @ x64
    return out

