"""The outputs of ``apply-review``: the corrected copy, ``label_map.parquet`` and the summary.

The copy keeps the source's format, so the retrain reads it with the code that read the
original: an ``.npz`` stays an ``.npz`` (every member stored uncompressed, so the package
memory-maps it), a Parquet file keeps its schema, metadata, other columns and row groups. Rows
keep their order and keys; removed rows are dropped. Integer ids are kept, and a source without
ids gains them (an ``id`` array or column holding the original row numbers), so the audit of the
copy names every row by the id the first audit gave it. The exception is a Parquet file whose
``id`` column holds strings: those are its keys, kept as they are, and its ids are row numbers,
so the copy's count the remaining rows (docs/cli.md says to join on ``train_key``).

Memory: a stored (uncompressed) ``.npz`` member is copied block by block, so ``x`` of any size
passes through :data:`BLOCK_BYTES`; a compressed member is inflated whole, as the audit's own
reader does. A Parquet file is copied one row group at a time, so the memory needed is that of
its largest row group: reading smaller batches would split the row groups, which the copy keeps.
"""

from __future__ import annotations

import errno
import os
import zipfile
from typing import Dict, List

import numpy as np

from distributed_influence.cleaning.decisions import CODES, KEEP, RELABEL, REMOVE, UNDECIDED, UNSURE, Decisions
from distributed_influence.cleaning.sources import TrainRows
from distributed_influence.errors import SourceError
from distributed_influence.store import storage, tables

LABEL_MAP = "label_map.parquet"
SUMMARY = "summary.json"
#: Bytes of source rows held at once while copying.
BLOCK_BYTES = 64 << 20
#: errno values only a write raises: the disk of the copy is at fault, not the source, so
#: ``apply.py`` names ``--out`` rather than the source.
_WRITE_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", None))
                          if e is not None)
#: Codecs ``ParquetWriter`` writes, by the lower-case names it takes.
_PARQUET_CODECS = frozenset(("none", "snappy", "gzip", "brotli", "lz4", "lz4_raw", "zstd"))


def _fits(values: np.ndarray, dtype: np.dtype) -> bool:
    """Whether the new labels survive a round trip through the source's label dtype (an int8
    label array cannot hold class 300)."""
    return bool(np.array_equal(values.astype(dtype).astype(np.int64), values))


def _block_rows(row_bytes: int) -> int:
    """How many rows of ``row_bytes`` each make one block of about :data:`BLOCK_BYTES`.

    A block of bytes rather than of rows, so wide rows (large images) and narrow ones (a label)
    both pass through the same bounded memory; at least one row, however wide.
    """
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def _copy_failed(rows: TrainRows, exc: BaseException) -> BaseException:
    """The error a failed copy raises: the write's own error when the disk of the copy refused
    it (full, read-only: ``apply.py`` then names ``--out``), else the source named as unreadable."""
    if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
        return exc
    return SourceError(f"{rows.spec}: cannot be copied ({storage.reason(exc)})")


# ------------------------------------------------------------------------------------- .npz


