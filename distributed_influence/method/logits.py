"""What the model's logits say, in NumPy alone: the class explained and the surrogate's fidelity.

Kept apart from :mod:`representer` (which loads TensorFlow) because the driver and the reduce
tasks need these and nothing else of the math: neither imports TensorFlow.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def per_class(a: np.ndarray) -> np.ndarray:
    """Per-class columns of logits, α or a head: one column (a binary classifier's z) becomes
    [−a, a], the values explaining class 0 and class 1; C ≥ 2 columns are returned unchanged.

    The binary surrogate has one logit z; class 1 is explained by z and class 0 by −z, and
    since r_i(t) is linear in α, the representer values of class 0 are those of −α.
    """
    a = np.asarray(a)
    return np.concatenate([-a, a], axis=-1) if a.shape[-1] == 1 else a


def predicted_classes(logits: np.ndarray) -> np.ndarray:
    """The model's class per row: argmax, or z > 0 (σ(z) > 0.5) for one column; int64."""
    logits = np.asarray(logits)
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return np.argmax(logits, axis=1).astype(np.int64)


def fidelity_moments(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sums from which Pearson r and mean |a−b| of two logit arrays follow, added across shards.

    Returns:
        float64 [count, Σa, Σb, Σa², Σb², Σab, Σ|a−b|].
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return np.array([a.size, a.sum(), b.sum(), a @ a, b @ b, a @ b, np.abs(a - b).sum()])


def fidelity_from_moments(m: np.ndarray) -> dict:
    """Pearson correlation and mean absolute difference from summed :func:`fidelity_moments`."""
    n, sa, sb, saa, sbb, sab, sad = (float(v) for v in m)
    if n == 0:
        return {"pearson": float("nan"), "mean_abs_diff": float("nan")}
    cov = sab - sa * sb / n
    va = saa - sa * sa / n
    vb = sbb - sb * sb / n
    pearson = cov / np.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")
    return {"pearson": float(pearson), "mean_abs_diff": sad / n}


def error_classes(labels: Optional[np.ndarray], pred: np.ndarray) -> Optional[np.ndarray]:
    """The predicted class of each test row the model gets wrong, −1 for the rows it gets right.

    They are the classes of E_c, the sums behind ``error_influence``
    (:func:`~distributed_influence.method.representer.class_sums` leaves out the −1 rows).
    None without test labels: no row is then known to be wrong."""
    if labels is None:
        return None
    pred = np.asarray(pred)
    return np.where(np.asarray(labels) != pred, pred, -1).astype(np.int32)
