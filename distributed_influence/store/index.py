"""The train index: what an audit learned about the training side, kept for later queries.

Scoring new test examples needs, per training example, its features x_i and α_i (all classes),
plus the fitted head Θ and Σ_i x_iᵀα_i for the decomposition. The audit writes them as Parquet
under ``OUT/index/`` (one file per shard, written by the worker that owns the shard), so
``distributed-influence explain`` can answer for new test examples without featurizing the
training set or fitting the head again.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_influence.errors import InputError
from distributed_influence.store import storage
from distributed_influence.store.columns import fixed_list, matrix, packed

INDEX_DIR = "index"
HEAD_FILE = "head.parquet"


def _atomic_write(table: pa.Table, path: str) -> None:
    # Uncompressed, without dictionaries: the index is float features and α, which compress
    # poorly, so Snappy would cost write time for little saved space.
    # Row groups of 16,384 rows: the writer holds one group's pages at a time, not a whole shard's.
    storage.write_atomic(path, lambda fh: pq.write_table(table, fh, compression="none", use_dictionary=False,
                                                         row_group_size=16384))


def _read(path: str) -> pa.Table:
    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs)


def shard_file(index_dir: str, shard: int) -> str:
    return storage.join(index_dir, f"shard-{shard:05d}.parquet")


def write_shard(path: str, ids: np.ndarray, labels: np.ndarray, x: np.ndarray, alpha: np.ndarray,
                keys: Optional[np.ndarray] = None) -> None:
    """One shard's rows: train_id, label, augmented features (float32), α (float64, all classes),
    and ``train_key`` (string) when the source has keys, so ``explain`` names proponents' files.

    Features and α are packed rows (:func:`columns.packed`); an index written with list
    columns by an earlier version reads the same."""
    columns = {
        "train_id": pa.array(ids, pa.int64()),
        "label": pa.array(labels, pa.int32()),
        "features": packed(x, np.float32),  # a flat column: much faster to write than a list
        "alpha": packed(alpha, np.float64),
    }
    if keys is not None:
        columns["train_key"] = pa.array(np.asarray(keys, dtype=object), pa.string())
    _atomic_write(pa.table(columns), path)


def read_shard(path: str) -> Dict[str, np.ndarray]:
    """A shard's rows; ``keys`` is None for an index of a source without keys."""
    t = _read(path)
    keys = None
    if "train_key" in t.column_names:
        keys = np.asarray(t.column("train_key").to_pylist(), dtype=str)
    return {"ids": t.column("train_id").to_numpy(), "labels": t.column("label").to_numpy(),
            "x": matrix(t.column("features"), np.float32), "alpha": matrix(t.column("alpha"), np.float64),
            "keys": keys}


def write_head(index_dir: str, theta: np.ndarray, alpha_head: np.ndarray) -> None:
    """Θ and Σ_i x_iᵀα_i, one row per feature (the last row is the bias)."""
    _atomic_write(pa.table({"theta": fixed_list(theta, np.float64),
                            "alpha_head": fixed_list(alpha_head, np.float64)}),
                  storage.join(index_dir, HEAD_FILE))


def read_head(index_dir: str):
    t = _read(storage.join(index_dir, HEAD_FILE))
    return matrix(t.column("theta"), np.float64), matrix(t.column("alpha_head"), np.float64)


def shard_files(index_dir: str) -> List[str]:
    """The index's shard files in shard order; refuses an index that is missing or empty."""
    if not storage.exists(storage.join(index_dir, HEAD_FILE)):
        raise InputError(f"{index_dir}: no train index here (run `distributed-influence audit` first)")
    files = [f for f in storage.list_names(index_dir) if f.startswith("shard-") and f.endswith(".parquet")]
    if not files:
        raise InputError(f"{index_dir}: the train index has no shards")
    return [storage.join(index_dir, f) for f in files]
