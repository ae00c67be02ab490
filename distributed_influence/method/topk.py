"""Exact merging of per-shard top-k lists.

Order is total: by value (descending for proponents, ascending for opponents), then by id
ascending. Each shard's top-k under this order contains every global top-k element that lives
in that shard, so concatenating the shards' lists and re-selecting gives exactly the global
top-k — the reducer never needs the full m×n matrix.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def merge_topk(
    values: Sequence[np.ndarray],
    ids: Sequence[np.ndarray],
    k: int,
    largest: bool,
    extras: Sequence[Sequence[np.ndarray]] = (),
) -> Tuple[np.ndarray, ...]:
    """Merges per-shard (m, k_s) candidate lists into the global (m, k) top-k.

    Args:
        values: per-shard arrays of representer values, each (m, k_s).
        ids: matching per-shard arrays of training ids, each (m, k_s).
        k: entries to keep; at most the total number of candidates.
        largest: True for proponents (largest first), False for opponents (smallest first).
        extras: further per-shard arrays aligned with ``values`` (e.g. α, similarity),
            carried along with the selection.

    Returns:
        (values, ids, *extras), each (m, k), ranked best first, ties broken by smaller id.
    """
    vals = np.concatenate([np.asarray(v) for v in values], axis=1)
    idx = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids], axis=1)
    if k > vals.shape[1]:
        raise ValueError(f"k={k} exceeds the {vals.shape[1]} candidates")
    key = -vals if largest else vals
    order = np.lexsort((idx, key), axis=-1)[:, :k]
    picked = [np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)]
    for extra in extras:
        picked.append(np.take_along_axis(np.concatenate(list(extra), axis=1), order, axis=1))
    return tuple(picked)

