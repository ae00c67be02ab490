"""What ``apply-review`` needs to know of a training source, and whether an audit belongs to it.

The ids, labels and keys come from the package's source layer (:func:`open_source`), so a
decisions file is checked against exactly the ids and keys an audit of that source wrote, for
every format. Only the ``.npz`` and Parquet formats get a corrected copy; for the others the
label map is the output.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from distributed_influence.data.sources import (
    ArraySource,
    ImageFolderSource,
    NpzSource,
    ParquetSource,
    Source,
    TFRecordSource,
    open_source,
    options_from,
)
from distributed_influence.data.sources.base import check_ids, check_unique_keys
from distributed_influence.errors import InputError, SourceError
from distributed_influence.store import storage, tables

#: The formats written as a corrected copy, by the source class that reads them.
COPY_FORMATS = {NpzSource: "npz", ParquetSource: "parquet"}


@dataclasses.dataclass
class TrainRows:
    """The rows of a training source as apply-review sees them.

    Attributes:
        spec: the source as given (path, URI, glob, ``digits``).
        source: the opened source (the copy writers read its file again).
        ids: int64 id per row, in source order.
        labels: int64 label per row.
        keys: string key per row (an object array), or None.
        n_classes: C; new labels must lie in ``0..C-1``.
        copy_format: ``npz`` or ``parquet`` when a corrected copy is written, else None.
    """

    spec: str
    source: Source
    ids: np.ndarray
    labels: np.ndarray
    keys: Optional[np.ndarray]
    n_classes: int
    copy_format: Optional[str]

    @property
    def n_rows(self) -> int:
        return int(len(self.ids))

    def positions(self, query: np.ndarray) -> np.ndarray:
        """The row position of each id in ``query``; -1 for an id the source does not have.

        Sorted lookups, not a dict: a source of millions of rows costs two arrays, and a
        decisions file of any length is looked up in one call.
        """
        query = np.asarray(query, dtype=np.int64)
        if self.n_rows == 0:
            return np.full(len(query), -1, dtype=np.int64)
        order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[order]
        at = np.minimum(np.searchsorted(sorted_ids, query), self.n_rows - 1)
        return np.where(sorted_ids[at] == query, order[at], -1)


def open_train(spec: str, source_options: Optional[dict] = None) -> TrainRows:
    """Opens the training source and reads its ids, labels and keys (``n_classes`` left at 0).

    Raises:
        SourceError: the source is missing, malformed, empty, has no labels or repeats an id.
    """
    src = open_source(spec, **(source_options or {}))
    if src.n_rows == 0:
        raise SourceError(f"{spec}: the training set is empty")
    if not src.has_labels:
        raise SourceError(f"{spec}: the training set has no labels ('y' in .npz, 'label' in Parquet, "
                          f"a label feature in TFRecord): there is nothing to correct")
    if isinstance(src, TFRecordSource):
        # Known only once the records are read (the audit's workers learn them row by row):
        # walked here without decoding an image, and a repeated key named by file and record.
        labels, ids, keys = src.labels_and_keys()
        if keys is not None:
            check_unique_keys(src, ids, keys)
    else:
        labels, ids, keys = np.asarray(src.labels(), dtype=np.int64), src.ids(), src.keys()
    # Every source refuses a repeated id when it is opened; checked once more (one sort) because
    # every decision is looked up by id, and a repeat would apply it to the wrong row.
    ids = check_ids(np.asarray(ids), spec)
    return TrainRows(spec=spec, source=src, ids=ids, labels=labels, keys=keys, n_classes=0,
                     copy_format=COPY_FORMATS.get(type(src)))


def kind_of(rows: TrainRows) -> str:
    """The source's format, in the words of docs/data-sources.md."""
    src = rows.source
    if isinstance(src, ArraySource):
        return "digits" if rows.spec.startswith("digits") else "IDX"
    return {NpzSource: "npz", ParquetSource: "Parquet", TFRecordSource: "TFRecord",
            ImageFolderSource: "image folder"}.get(type(src), type(src).__name__)


def classes_of_source(rows: TrainRows) -> tuple:
    """C when neither an audit nor ``--classes`` gives it, and the words that say where it came
    from: an image folder's class folders, else one more than the largest label (at least 2, as
    for a binary model). A relabel to a class no training row has yet needs ``--classes`` or
    ``--audit``, which the words say.

    Returns:
        (C, note), the note ending range messages.
    """
    if isinstance(rows.source, ImageFolderSource):
        n = len(rows.source.classes)
        return n, f"the image folder has {n} classes"
    n = max(2, int(rows.labels.max()) + 1)
    return n, f"the labels of {rows.spec} give {n} classes; --classes or --audit sets more"


def check_labels_in_range(rows: TrainRows, note: str) -> None:
    """Refuses source labels outside ``0..C-1``: the C that ``note`` names must describe this source."""
    y = rows.labels
    bad = (y < 0) | (y >= rows.n_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{rows.spec}: label {int(y[row])} at row {row} is outside 0..{rows.n_classes - 1} "
                         f"({note})")


