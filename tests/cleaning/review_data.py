"""Small training sources, decisions files and audit outputs for the apply-review tests.

The audits here are synthetic (a manifest and a ``train_scores`` dataset written with pyarrow),
so the expected result of ``--auto`` can be worked out by hand; the end-to-end test runs a
real one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import assert_one_line_refusal

from distributed_influence.cli import main

N_ROWS = 20
N_CLASSES = 3
HEADER = "train_id,label,action,new_label,train_key,decided_at"


def labels() -> np.ndarray:
    """Labels 0, 1, 2, 0, 1, 2, ...: every class has rows."""
    return (np.arange(N_ROWS) % N_CLASSES).astype(np.int64)


def ids() -> np.ndarray:
    """Ids that are neither row numbers nor in row order, so a mix-up of ids and positions shows."""
    return (1000 + np.random.default_rng(7).permutation(N_ROWS) * 3).astype(np.int64)


def inputs() -> np.ndarray:
    return np.arange(N_ROWS * 4, dtype=np.float32).reshape(N_ROWS, 2, 2)


def write_npz(path, with_ids: bool = True, compressed: bool = False, **extra) -> str:
    save = np.savez_compressed if compressed else np.savez
    arrays = {"x": inputs(), "y": labels(), **extra}
    if with_ids:
        arrays["id"] = ids()
    save(str(path), **arrays)
    return str(path)


def write_parquet(path, id_column: Optional[str] = "int", row_group_size: int = 6, compression="zstd",
                  label_type=pa.int8(), keys_: Optional[list] = None) -> str:
    """``x`` lists, a ``label`` of ``label_type``, a ``note`` column, schema metadata, and an
    ``id`` column of integers (``int``), strings (``str``: the rows' keys, ``keys_`` or
    :func:`keys`) or none; ``compression`` as ``pq.write_table`` takes it (None: uncompressed)."""
    cols = {"x": pa.array(inputs().reshape(N_ROWS, -1).tolist(), pa.list_(pa.float32())),
            "label": pa.array(labels(), label_type),
            "note": pa.array([f"row {i}" for i in range(N_ROWS)])}
    if id_column == "int":
        cols["id"] = pa.array(ids())
    elif id_column == "str":
        cols["id"] = pa.array(keys() if keys_ is None else keys_)
    table = pa.table(cols).replace_schema_metadata({"origin": "review tests"})
    pq.write_table(table, str(path), row_group_size=row_group_size, compression=compression)
    return str(path)


def keys() -> list:
    return [f"img/{i:03d}.png" for i in range(N_ROWS)]


def write_csv(path, lines: list, header: str = HEADER) -> str:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("\n".join([header] + lines) + "\n")
    return str(path)


def write_audit(out, train_id, label, audit_rank, predicted, keys_=None, n_classes: int = N_CLASSES,
                confidence=None) -> str:
    """The two parts of an audit's output that apply-review reads: manifest.json and train_scores
    (with ``predicted_probability`` only when ``confidence`` is given: without it, the table is
    one an earlier version wrote)."""
    os.makedirs(os.path.join(out, "train_scores"))
    n = len(train_id)
    cols = {"train_id": pa.array(train_id, pa.int64()), "label": pa.array(label, pa.int32()),
            "alpha_label": pa.array(np.zeros(n), pa.float32()),
            "audit_score": pa.array(-np.asarray(audit_rank, dtype=np.float64), pa.float32()),
            "audit_rank": pa.array(audit_rank, pa.int64()),
            "influence_sum": pa.array(np.zeros(n), pa.float32()),
            "influence_abs_sum": pa.array(np.zeros(n), pa.float32()),
            "predicted_class": pa.array(predicted, pa.int32()),
            "label_probability": pa.array(np.full(n, 0.5), pa.float32())}
    if confidence is not None:
        cols["predicted_probability"] = pa.array(confidence, pa.float32())
    if keys_ is not None:
        cols["train_key"] = pa.array(list(keys_), pa.string())
    pq.write_table(pa.table(cols), os.path.join(out, "train_scores", "part-00000.parquet"))
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump({"n_train": n, "n_classes": n_classes, "config": {}}, fh)
    return str(out)


def digest(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def refused(capsys, argv: list) -> str:
    """Runs the command in this process; it must exit 2 with exactly one line on stderr.

    Returns:
        That line, without the program's prefix.
    """
    capsys.readouterr()
    return assert_one_line_refusal(capsys, main(["apply-review"] + argv))


def nothing_written(parent, out_name: str = "out") -> bool:
    """True when neither the output directory nor a staged one is left in ``parent``."""
    return not [n for n in os.listdir(parent) if n == out_name or n.startswith(f".{out_name}.")]
