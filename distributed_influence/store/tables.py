"""The output contract (docs/outputs.md): Parquet schemas, datasets of part files, the manifest.

Users and downstream checks read these files by column name and type, so the schemas are
spelled out once here and every writer goes through them. Each table is a Parquet dataset,
``OUT/NAME/part-NNNNN.parquet`` in id order, so that reduce tasks on many workers can each
write their own range of rows and no process ever holds a whole table. Parts are staged and
moved into place only after all of them were written, the manifest last, so a failed run never
leaves a final table behind. The output directory may be a local path or a URI such as
``s3://bucket/results`` (see :mod:`distributed_influence.store.storage`).
"""

from __future__ import annotations

import json
import uuid
from typing import Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_influence.store import storage

#: The tables: each a directory of part files (a Parquet dataset).
INFLUENCE_TOPK = "influence_topk"
TRAIN_SCORES = "train_scores"
TEST_SCORES = "test_scores"
TABLES = (INFLUENCE_TOPK, TRAIN_SCORES, TEST_SCORES)
MANIFEST = "manifest.json"
OUTPUT_FILES = TABLES + (MANIFEST,)
#: Before the scale-out, each table was one file, ``OUT/NAME.parquet``; readers accept both.
LEGACY_SUFFIX = ".parquet"

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
    ("error_influence", pa.float32()),  # Σ r_ti over the test rows the model gets wrong
    ("predicted_probability", pa.float32()),  # the model's probability of its own class
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


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def write_part(table_dir: str, part: int, table: pa.Table) -> str:
    """Writes one part file of a dataset atomically; returns its path."""
    path = storage.join(table_dir, part_name(part))
    storage.write_atomic(path, lambda fh: pq.write_table(table, fh, row_group_size=ROW_GROUP))
    return path


def write_manifest(out_dir: str, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default) + "\n"
    storage.write_atomic(storage.join(out_dir, MANIFEST), lambda fh: fh.write(text.encode()))


def publish(out_dir: str, staged: str, names: Sequence[str], manifest: dict) -> None:
    """Moves finished datasets from ``staged`` into ``out_dir``, then writes the manifest.

    The old manifest goes first and the new one last, so a reader that finds a manifest finds
    the complete tables it lists. Tables of an earlier run (datasets or single files of the
    old layout) are replaced.

    Args:
        out_dir: the output directory.
        staged: directory holding one finished dataset directory per name.
        names: the tables to publish.
        manifest: written last, with ``tables`` (the part files of each table) added to it.
    """
    storage.makedirs(out_dir)
    manifest["tables"] = {name: [f"{name}/{f}" for f in storage.list_names(storage.join(staged, name))
                                 if f.endswith(".parquet") and not f.startswith(".")]
                          for name in names}
    old = storage.join(out_dir, MANIFEST)
    if storage.exists(old):
        storage.resolve(old)[0].delete_file(storage.resolve(old)[1])
    for name in names:
        storage.remove_tree(storage.join(out_dir, name))
        legacy = storage.join(out_dir, name + LEGACY_SUFFIX)
        if storage.exists(legacy):
            fs, path = storage.resolve(legacy)
            fs.delete_file(path)
        storage.move_tree(storage.join(staged, name), storage.join(out_dir, name))
    write_manifest(out_dir, manifest)


def split_rows(n_rows: int, rows_per_part: int) -> List[tuple]:
    """[start, stop) ranges of at most ``rows_per_part`` rows covering ``n_rows`` (one if empty)."""
    rows_per_part = max(1, int(rows_per_part))
    bounds = list(range(0, n_rows, rows_per_part)) + [n_rows]
    return list(zip(bounds[:-1], bounds[1:])) or [(0, 0)]


def write_outputs(out_dir: str, tables: Dict[str, pa.Table], manifest: dict,
                  rows_per_part: int = ROW_GROUP) -> None:
    """Writes in-memory tables as datasets and the manifest, so that either all appear or none.

    For small outputs made in one process (``explain``); the audit's reduce tasks write their
    parts themselves and call :func:`publish`. Parts are staged in a hidden directory inside
    ``out_dir`` and then moved into place (a rename on a local disk; a copy of each whole
    object on an object store); the manifest goes last.
    """
    storage.makedirs(out_dir)
    stage = storage.join(out_dir, f".staging-{uuid.uuid4().hex[:8]}")
    try:
        for name, table in tables.items():
            for part, (a, b) in enumerate(split_rows(table.num_rows, rows_per_part)):
                write_part(storage.join(stage, name), part, table.slice(a, b - a))
        publish(out_dir, stage, list(tables), manifest)
    finally:
        storage.remove_tree(stage)


def table_location(out_dir: str, name: str):
    """Where table ``name`` of ``out_dir`` is: its dataset directory, else the single file of
    the old layout, else None."""
    for spec in (storage.join(out_dir, name), storage.join(out_dir, name + LEGACY_SUFFIX)):
        if storage.exists(spec):
            return spec
    return None


def read_table(out_dir: str, name: str, manifest: dict = None, columns=None):
    """Reads one table of an output directory (either layout) in id order, or None if absent.

    The parts the manifest lists are read in its order; without a listing, the dataset
    directory's ``*.parquet`` files in name order (which is id order).
    """
    spec = table_location(out_dir, name)
    if spec is None:
        return None
    fs, path = storage.resolve(spec)
    listed = (manifest or {}).get("tables", {}).get(name)
    if listed is not None and spec == storage.join(out_dir, name):
        paths = [storage.resolve(storage.join(out_dir, p))[1] for p in listed]
    elif fs.get_file_info(path).type == storage.pafs.FileType.Directory:
        paths = [storage.resolve(storage.join(spec, f))[1] for f in storage.list_names(spec)
                 if f.endswith(".parquet") and not f.startswith((".", "_"))]
    else:
        paths = [path]
    parts = [pq.read_table(p, filesystem=fs, columns=columns) for p in paths]
    if not parts:
        raise ValueError(f"{spec}: no part files")
    return pa.concat_tables(parts)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(out_dir: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out_dir, MANIFEST)))
