"""The reducer: merges the shards' partial results into the tables of docs/outputs.md.

Partials live in the run's work area, one pair of Parquet files per shard written by the
worker that scored it: its top-k candidates for every test row (row groups of
``PARTIAL_GROUP`` test rows, so a reader takes any range of test rows without the rest) and
its per-train rows. Reduce calls (here "tasks"), one per range of test rows (and one per range
of training rows), read only their range from every shard, merge it exactly and write one part
file of each table. The functions here are pure (files in, files out, small summaries back): a
Ray run calls them on its workers once they have dropped their shards (``RayPool.run_functions``:
re-run elsewhere if a worker is lost), the single-process engine calls them directly.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_influence.method.logits import (  # NumPy only, like everything the reduce needs
    fidelity_moments,
    per_class,
)
from distributed_influence.method.records import ABS_SKIPPED, ABS_SUM_SKIPPED, ERR_NO_LABELS, ERR_SKIPPED
from distributed_influence.method.topk import merge_topk
from distributed_influence.store import storage, tables
from distributed_influence.store.columns import fixed_list, matrix

KINDS = ("proponent", "opponent")
FIELDS = ("values", "ids", "alpha", "similarity")
#: Test rows per row group of a shard's partial top-k file: the unit a reduce task reads.
PARTIAL_GROUP = 4096
#: Test rows per reduce task and part file of ``influence_topk``/``test_scores``: 16,384 rows
#: of 16 shards' top-10 lists are ~100 MB of candidates in one task.
REDUCE_ROWS = 4 * PARTIAL_GROUP
#: Subdirectory of the run's work area for the shards' partials.
PARTIAL_DIR = "partials"


# ---------------------------------------------------------------------------- shard partials
def topk_file(partial_dir: str, shard: int) -> str:
    return storage.join(partial_dir, f"shard-{shard:05d}-topk.parquet")


def test_file(partial_dir: str, shard: int) -> str:
    return storage.join(partial_dir, f"shard-{shard:05d}-test.parquet")


def train_file(partial_dir: str, shard: int) -> str:
    return storage.join(partial_dir, f"shard-{shard:05d}-train.parquet")


def write_partial(partial_dir: str, shard: int, result: dict) -> None:
    """Writes a shard's scored partials (from ``ShardWorker.score``) where reduce tasks read them.

    Written by the worker that scored the shard, atomically, so that the driver never holds
    them and a restarted worker that writes them again changes nothing.
    """
    topk = pa.table({f"{kind}_{field}": fixed_list(result["topk"][kind][field])
                     for kind in KINDS for field in FIELDS})
    storage.write_atomic(topk_file(partial_dir, shard), lambda fh: pq.write_table(
        topk, fh, row_group_size=PARTIAL_GROUP, compression="none", use_dictionary=False))
    test = {"rep_sum": pa.array(np.asarray(result["test"]["rep_sum"], np.float64))}
    if "surrogate" in result["test"]:
        test["surrogate"] = fixed_list(np.asarray(result["test"]["surrogate"], np.float64))
        test["model"] = fixed_list(np.asarray(result["test"]["model"], np.float32))
    storage.write_atomic(test_file(partial_dir, shard), lambda fh: pq.write_table(
        pa.table(test), fh, row_group_size=PARTIAL_GROUP, compression="none", use_dictionary=False))
    train = pa.table({name: np.asarray(col) for name, col in result["train"].items()})
    storage.write_atomic(train_file(partial_dir, shard), lambda fh: pq.write_table(
        train, fh, compression="none", use_dictionary=False))


def read_partial_topk(path: str, start: int, stop: int) -> dict:
    """Test rows [start, stop) of one shard's partial top-k, reading only their row groups."""
    t = _read_range(path, start, stop)
    dtypes = {"values": np.float32, "ids": np.int64, "alpha": np.float32, "similarity": np.float32}
    return {kind: {field: matrix(t.column(f"{kind}_{field}"), dtypes[field]) for field in FIELDS}
            for kind in KINDS}


def read_partial_test(path: str, start: int, stop: int) -> dict:
    """Test rows [start, stop) of one shard's decomposition pieces (``rep_sum``, and
    ``surrogate`` and the ``model``'s logits from shard 0)."""
    t = _read_range(path, start, stop)
    out = {"rep_sum": t.column("rep_sum").to_numpy()}
    if "surrogate" in t.column_names:
        out["surrogate"] = matrix(t.column("surrogate"), np.float64)
        out["model"] = matrix(t.column("model"), np.float32)
    return out


