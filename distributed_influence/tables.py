"""The output contract (DESIGN.md §3): Parquet schemas, the manifest, and atomic writing.

Users and downstream checks read these files by column name and type, so the schemas are
spelled out once here and every writer goes through them. Files are written under temporary
names and moved into place only after all of them were written, so a failed run never
leaves a final table behind. The output directory may be a local path or a URI such as
``s3://bucket/results`` (see :mod:`distributed_influence.storage`).
"""

from __future__ import annotations

import json
import uuid
from typing import Dict

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

INFLUENCE_TOPK = "influence_topk.parquet"
TRAIN_SCORES = "train_scores.parquet"
TEST_SCORES = "test_scores.parquet"
MANIFEST = "manifest.json"
OUTPUT_FILES = (INFLUENCE_TOPK, TRAIN_SCORES, TEST_SCORES, MANIFEST)

TOPK_SCHEMA = pa.schema([
    ("test_id", pa.int64()),
    ("predicted_class", pa.int32()),
    ("kind", pa.string()),
    ("rank", pa.int32()),
    ("train_id", pa.int64()),
    ("representer_value", pa.float32()),
    ("alpha", pa.float32()),
    ("similarity", pa.float32()),
])

TRAIN_SCHEMA = pa.schema([
    ("train_id", pa.int64()),
    ("label", pa.int32()),
    ("alpha_label", pa.float32()),
    ("audit_score", pa.float32()),
    ("audit_rank", pa.int64()),
    ("influence_sum", pa.float32()),
    ("influence_abs_sum", pa.float32()),
    ("predicted_class", pa.int32()),  # the model's class for the training example
    ("label_probability", pa.float32()),  # the model's probability of the given label
])

TEST_SCHEMA = pa.schema([
    ("test_id", pa.int64()),
    ("label", pa.int32()),
    ("predicted_class", pa.int32()),
    ("model_logit", pa.float32()),
    ("surrogate_logit", pa.float32()),
    ("representer_sum", pa.float32()),
    ("decomposition_error", pa.float32()),
])

#: String keys of examples, appended to the tables when a source has them (file paths of image
#: folders, a string ``id`` column, a TFRecord id feature); ids stay int64 row numbers.
TRAIN_KEY = "train_key"
TEST_KEY = "test_key"

#: Rows per Parquet row group: large groups keep reads fast and metadata small.
ROW_GROUP = 1 << 20


def to_table(columns: Dict[str, object], schema: pa.Schema) -> pa.Table:
    """Builds a table with exactly ``schema`` (casting NumPy columns to the contract types)."""
    arrays = [
        columns[f.name].cast(f.type) if isinstance(columns[f.name], pa.Array)
        else pa.array(columns[f.name], type=f.type, from_pandas=True)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def add_key_column(table: pa.Table, id_col: str, key_col: str, ids, keys) -> pa.Table:
    """Appends ``key_col`` (string) to ``table``: the key of each row's ``id_col``.

    Args:
        table: a table with an int64 ``id_col``.
        ids: every id of the source (any order).
        keys: the key of each of ``ids``.
    """
    import numpy as np

    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    wanted = table.column(id_col).to_numpy()
    pos = np.clip(np.searchsorted(sorted_ids, wanted), 0, max(len(sorted_ids) - 1, 0))
    found = (sorted_ids[pos] == wanted) if len(sorted_ids) else np.zeros(len(wanted), bool)
    values = np.asarray(keys, dtype=object)[order][pos] if len(sorted_ids) else np.full(len(wanted), None)
    column = pa.array(values, pa.string(), mask=~found)
    return table.append_column(pa.field(key_col, pa.string()), column)


def write_outputs(out_dir: str, tables: Dict[str, pa.Table], manifest: dict) -> None:
    """Writes the tables and the manifest so that either all appear or none does.

    Everything is written into a hidden staging directory inside ``out_dir`` and then moved
    into place (a rename on a local disk; a copy of each whole object on an object store);
    the manifest goes last, so a reader that sees it sees complete tables.
    """
    storage.makedirs(out_dir)
    stage = storage.join(out_dir, f".staging-{uuid.uuid4().hex[:8]}")
    storage.makedirs(stage)
    try:
        for name, table in tables.items():
            with storage.open_output(storage.join(stage, name)) as fh:
                pq.write_table(table, fh, row_group_size=ROW_GROUP)
        with storage.open_output(storage.join(stage, MANIFEST)) as fh:
            text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default)
            fh.write((text + "\n").encode())
        for name in list(tables) + [MANIFEST]:
            storage.move(storage.join(stage, name), storage.join(out_dir, name))
    finally:
        storage.remove_tree(stage)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(out_dir: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out_dir, MANIFEST)))
