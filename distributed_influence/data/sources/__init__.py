"""Data sources: where the rows of a training or test set come from.

One module per format, all behind the reader interface of :class:`~.base.Source` (read any row
range; labels, int64 ids and, where the format has them, string keys). A source is a local path
or a URI such as ``s3://bucket/train.parquet`` (see :mod:`distributed_influence.store.storage`):

* ``.npz`` (:mod:`.npz`): arrays ``x``, ``y``, optional integer ``id``;
* ``.parquet`` (:mod:`.parquet`): ``label``, optional ``id`` (integer, or string keys), and
  ``x`` (float lists), ``image`` (raw uint8 pixels) or ``image`` holding encoded PNG/JPEG bytes
  (binary, or the Hugging Face ``struct<bytes, path>``);
* TFRecord files of ``tf.train.Example`` (:mod:`.tfrecord`, :mod:`.records`): a file, a glob or
  a comma list, uncompressed or GZIP;
* an image folder ``DIR/class_name/*.png|jpg`` (:mod:`.folder`);
* IDX files (MNIST format) and ``digits[:train|:test]`` (:mod:`.arrays`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from distributed_influence.config import AuditConfig, fields
from distributed_influence.data.sources import folder, records
from distributed_influence.data.sources.arrays import (
    DIGITS_TEST_FRACTION,
    ArraySource,
    digits_arrays,
    idx_labels_path,
    idx_source,
    read_idx,
)
from distributed_influence.data.sources.base import Rows, Source, reshape_to, resolve
from distributed_influence.data.sources.folder import ImageFolderSource
from distributed_influence.data.sources.npz import NpzSource
from distributed_influence.data.sources.parquet import ParquetSource
from distributed_influence.data.sources.records import COMPRESSIONS, is_tfrecord_name
from distributed_influence.data.sources.tfrecord import TFRecordSource
from distributed_influence.errors import SourceError
from distributed_influence.store import storage

#: Options of :func:`open_source` that an audit's configuration sets: the ``AuditConfig`` fields
#: marked ``source_option=True``, so that a new one is declared once, with its flag.
OPTION_NAMES = fields.names(AuditConfig, source_option=True)

__all__ = [
    "ArraySource", "COMPRESSIONS", "DIGITS_TEST_FRACTION", "ImageFolderSource", "NpzSource", "OPTION_NAMES",
    "ParquetSource", "Rows", "Source", "SourceError", "TFRecordSource", "content_listing", "digits_arrays",
    "idx_labels_path", "idx_source", "open_source", "options_from", "read_idx", "reshape_to",
]


def options_from(config) -> dict:
    """The source options of an audit's configuration (an ``AuditConfig`` or its manifest dict).

    Options left at None are left out, so that :func:`open_source` applies its own defaults, and
    a manifest written before an option existed still reads.
    """
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    return {name: get(name, None) for name in OPTION_NAMES if get(name, None) is not None}


def open_source(spec: str, scale: Optional[float] = None, resize: bool = False,
                image_feature: Optional[str] = None, label_feature: Optional[str] = None,
                id_feature: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                layout: Optional[dict] = None, compression: Optional[str] = None) -> Source:
    """Opens a source from its spec string (a path or URI, or ``digits[:train|:test]``).

    The spec is all a worker gets, so a URI carries its storage options with it (e.g.
    ``s3://bucket/train.npz?endpoint_override=host:9000&scheme=http``); the kind of source is
    told by the file name, ignoring the query string, and a directory is an image folder.

    Args:
        spec: path, URI, glob or comma list (TFRecord), or ``digits[:train|:test]``.
        scale: factor on pixel values (default 1/255) or on float lists (default 1).
        resize: resize decoded images to the model's input size (else a mismatch is an error).
        image_feature, label_feature, id_feature: TFRecord feature names (defaults: see
            :mod:`.tfrecord`).
        classes: class names of an image folder in label order (a test folder takes the
            training folder's).
        layout: what :meth:`Source.layout` returned on the driver, so that a worker opens the
            source without scanning it again.
        compression: ``"gzip"`` or ``"none"`` for every TFRecord file; None: by each file's
            name (``.gz`` is GZIP). Other kinds ignore it: one flag serves a TFRecord training
            set and a test set of another kind.

    Raises:
        SourceError: the file is missing, of an unknown kind, or malformed.
    """
    if spec in ("digits", "digits:train", "digits:test"):
        x, y = digits_arrays("test" if spec.endswith(":test") else "train")
        return ArraySource(spec, x, y)
    low = storage.basename(spec).lower()
    if low.endswith(".npz"):
        return NpzSource(spec)
    if low.endswith((".parquet", ".pq")):
        return ParquetSource(spec, scale=scale, resize=resize)
    if is_tfrecord_name(low):
        return TFRecordSource(spec, scale=scale, resize=resize, image_feature=image_feature,
                              label_feature=label_feature, id_feature=id_feature, layout=layout,
                              compression=compression)
    if "idx" in low:
        return idx_source(spec, scale=scale)
    resolve(spec)  # a URI pyarrow cannot use is refused as such
    if not storage.exists(spec):
        raise SourceError(f"{spec}: file not found")
    fs, path = resolve(spec)
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.Directory:
        if classes is None and layout is not None:
            classes = layout.get("classes")
        src = ImageFolderSource(spec, scale=scale, resize=resize, classes=classes)
        if layout is not None and int(layout.get("rows", src.n_rows)) != src.n_rows:
            raise SourceError(f"{spec}: {src.n_rows} images now, {layout['rows']} when the job "
                              f"started (the folder changed)")
        return src
    raise SourceError(f"{spec}: unknown source kind (expected .npz, .parquet, .tfrecord, an IDX file, "
                      f"an image folder or 'digits')")


def content_listing(spec: str) -> Optional[List[Tuple[str, int, int]]]:
    """What a source of several files reads, as (relative path, size, modification time in ns),
    sorted: the files of an image folder, or of a TFRecord glob or comma list.

    The run key fingerprints a source by it (:func:`distributed_influence.store.workstore.fingerprint`),
    so that a folder that gained, lost or rewrote a file is not resumed as if unchanged. It costs
    directory listings (one recursive listing of a folder; for a glob or list, one listing per
    directory of its files, after the one that expands a glob) and opens no file.

    Returns:
        The listing, or None for a source that is one file (fingerprinted by its own size and
        time), ``digits``, or a path that does not exist.

    Raises:
        SourceError: a directory or a file of the source cannot be listed.
    """
    if spec in ("digits", "digits:train", "digits:test"):
        return None
    if is_tfrecord_name(storage.basename(spec)):  # the kind as open_source tells it
        if "," not in spec and not any(c in storage.basename(spec) for c in "*?["):
            return None  # one file, and it does not exist (else it was fingerprinted by its size)
        try:
            files = records.expand(spec)
        except SourceError:  # a glob that matches nothing: nothing to fingerprint but the spec
            return None
        return records.listing(files)
    import pyarrow.fs as pafs

    try:
        fs, path = storage.resolve(spec)
        is_dir = fs.get_file_info(path).type == pafs.FileType.Directory
    except (OSError, ValueError):
        return None
    return folder.listing(spec) if is_dir else None