# ------------------------------------------------------------------------------------ the audit


@dataclasses.dataclass
class AuditRows:
    """The parts of an audit's output that apply-review reads: its manifest and four columns of
    ``train_scores`` (plus ``train_key`` when the source has keys), as NumPy arrays."""

    out: str
    manifest: dict
    train_id: np.ndarray
    label: np.ndarray
    audit_rank: np.ndarray
    predicted_class: np.ndarray
    train_key: Optional[np.ndarray]
    #: The model's probability of its class, float32 as stored; None in audits written before the
    #: column existed.
    predicted_probability: Optional[np.ndarray] = None

    @property
    def n_classes(self) -> int:
        return int(self.manifest["n_classes"])


def read_audit(out: str) -> AuditRows:
    """Reads the manifest and the columns of ``train_scores`` that the cleaning needs.

    ``train_scores`` holds a few numbers per training row; the ``influence_topk`` table, which
    can be far larger, is not read.

    Raises:
        InputError: ``out`` is not the output of a finished audit, or a table is unreadable.
    """
    if not storage.exists(storage.join(out, tables.MANIFEST)):
        raise InputError(f"--audit {out}: no {tables.MANIFEST} (is it the --out of a finished audit?)")
    try:
        manifest = tables.read_manifest(out)
        table = tables.read_table(out, tables.TRAIN_SCORES, manifest)
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"--audit {out}: unreadable results ({storage.reason(exc)})") from None
    if table is None:
        raise InputError(f"--audit {out}: no {tables.TRAIN_SCORES} table (the output of explain, "
                         f"not of an audit?)")
    missing = [c for c in ("train_id", "label", "audit_rank", "predicted_class") if c not in table.column_names]
    if "n_classes" not in manifest or missing:
        what = f"{tables.TRAIN_SCORES} has no column {missing[0]}" if missing else f"{tables.MANIFEST} has no n_classes"
        raise InputError(f"--audit {out}: {what} (not the output of an audit?)")

    def col(name):
        return table.column(name).to_numpy().astype(np.int64)

    keys = (np.asarray(table.column(tables.TRAIN_KEY).to_pylist(), dtype=object)
            if tables.TRAIN_KEY in table.column_names else None)
    confidence = (table.column("predicted_probability").to_numpy(zero_copy_only=False).astype(np.float32)
                  if "predicted_probability" in table.column_names else None)
    return AuditRows(out=out, manifest=manifest, train_id=col("train_id"), label=col("label"),
                     audit_rank=col("audit_rank"), predicted_class=col("predicted_class"), train_key=keys,
                     predicted_probability=confidence)


def check_audit_belongs(audit: AuditRows, rows: TrainRows) -> None:
    """Refuses an audit of another training set: same rows, same ids, same labels, same keys.

    The labels are compared too, because an audit of a corrected copy (or of the same images
    with other labels) has the same ids; cleaning with its ranking would undo or repeat fixes.

    Raises:
        InputError: the first difference, in one line.
    """
    other = "the audit is of another training set"
    if len(audit.train_id) != rows.n_rows:
        raise InputError(f"--audit {audit.out} has {len(audit.train_id)} training rows but --train {rows.spec} "
                         f"has {rows.n_rows}: {other}")
    pos = rows.positions(audit.train_id)
    if (pos < 0).any():
        bad = int(audit.train_id[np.argmax(pos < 0)])
        raise InputError(f"--audit {audit.out}: train_id {bad} is not an id of --train {rows.spec}: {other}")
    differ = rows.labels[pos] != audit.label
    if differ.any():
        i = int(np.argmax(differ))
        raise InputError(f"--audit {audit.out}: train_id {int(audit.train_id[i])} has label {int(audit.label[i])} "
                         f"there but {int(rows.labels[pos[i]])} in --train {rows.spec}: {other} "
                         f"(or of a copy with other labels)")
    if (rows.keys is None) != (audit.train_key is None):
        has = "has keys" if rows.keys is not None else "has no keys"
        raise InputError(f"--audit {audit.out}: --train {rows.spec} {has} but the audit's train_scores "
                         f"{'does not' if audit.train_key is None else 'does'}: {other}")
    if rows.keys is not None:
        differ = rows.keys[pos].astype(str) != audit.train_key.astype(str)
        if differ.any():
            i = int(np.argmax(differ))
            raise InputError(f"--audit {audit.out}: train_id {int(audit.train_id[i])} has key "
                             f"{audit.train_key[i]!r} there but {rows.keys[pos[i]]!r} in --train {rows.spec}: "
                             f"{other}")


def source_options(given: dict, audit: Optional[AuditRows]) -> dict:
    """The options to open ``--train`` with: those given, else the audit's (TFRecord feature names).

    An audit of a TFRecord source recorded the feature names it read; taking them means the
    user names them once, for the audit, and the records are read as the audit read them.
    """
    options = {} if audit is None else options_from(audit.manifest.get("config") or {})
    options.update({k: v for k, v in given.items() if v is not None})
    return options