def _read_range(path: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a partial file written in row groups, reading only those groups."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as fh:
        pf = pq.ParquetFile(fh)
        groups, first, row = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < stop and row + n > start:
                groups.append(g)
                first = row if first is None else first
            row += n
        if stop > row or start < 0:
            raise ValueError(f"{path}: has {row} test rows, asked for [{start}, {stop})")
        return pf.read_row_groups(groups).slice(start - (first or 0), stop - start)


def read_partial_train(path: str) -> Dict[str, np.ndarray]:
    fs, p = storage.resolve(path)
    t = pq.read_table(p, filesystem=fs)
    return {name: t.column(name).to_numpy() for name in t.column_names}


def reduce_test_range(part: int, start: int, stop: int, topk_files: List[str], test_files: List[str],
                      k: int, test: Dict[str, np.ndarray], out_dirs: Dict[str, str],
                      train_keys: Optional[tuple] = None) -> dict:
    """One reduce task: test rows [start, stop) of ``influence_topk`` and ``test_scores``.

    Everything it needs is on storage or in its arguments, not in any worker's memory or
    object store: a task re-run on another node after a loss gives the same part.

    Args:
        part: the part number (the range's place in test-row order).
        start, stop: the test rows.
        topk_files: every shard's partial top-k file.
        test_files: every shard's decomposition pieces, shard 0's first (it holds x_t Θ).
        k: entries kept per test row and kind.
        test: this range's per-row vectors: ``ids``, ``labels`` (or None) and ``pred``;
            ``keys`` too when the test source has string keys. (The model's logits, one column
            for a binary model whose class 0 is explained by −z, come from shard 0's partial.)
        out_dirs: where the parts of ``influence_topk`` and ``test_scores`` go.
        train_keys: (train ids, their string keys) when the training source has keys.

    Returns:
        Small summaries: rows, decomposition errors, fidelity moments, seconds.
    """
    t0 = time.perf_counter()
    partials = [{"topk": read_partial_topk(f, start, stop)} for f in topk_files]
    topk = merge_topk_table(partials, k, test["ids"], test["pred"])
    del partials
    if train_keys is not None:
        topk = tables.add_key_column(topk, "train_id", tables.TRAIN_KEY, *train_keys)
    if test.get("keys") is not None:
        topk = tables.add_key_column(topk, "test_id", tables.TEST_KEY, test["ids"], test["keys"])
    tables.write_part(out_dirs[tables.INFLUENCE_TOPK], part, topk)
    pieces = [read_partial_test(f, start, stop) for f in test_files]
    surrogate, model = pieces[0]["surrogate"], pieces[0]["model"]
    # Σ over shards of x_t Σ_(i in shard) x_iᵀα_i = x_t Σ_i x_iᵀα_i, added in float64.
    rep_sum = np.sum([p["rep_sum"] for p in pieces], axis=0)
    dec = test_table(test["ids"], test.get("labels"), test["pred"], per_class(model),
                     per_class(surrogate), rep_sum)
    table = dec["table"]
    if test.get("keys") is not None:
        table = tables.add_key_column(table, "test_id", tables.TEST_KEY, test["ids"], test["keys"])
    tables.write_part(out_dirs[tables.TEST_SCORES], part, table)
    return {"part": part, "rows": stop - start, "max_error": dec["max_error"],
            "max_relative_error": dec["max_relative_error"],
            "fidelity": fidelity_moments(surrogate, model), "seconds": time.perf_counter() - t0}


def reduce_train_range(part: int, sources: List[tuple], positions: np.ndarray, ranks: np.ndarray,
                       out_dir: str) -> dict:
    """One reduce task: a range of ``train_scores`` rows, in train-id order.

    Args:
        part: the part number.
        sources: (partial train file, first position) of every shard holding rows of the
            range; positions count rows over all shards in shard order.
        positions: for each output row (in id order), its position over all shards.
        ranks: the global ``audit_rank`` of each output row.
        out_dir: where the part of ``train_scores`` goes.
    """
    t0 = time.perf_counter()
    cols: Dict[str, list] = {}
    where = np.empty(len(positions), dtype=np.int64)
    base = 0
    for path, first in sources:
        rows = read_partial_train(path)
        n = len(rows["train_id"])
        mine = (positions >= first) & (positions < first + n)
        where[mine] = positions[mine] - first + base
        base += n
        for name, arr in rows.items():
            cols.setdefault(name, []).append(arr)
    merged = {name: np.concatenate(arrs)[where] for name, arrs in cols.items()}
    merged["audit_score"] = np.abs(merged["alpha_label"])
    merged["audit_rank"] = ranks
    table = tables.to_table(merged, tables.TRAIN_SCHEMA)
    if tables.TRAIN_KEY in merged:  # a source with string keys (docs/outputs.md)
        table = table.append_column(tables.TRAIN_KEY, pa.array(merged[tables.TRAIN_KEY], pa.string()))
    tables.write_part(out_dir, part, table)
    return {"part": part, "rows": len(positions), "seconds": time.perf_counter() - t0}


def train_plan(ids_per_shard: List[np.ndarray], scores_per_shard: List[np.ndarray], bounds: List[tuple]):
    """The global audit ranks and the train reduce tasks' inputs, from per-row vectors only.

    Args:
        ids_per_shard, scores_per_shard: each shard's train ids and |α_{i,y_i}|.
        bounds: [start, stop) of each part in id order. With the shards' own row bounds, a
            source whose ids grow with the row number gives one shard per part.

    Returns:
        list of (sources as shard indices with first positions, positions, ranks) per part,
        in train-id order.
    """
    ids = np.concatenate(ids_per_shard)
    scores = np.concatenate(scores_per_shard).astype(np.float32)
    ranks = audit_ranks(scores, ids)
    order = np.argsort(ids, kind="stable")
    firsts = np.cumsum([0] + [len(i) for i in ids_per_shard])
    plan = []
    for a, b in bounds:
        pos = order[a:b]
        shard_of = np.searchsorted(firsts, pos, side="right") - 1
        used = sorted(set(np.unique(shard_of).tolist()))
        plan.append(([(s, int(firsts[s])) for s in used], pos, ranks[pos]))
    return plan


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


def test_table(test_ids: np.ndarray, test_labels: Optional[np.ndarray], test_pred: np.ndarray,
               model_logits: np.ndarray, surrogate_logits: np.ndarray,
               alpha_head_logits: np.ndarray) -> Dict[str, object]:
    """Per-test decomposition check: Σ_i r_ij(t) against the surrogate logit z_tj.

    Σ_i r_ij(t) = Σ_i α_ij (x_i·x_t) = x_t · (Σ_i x_iᵀ α_i)[:, j] exactly (linearity), so the
    shards' float64 x_t Σ_(i in shard) x_iᵀα_i, added up, give the sum over *all* training
    examples without the float32 rounding of n separate terms.

    Args:
        surrogate_logits: (m, C) x_t Θ.
        alpha_head_logits: (m, C) x_t Σ_i x_iᵀα_i summed over all shards, or (m,) already at
            each row's explained class.

    Returns:
        dict with the ``table`` and summary numbers for the manifest.
    """
    rows = np.arange(len(test_ids))
    surrogate = surrogate_logits[rows, test_pred]
    rep_sum = alpha_head_logits if np.ndim(alpha_head_logits) == 1 else alpha_head_logits[rows, test_pred]
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


def summarize_scoring(records: list, requested: str) -> dict:
    """The manifest's ``scoring`` section from the shards' ``scoring`` records (in shard order).

    ``method`` is ``pruned`` only when every shard was pruned; a shard scored densely because
    ``--abs-sums`` met negative features makes it ``dense``, with the reason.
    ``influence_abs_sum`` says how that column was obtained (``how``: one of the
    :mod:`~distributed_influence.method.records` modes, or ``mixed``) and, when some of it is
    null, why (``reason``); ``error_influence`` likewise for that column.
    """
    # Records of resumed shards come back from the work area as NumPy scalars: made plain here.
    # None: a shard resumed from a run that did not record it.
    records = [{"method": str(r["method"]), "pairs_scored": int(r["pairs_scored"]),
                "pairs_total": int(r["pairs_total"]), "reason": str(r.get("reason", "")),
                "rows_finished_densely": int(r.get("rows_finished_densely", 0)),
                "rows_rescored": int(r.get("rows_rescored", 0)), "abs_sum": str(r.get("abs_sum", "")),
                "error_sum": str(r.get("error_sum", "")), "seconds": float(r.get("seconds", 0.0))} if r else
               {"method": "unknown", "pairs_scored": 0, "pairs_total": 0, "reason": "", "abs_sum": "",
                "error_sum": "", "rows_finished_densely": 0, "rows_rescored": 0, "seconds": 0.0} for r in records]
    scored = sum(r["pairs_scored"] for r in records)
    total = sum(r["pairs_total"] for r in records)
    methods = {r["method"] for r in records}
    reasons = sorted({r["reason"] for r in records if r.get("reason")})
    hows = {r["abs_sum"] for r in records if r["abs_sum"]}
    errs = {r["error_sum"] for r in records if r["error_sum"]}
    return {
        "requested": requested,
        "method": "dense" if "dense" in methods else "pruned",
        "reason": reasons[0] if reasons else None,
        "pairs_scored": int(scored),
        "pairs_total": int(total),
        "pairs_scored_fraction": scored / total if total else 0.0,
        "rows_finished_densely": sum(r["rows_finished_densely"] for r in records),
        "rows_rescored": sum(r["rows_rescored"] for r in records),
        "influence_abs_sum": {"how": hows.pop() if len(hows) == 1 else "mixed" if hows else None,
                              "reason": ABS_SUM_SKIPPED if ABS_SKIPPED in {r["abs_sum"] for r in records} else None},
        "error_influence": {"how": errs.pop() if len(errs) == 1 else "mixed" if errs else None,
                            "reason": ERR_SKIPPED if ERR_NO_LABELS in {r["error_sum"] for r in records} else None},
        "shards": [{"method": r["method"], "pairs_scored": r["pairs_scored"],
                    "rows_finished_densely": r["rows_finished_densely"],
                    "rows_rescored": r["rows_rescored"], "influence_abs_sum": r["abs_sum"] or None,
                    "seconds": round(r["seconds"], 4),
                    "pairs_scored_fraction": r["pairs_scored"] / r["pairs_total"] if r["pairs_total"] else 0.0}
                   for r in records],
    }
