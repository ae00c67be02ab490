"""TFRecord files of ``tf.train.Example``: one file, a glob (``train-*.tfrecord``) or a
comma-separated list of shards, local or on any URI pyarrow can open.

Features (names by flags, with defaults tried in order):

* image: ``image/encoded`` or ``image`` — encoded bytes (PNG, JPEG, ...; decoded by
  :mod:`.images`), raw uint8 pixels (scaled by 1/255 and reshaped to the model input), or a
  float list (used as is, scaled only when asked);
* label: ``label`` or ``image/class/label`` (int64); absent in a test set;
* id (optional): ``id`` when present, or the feature named — bytes or int64, kept as a string key.

The format has no index, so the records are counted once, by the driver, walking the record
headers (one seek per record on a local disk; a GZIP file is decompressed to be counted, see
:mod:`.records`); the counts per file go to the workers and the manifest. A worker then opens
only the files covering its row range and skips records by their headers within the first, so
no worker parses the others' records. Rows are in file order (sorted names for a glob, the
given order for a list), then record order; ids are those row numbers.

The driver never reads the records' id features, so it cannot see a key given twice: each
worker returns the keys of the rows it featurized, and the job refuses the source if two rows
share one (see ``ShardWorker.prepare``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from distributed_influence.data.sources.base import Rows, Source, check_labels, reshape_to
from distributed_influence.data.sources.images import SMALL_BLOCK, decode_many, looks_encoded, stack_scaled, target_of
from distributed_influence.data.sources.records import Reader, check_compression, compression_of, count_records, expand
from distributed_influence.errors import SourceError
from distributed_influence.store import storage

IMAGE_FEATURES = ("image/encoded", "image")
LABEL_FEATURES = ("label", "image/class/label")
ID_FEATURES = ("id",)


def _example_class():
    from distributed_influence.tfimport import import_tensorflow

    return import_tensorflow().train.Example


def _parse(example_cls, data: bytes, where: str):
    try:
        return example_cls.FromString(data).features.feature
    except Exception as exc:  # protobuf's DecodeError
        raise SourceError(f"{where}: not a tf.train.Example ({type(exc).__name__})") from None


def _pick(feature, asked: Optional[str], defaults: Sequence[str]) -> Optional[str]:
    if asked is not None:
        return asked if asked in feature else None
    return next((name for name in defaults if name in feature), None)


class TFRecordSource(Source):
    """Records of ``tf.train.Example`` in one or more TFRecord files."""

    decodes_images = True
    labels_checked = False

    def __init__(self, spec: str, scale: Optional[float] = None, resize: bool = False,
                 image_feature: Optional[str] = None, label_feature: Optional[str] = None,
                 id_feature: Optional[str] = None, layout: Optional[dict] = None,
                 compression: Optional[str] = None):
        self.name = spec
        self.scale = scale
        self.resize = resize
        check_compression(compression)
        if layout is None:
            layout = self._scan(spec, image_feature, label_feature, id_feature, compression)
        self._layout = layout
        self.files: List[str] = list(layout["files"])
        self.counts: List[int] = [int(c) for c in layout["counts"]]
        # Decided once, by the driver, for every file: a worker reads each file as it was counted.
        self.compressions: List[Optional[str]] = list(layout.get("compression") or [None] * len(self.files))
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.n_rows = int(self._starts[-1])
        self.image_feature = layout["image_feature"]
        self.label_feature = layout["label_feature"]
        self.id_feature = layout["id_feature"]
        self._y = None
        self._ids = np.arange(self.n_rows, dtype=np.int64)
        self._example = None
        self._parse_block = None

    @staticmethod
    def _scan(spec, image_feature, label_feature, id_feature, compression) -> dict:
        """Counts the records of every file and finds the feature names in the first record."""
        files = expand(spec)
        compressions = [compression_of(f, compression) for f in files]
        counts = [count_records(f, c) for f, c in zip(files, compressions)]
        first = next((i for i, c in enumerate(counts) if c), None)
        if first is None:
            raise SourceError(f"{spec}: the TFRecord files hold no records")
        reader = Reader(files[first], compressions[first])
        first = files[first]
        try:
            feature = _parse(_example_class(), reader.next(), f"{first}: record 0")
        finally:
            reader.close()
        names = sorted(feature.keys())
        image = _pick(feature, image_feature, IMAGE_FEATURES)
        if image is None:
            wanted = image_feature or " or ".join(IMAGE_FEATURES)
            raise SourceError(f"{first}: record 0: no image feature {wanted!r} (features: {', '.join(names)}; "
                              f"name it with --image-feature)")
        label = _pick(feature, label_feature, LABEL_FEATURES)
        if label_feature is not None and label is None:
            raise SourceError(f"{first}: record 0: no label feature {label_feature!r} (features: {', '.join(names)})")
        ident = _pick(feature, id_feature, ID_FEATURES)
        if id_feature is not None and ident is None:
            raise SourceError(f"{first}: record 0: no id feature {id_feature!r} (features: {', '.join(names)})")
        return {"files": files, "counts": counts, "compression": compressions, "image_feature": image,
                "label_feature": label, "id_feature": ident}

    @property
    def has_labels(self) -> bool:
        return self.label_feature is not None

    @property
    def has_keys(self) -> bool:
        return self.id_feature is not None

    def layout(self) -> dict:
        return dict(self._layout)

    def describe(self) -> dict:
        return {**super().describe(), "kind": "tfrecord",
                "files": [{"path": storage.redact(f), "records": c, **({"compression": z} if z else {})}
                          for f, c, z in zip(self.files, self.counts, self.compressions)],
                "features": {"image": self.image_feature, "label": self.label_feature, "id": self.id_feature}}

    @property
    def example_shape(self):
        return tuple(self._read_x(0, min(1, self.n_rows)).shape[1:])

    def _records(self, start: int, stop: int):
        """(where, data) of rows [start, stop): only the files covering them are opened."""
        f = int(np.searchsorted(self._starts, start, side="right") - 1)
        row = start
        while row < stop:
            skip = row - int(self._starts[f])
            reader = Reader(self.files[f], self.compressions[f])
            try:
                for _ in range(skip):
                    if not reader.skip():
                        raise SourceError(f"{self.files[f]}: fewer records than the {self.counts[f]} "
                                          f"counted (the file changed?)")
                while row < stop and row < self._starts[f + 1]:
                    data = reader.next()
                    if data is None:
                        raise SourceError(f"{self.files[f]}: fewer records than the {self.counts[f]} "
                                          f"counted (the file changed?)")
                    yield f"{self.files[f]}: record {reader.record - 1}", data
                    row += 1
            finally:
                reader.close()
            f += 1

    def _parser(self):
        """One graph call parsing a block of records (``tf.io.parse_example``), built once."""
        if self._parse_block is None:
            from distributed_influence.tfimport import import_tensorflow

            tf = import_tensorflow()
            spec = {self.image_feature: tf.io.FixedLenFeature([], tf.string)}
            if self.label_feature is not None:
                spec[self.label_feature] = tf.io.FixedLenFeature([], tf.int64)
            if self.id_feature is not None:
                spec[self.id_feature] = tf.io.FixedLenFeature([], tf.string)

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
            def parse(serialized):
                return tf.io.parse_example(serialized, spec)

            self._parse_block = (tf, parse)
        return self._parse_block

    def _fast_rows(self, records: list, input_shape, resize: bool):
        """Rows parsed in one TensorFlow call; None when any record is not of the common shape
        (one bytes image, one int64 label, one bytes id): those go record by record, which
        names the record at fault."""
        if len(records) < SMALL_BLOCK:
            return None
        tf, parse = self._parser()
        try:
            parsed = parse(tf.constant([data for _, data in records], dtype=tf.string))
        except (tf.errors.OpError, ValueError):
            return None
        blobs = parsed[self.image_feature].numpy()
        if not all(looks_encoded(b) for b in blobs):
            return None
        wheres = [where for where, _ in records]
        x = decode_many(list(blobs), lambda i: wheres[i], target_of(input_shape), resize, self.scale)
        y = None if self.label_feature is None else parsed[self.label_feature].numpy().astype(np.int64)
        keys = None
        if self.id_feature is not None:
            keys = np.array([k.decode("utf-8", "replace") for k in parsed[self.id_feature].numpy()], dtype=object)
        return x, y, keys, wheres

    def _label_and_key(self, feature, where: str):
        """The label and key of one parsed record (None for a feature the source does not read).

        One place for the rules (one int64 or float label; one bytes or int64 id, kept as a
        string), so the rows a worker reads and :meth:`labels_and_keys` agree on every record.
        """
        label = key = None
        if self.label_feature is not None:
            lab = feature[self.label_feature] if self.label_feature in feature else None
            values = None if lab is None else (lab.int64_list.value or lab.float_list.value)
            if values is None or len(values) != 1:
                raise SourceError(f"{where}: no single value in label feature {self.label_feature!r}")
            label = values[0]
        if self.id_feature is not None:
            ident = feature[self.id_feature] if self.id_feature in feature else None
            if ident is not None and len(ident.bytes_list.value) == 1:
                key = ident.bytes_list.value[0].decode("utf-8", "replace")
            elif ident is not None and len(ident.int64_list.value) == 1:
                key = str(ident.int64_list.value[0])
            else:
                raise SourceError(f"{where}: no single bytes or int64 value in id feature {self.id_feature!r}")
        return label, key

    def labels_and_keys(self):
        """Every label, id and key of the source, parsing only the label and id features of each
        record: no image is decoded.

        The source learns its labels and keys as the workers read the rows, so neither is known
        when it is opened; a caller that needs all of them before any work (``apply-review``
        checking a decisions file) walks the records here, by the rules :meth:`read` applies. A
        repeated key is not refused here: :func:`~.base.check_unique_keys` does that, naming
        both records, as the audit does.

        Returns:
            ``(labels, ids, keys)`` in row order: int64 labels (None without a label feature),
            the int64 ids (row numbers), string keys as an object array (None without an id
            feature).

        Raises:
            SourceError: a record that is not a ``tf.train.Example``, lacks a single label or id
                value, or a file holding fewer records than were counted.
        """
        if self._example is None:
            self._example = _example_class()
        labels, keys = [], []
        for where, data in self._records(0, self.n_rows):
            label, key = self._label_and_key(_parse(self._example, data, where), where)
            labels.append(label)
            keys.append(key)
        y = None
        if self.label_feature is not None:
            y = check_labels(np.asarray(labels), self.name) if labels else np.zeros(0, dtype=np.int64)
        return y, self._ids, (np.array(keys, dtype=object) if self.id_feature is not None else None)

    def _rows(self, start: int, stop: int, input_shape, resize: bool):
        records = list(self._records(start, stop))
        fast = self._fast_rows(records, input_shape, resize)
        if fast is not None:
            return fast
        if self._example is None:
            self._example = _example_class()
        encoded, raw, floats, labels, keys, wheres = [], [], [], [], [], []
        for where, data in records:
            feature = _parse(self._example, data, where)
            if self.image_feature not in feature:
                raise SourceError(f"{where}: no feature {self.image_feature!r}")
            img = feature[self.image_feature]
            kind = img.WhichOneof("kind")
            if kind == "bytes_list" and len(img.bytes_list.value) == 1:
                blob = img.bytes_list.value[0]
                (encoded if looks_encoded(blob) else raw).append((len(wheres), blob))
            elif kind == "float_list":
                floats.append((len(wheres), np.asarray(img.float_list.value, dtype=np.float32)))
            else:
                raise SourceError(f"{where}: feature {self.image_feature!r} must hold one bytes value "
                                  f"(encoded image or raw pixels) or a float list")
            wheres.append(where)
            label, key = self._label_and_key(feature, where)
            if self.label_feature is not None:
                labels.append(label)
            if self.id_feature is not None:
                keys.append(key)
        kinds = [(name, part) for name, part in (("encoded images", encoded), ("raw pixel bytes", raw),
                                                ("float lists", floats)) if part]
        if len(kinds) > 1:
            (a, pa_), (b, pb) = kinds[0], kinds[1]
            raise SourceError(f"{wheres[pb[0][0]]}: {b} in feature {self.image_feature!r}, but "
                              f"{wheres[pa_[0][0]]} holds {a}")
        if encoded:
            x = decode_many([b for _, b in encoded], lambda i: wheres[i], target_of(input_shape), resize,
                            self.scale)
        elif raw:
            x = stack_scaled([np.frombuffer(b, dtype=np.uint8) for _, b in raw], lambda i: wheres[i],
                             self.scale)
        else:
            x = stack_scaled([f for _, f in floats], lambda i: wheres[i], 1.0)
            if self.scale is not None:
                x = x * np.float32(self.scale)
        y = check_labels(np.asarray(labels), self.name) if self.label_feature is not None else None
        return x, y, (np.array(keys, dtype=object) if self.id_feature is not None else None), wheres

    def _read_x(self, start, stop):
        return self._rows(start, stop, None, False)[0]

    def read(self, start: int, stop: int, input_shape: Optional[Sequence[int]] = None) -> Rows:
        self.check_range(start, stop)
        x, y, keys, _ = self._rows(start, stop, input_shape, self.resize)
        if input_shape is not None:
            x = reshape_to(x, input_shape, self.name)
        if y is not None and len(y) == 0:
            y = np.zeros(0, dtype=np.int64)
        return Rows(x=x, y=y, ids=self._ids[start:stop], keys=keys)

    def where(self, row: int) -> str:
        """The file and record of a row, for messages."""
        f = int(np.searchsorted(self._starts, row, side="right") - 1)
        return f"{self.files[f]}: record {row - int(self._starts[f])}"

    def place(self, row: int) -> str:
        """``record 3`` of a single file; ``record 3 of FILE`` when the source has several."""
        f = int(np.searchsorted(self._starts, row, side="right") - 1)
        record = f"record {row - int(self._starts[f])}"
        return record if len(self.files) == 1 else f"{record} of {self.files[f]}"
