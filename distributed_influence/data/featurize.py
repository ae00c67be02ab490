"""Rows of a source through the model, with the checks that only reading the rows can make.

Shared by the shard workers (training rows, test rows) and ``explain`` (new test rows).
"""

from __future__ import annotations

import numpy as np

from distributed_influence.data.model import Featurizer
from distributed_influence.errors import SourceError


def featurize(src, featurizer: Featurizer, input_shape, start: int, stop: int):
    """Rows [start, stop) of a source through the model: (augmented features, logits, ids,
    labels, keys), with NaN/inf refused in the inputs and in the features the model made of
    them. ``keys`` is None for sources without string keys, else a NumPy str array."""
    rows = src.read(start, stop, input_shape)
    check_finite(rows.x, src.name, start)
    if rows.y is not None and not src.labels_checked:
        check_label_range(src, rows.y, featurizer.split.n_classes, start)
    feats, logits = featurizer(rows.x, augment=True)
    check_finite(feats, f"{src.name}: the model's features", start)  # the 1s of the bias are finite
    keys = None if rows.keys is None else np.asarray(rows.keys, dtype=str)
    return feats, logits, rows.ids, rows.y, keys


def check_label_range(src, y: np.ndarray, n_classes: int, first_row: int) -> None:
    """Labels the driver could not check (they live inside the records) are checked as read."""
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        row = first_row + int(np.argmax(bad))
        where = src.where(row) if hasattr(src, "where") else f"{src.name}: row {row}"
        raise SourceError(f"{where}: label {int(y[int(np.argmax(bad))])} is outside 0..{n_classes - 1} "
                          f"(the model has {n_classes} classes)")


def check_finite(arr: np.ndarray, what: str, first_row: int) -> None:
    """Refuses NaN/inf early: one bad row would silently poison the head fit and every α.

    The minimum and maximum are finite exactly when every value is (both propagate NaN): two
    reductions without a mask of the array's size; the first bad row is looked for only then.
    """
    if not len(arr) or (np.isfinite(np.min(arr)) and np.isfinite(np.max(arr))):
        return
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    raise SourceError(f"{what}: NaN or inf values (first in row {first_row + int(np.argmax(bad))})")
