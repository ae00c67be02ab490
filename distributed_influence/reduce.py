"""The reducer: merges the shards' partial results into the tables of DESIGN.md §3."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa

from . import tables
from .topk import merge_topk

KINDS = ("proponent", "opponent")


def merge_topk_table(results: List[dict], k: int, test_ids: np.ndarray, test_pred: np.ndarray) -> pa.Table:
    """Exact global top-k per test example and kind from the shards' partial lists.

    Rows are ordered by test example (source order), then proponents before opponents, then rank.
    """
    m = len(test_ids)
    cols = {name: [] for name in ("values", "ids", "alpha", "similarity")}
    for kind in KINDS:
        merged = merge_topk(
            [r["topk"][kind]["values"] for r in results],
            [r["topk"][kind]["ids"] for r in results],
            k,
            largest=(kind == "proponent"),
            extras=[[r["topk"][kind][name] for r in results] for name in ("alpha", "similarity")],
        )
        for name, arr in zip(("values", "ids", "alpha", "similarity"), merged):
            cols[name].append(arr)
    stacked = {name: np.stack(arrs, axis=1).reshape(m * 2 * k) for name, arrs in cols.items()}
    shape = (m, 2, k)
    return tables.to_table(
        {
            "test_id": np.broadcast_to(test_ids[:, None, None], shape).ravel(),
            "predicted_class": np.broadcast_to(test_pred[:, None, None], shape).ravel().astype(np.int32),
            "kind": np.broadcast_to(np.array(KINDS, dtype=object)[None, :, None], shape).ravel(),
            "rank": np.broadcast_to(np.arange(1, k + 1, dtype=np.int32)[None, None, :], shape).ravel(),
            "train_id": stacked["ids"],
            "representer_value": stacked["values"],
            "alpha": stacked["alpha"],
            "similarity": stacked["similarity"],
        },
        tables.TOPK_SCHEMA,
    )


def audit_ranks(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """1 = most suspicious: by score descending, ties by smaller id."""
    order = np.lexsort((ids, -scores))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def train_table(results: List[dict]) -> pa.Table:
    """One row per training example, in id order, with audit scores and ranks."""
    cols = {name: np.concatenate([r["train"][name] for r in results]) for name in results[0]["train"]}
    order = np.argsort(cols["train_id"], kind="stable")
    cols = {name: arr[order] for name, arr in cols.items()}
    score = np.abs(cols["alpha_label"])
    cols["audit_score"] = score
    cols["audit_rank"] = audit_ranks(score.astype(np.float32), cols["train_id"])
    return tables.to_table(cols, tables.TRAIN_SCHEMA)


def test_table(test_ids: np.ndarray, test_labels: Optional[np.ndarray], test_pred: np.ndarray,
               model_logits: np.ndarray, surrogate_logits: np.ndarray,
               alpha_head_logits: np.ndarray) -> Dict[str, object]:
    """Per-test decomposition check: Σ_i r_ij(t) against the surrogate logit z_tj.

    Σ_i r_ij(t) = Σ_i α_ij (x_i·x_t) = x_t · (Σ_i x_iᵀ α_i)[:, j] exactly (linearity), so the
    shards' float64 x_t Σ_(i in shard) x_iᵀα_i, added up, give the sum over *all* training
    examples without the float32 rounding of n separate terms.

    Args:
        surrogate_logits: (m, C) x_t Θ.
        alpha_head_logits: (m, C) x_t Σ_i x_iᵀα_i summed over all shards.

    Returns:
        dict with the ``table`` and summary numbers for the manifest.
    """
    rows = np.arange(len(test_ids))
    surrogate = surrogate_logits[rows, test_pred]
    rep_sum = alpha_head_logits[rows, test_pred]
    err = np.abs(rep_sum - surrogate)
    labels = pa.nulls(len(test_ids), pa.int32()) if test_labels is None else test_labels
    table = tables.to_table(
        {
            "test_id": test_ids,
            "label": labels,
            "predicted_class": test_pred,
            "model_logit": model_logits[rows, test_pred],
            "surrogate_logit": surrogate,
            "representer_sum": rep_sum,
            "decomposition_error": err,
        },
        tables.TEST_SCHEMA,
    )
    rel = err / np.maximum(1.0, np.abs(surrogate))
    return {
        "table": table,
        "max_error": float(err.max()) if len(err) else 0.0,
        "max_relative_error": float(rel.max()) if len(rel) else 0.0,
    }