def _write_member(zf: zipfile.ZipFile, name: str, arr, keep: np.ndarray, n_rows: int) -> None:
    """Writes one ``.npy`` member, C-ordered and uncompressed, keeping only the rows in ``keep``
    when its first axis has one entry per row of the source.

    The rows are read and written block by block, so ``x`` of any size passes through a fixed
    amount of memory.
    """
    per_row = arr.ndim >= 1 and arr.shape[0] == n_rows
    shape = ((int(keep.sum()),) + tuple(arr.shape[1:])) if per_row else tuple(arr.shape)
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": shape}
    with zf.open(name, "w", force_zip64=True) as fh:
        try:
            np.lib.format.write_array_header_1_0(fh, header)
        except ValueError:  # a header too long for format 1.0 (a structured dtype of many fields)
            np.lib.format.write_array_header_2_0(fh, header)
        if not per_row:
            fh.write(np.ascontiguousarray(np.asarray(arr)).tobytes())
            return
        step = _block_rows(int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            block = np.asarray(arr[start:stop])[keep[start:stop]]
            fh.write(np.ascontiguousarray(block).tobytes())


def write_npz(rows: TrainRows, decisions: Decisions, path: str) -> None:
    """Writes the corrected ``.npz``: ``y`` relabelled, removed rows dropped from every array
    with one entry per row (``x``, ``y``, ``id`` and any other), other arrays unchanged, and an
    ``id`` array of the original row numbers when the source had none.

    Raises:
        SourceError: the source cannot be read again (it changed or was removed meanwhile).
    """
    # The reader of the audit's own NpzSource: memory-mapped members (range reads on remote
    # storage), never unpickled.
    from distributed_influence.data.sources.npz import read_member

    keep = decisions.kept
    n = rows.n_rows
    fs, fpath = storage.resolve(rows.spec)
    try:
        with fs.open_input_file(fpath) as fh, zipfile.ZipFile(fh) as src, \
                zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as dst:
            names = src.namelist()
            for name in names:
                if not name.endswith(".npy"):
                    dst.writestr(name, src.read(name))  # not an array: kept as it is
                    continue
                # Only x is large: on remote storage it alone is fetched by row range, as the audit reads it.
                arr = read_member(fs, fpath, fh, src, name, rows.spec, name == "x.npy")
                if name == "y.npy":
                    # Only the kept rows' labels must fit: a removed row's -1 is never written.
                    labels = decisions.new_label
                    dtype = arr.dtype if _fits(labels[keep], arr.dtype) else np.dtype(np.int64)
                    arr = labels.astype(dtype)
                _write_member(dst, name, arr, keep, n)
            if "id.npy" not in names:
                _write_member(dst, "id.npy", np.arange(n, dtype=np.int64), keep, n)
    except SourceError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise _copy_failed(rows, exc) from None


# ---------------------------------------------------------------------------------- Parquet


def _parquet_compression(meta) -> str:
    """The codec of the source's first column, in the name ``ParquetWriter`` takes.

    The file's metadata names codecs as the format does: ``UNCOMPRESSED`` is the writer's
    ``none``; a codec the writer cannot write (``LZO``, or ``UNKNOWN``) becomes its default,
    ``snappy``, rather than failing the copy of a readable file.
    """
    if not (meta.num_row_groups and meta.num_columns):
        return "snappy"
    name = meta.row_group(0).column(0).compression.lower()
    name = "none" if name == "uncompressed" else name
    return name if name in _PARQUET_CODECS else "snappy"


def write_parquet(rows: TrainRows, decisions: Decisions, path: str) -> None:
    """Writes the corrected Parquet file, row group by row group: the ``label`` column
    relabelled (its type kept when the new labels fit it), removed rows dropped, every other
    column, the schema's metadata and the compression kept, and an ``id`` column of the
    original row numbers appended when the source had none.

    A string ``id`` column (keys) is kept as it is; the ids of such a source are row numbers,
    so in the copy they count the remaining rows (the keys name them).

    Raises:
        SourceError: the source cannot be read again.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = decisions.kept
    fs, fpath = storage.resolve(rows.spec)
    try:
        pf = pq.ParquetFile(fpath, filesystem=fs)
        schema = pf.schema_arrow
        at = schema.get_field_index("label")
        label_field = schema.field(at)
        # Only the kept rows' labels must fit: a removed row's -1 is never written.
        if not _fits(decisions.new_label[keep], np.dtype(label_field.type.to_pandas_dtype())):
            label_field = label_field.with_type(pa.int64())
        schema = schema.set(at, label_field)
        add_id = "id" not in schema.names
        if add_id:
            schema = schema.append(pa.field("id", pa.int64(), nullable=False))
        with pq.ParquetWriter(path, schema, compression=_parquet_compression(pf.metadata)) as writer:
            start = 0
            for group in range(pf.num_row_groups):
                table = pf.read_row_group(group)
                stop = start + table.num_rows
                mask = keep[start:stop]
                table = table.filter(pa.array(mask))
                labels = pa.array(decisions.new_label[start:stop][mask]).cast(label_field.type)
                table = table.set_column(at, label_field, labels)
                if add_id:
                    table = table.append_column(schema.field("id"), pa.array(np.arange(start, stop)[mask]))
                if table.num_rows:
                    writer.write_table(table.replace_schema_metadata(schema.metadata),
                                       row_group_size=table.num_rows)
                start = stop
    except SourceError:
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _copy_failed(rows, exc) from None
    if start != rows.n_rows:
        raise SourceError(f"{rows.spec}: {start} rows now, {rows.n_rows} when it was opened (the file changed)")


# ---------------------------------------------------------------------------- the label map


def label_map(rows: TrainRows, decisions: Decisions):
    """One row per source row, in source order: ``train_id``, ``train_key`` (when the source has
    keys), ``label`` (given), ``new_label`` (the label after cleaning; null when removed) and
    ``action`` (``keep``, ``relabel``, ``remove``, ``unsure``, or ``undecided`` for a row no
    decision names).

    Every row is listed, so an input pipeline joins it without a default: look up the row's
    id (or key), drop it where ``new_label`` is null, train on ``new_label``.
    """
    import pyarrow as pa

    removed = decisions.action == REMOVE
    columns = [("train_id", pa.array(rows.ids, type=pa.int64()))]
    if rows.keys is not None:
        columns.append((tables.TRAIN_KEY, pa.array(rows.keys.astype(str).tolist(), type=pa.string())))
    columns += [
        ("label", pa.array(rows.labels, type=pa.int32())),
        ("new_label", pa.array(np.where(removed, 0, decisions.new_label), type=pa.int32(), mask=removed)),
        ("action", pa.array(np.asarray(CODES)[decisions.action], type=pa.string())),
    ]
    return pa.table(dict(columns))


def write_label_map(rows: TrainRows, decisions: Decisions, path: str) -> None:
    """Writes :func:`label_map` to ``path`` as one Parquet file, in the row groups of the
    audit's tables, so the input pipeline of any format (pandas, tf.data) reads it with the
    tools that read the audit."""
    import pyarrow.parquet as pq

    pq.write_table(label_map(rows, decisions), path, row_group_size=tables.ROW_GROUP)


# ------------------------------------------------------------------------------- the summary


def counts(rows: TrainRows, decisions: Decisions) -> dict:
    """How many rows got each action, overall and per given class, and how many were
    relabelled into each class (what a retrain will see change)."""
    action = decisions.action
    names = {KEEP: "keep", RELABEL: "relabel", REMOVE: "remove", UNSURE: "unsure", UNDECIDED: "undecided"}
    total = {names[c]: int(np.sum(action == c)) for c in names}
    relabelled = action == RELABEL
    by_class: List[Dict[str, int]] = []
    for c in range(rows.n_classes):
        given = rows.labels == c
        entry = {"class": c, "rows": int(given.sum())}
        entry.update({names[a]: int(np.sum(given & (action == a))) for a in names})
        entry["relabelled_in"] = int(np.sum(relabelled & (decisions.new_label == c)))
        if entry["rows"] or entry["relabelled_in"]:
            by_class.append(entry)
    return {"counts": total, "by_class": by_class}


def summary_lines(summary: dict) -> List[str]:
    """What the command prints: where the outputs are, the totals, and a table of the classes
    that some decision touched (every class of a 1,000-class model would bury the totals)."""
    c = summary["counts"]
    written = summary["files"]
    first = f"wrote {summary['out']}: {', '.join(written)}"
    if summary["format"] is not None:
        first += f" ({summary['rows_written']} of {summary['rows']} rows in {written[0]})"
    else:
        first += f" (no copy of a {summary['source_kind']} source: join {LABEL_MAP} into the input pipeline)"
    lines = [first,
             f"decisions: {c['keep']} kept, {c['relabel']} relabelled, {c['remove']} removed, {c['unsure']} unsure; "
             f"{c['undecided']} rows undecided (left as they are)"]
    touched = [e for e in summary["by_class"] if e["rows"] != e["undecided"] or e["relabelled_in"]]
    if touched:
        lines.append(f"{'class':>6} {'rows':>8} {'kept':>6} {'relabelled':>10} {'removed':>8} {'unsure':>6} "
                     f"{'relabelled in':>13}")
        lines += [f"{e['class']:>6} {e['rows']:>8} {e['keep']:>6} {e['relabel']:>10} {e['remove']:>8} "
                  f"{e['unsure']:>6} {e['relabelled_in']:>13}" for e in touched]
    return lines


def copy_name(rows: TrainRows) -> str:
    """The copy's file name: the source's own, so scripts only change the directory."""
    return os.path.basename(storage.basename(rows.spec))
