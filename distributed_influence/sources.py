"""Data sources: where the rows of a training or test set come from.

Every source reads an arbitrary row range, so a shard worker reads only its own rows straight
from storage and no training data passes through the driver. A source is a local path or a URI
such as ``s3://bucket/train.parquet`` (see :mod:`distributed_influence.storage`). Supported:

* ``.npz`` with arrays ``x`` (model-ready), ``y`` (int labels, optional for test sets) and an
  optional ``id``; uncompressed members are memory-mapped (local files) or fetched by byte
  range (remote ones), never unpickled.
* ``.parquet`` with ``label`` (optional for test sets), optional ``id``, and either ``x`` (list of
  floats, reshaped to the model input) or ``image`` (uint8 bytes, reshaped and scaled by 1/255).
* IDX files as used by MNIST / Fashion-MNIST (``...-images-idx3-ubyte[.gz]``; the labels file is
  found beside it by name).
* ``digits`` / ``digits:train`` / ``digits:test``: scikit-learn's bundled 8×8 handwritten digits.
"""

from __future__ import annotations

import abc
import dataclasses
import gzip
import struct
import zipfile
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

from . import storage
from .errors import SourceError


@dataclasses.dataclass
class Rows:
    """A block of rows: model-ready inputs, labels (or None) and int64 ids."""

    x: np.ndarray
    y: Optional[np.ndarray]
    ids: np.ndarray


class Source(abc.ABC):
    """A table of examples that can be read by row range.

    Labels and ids are small (one integer per row), so every source reads them whole when it
    is opened (into ``_y`` and ``_ids``); only the inputs are read by row range.
    """

    name: str
    n_rows: int
    _y: Optional[np.ndarray]
    _ids: np.ndarray

    @property
    def has_labels(self) -> bool:
        """Whether the source carries labels."""
        return self._y is not None

    def labels(self) -> Optional[np.ndarray]:
        """All labels as int64, or None."""
        return self._y

    def ids(self) -> np.ndarray:
        """All ids as int64: the source's ``id`` column, else the 0-based row numbers."""
        return self._ids

    @abc.abstractmethod
    def _read_x(self, start: int, stop: int) -> np.ndarray:
        """Raw inputs of rows [start, stop)."""

    @property
    @abc.abstractmethod
    def example_shape(self) -> Tuple[int, ...]:
        """Shape of one example as stored (before any reshape to the model input)."""

    def read(self, start: int, stop: int, input_shape: Optional[Sequence[int]] = None) -> Rows:
        """Reads rows [start, stop) and shapes them for the model.

        Args:
            start: first row (0-based).
            stop: one past the last row.
            input_shape: the model's input shape; flat rows are reshaped to it.
        """
        if not 0 <= start <= stop <= self.n_rows:
            raise SourceError(f"{self.name}: row range [{start}, {stop}) outside 0..{self.n_rows}")
        x = np.asarray(self._read_x(start, stop), dtype=np.float32)
        if input_shape is not None:
            x = reshape_to(x, input_shape, self.name)
        y = self.labels()
        return Rows(x=x, y=None if y is None else y[start:stop], ids=self.ids()[start:stop])


def reshape_to(x: np.ndarray, input_shape: Sequence[Optional[int]], name: str) -> np.ndarray:
    """Reshapes rows to the model input, refusing a size that does not fit."""
    shape = tuple(input_shape)
    if tuple(x.shape[1:]) == shape:
        return x
    if len(x) == 0 and all(s is not None for s in shape):
        return np.zeros((0,) + shape, dtype=x.dtype)
    if any(s is None for s in shape):
        if len(x.shape[1:]) == len(shape) and all(
            s is None or s == t for s, t in zip(shape, x.shape[1:])
        ):
            return x
        raise SourceError(
            f"{name}: examples of shape {tuple(x.shape[1:])} do not fit the model input {shape}"
        )
    size = int(np.prod(shape))
    if int(np.prod(x.shape[1:])) != size:
        raise SourceError(
            f"{name}: examples of shape {tuple(x.shape[1:])} do not fit the model input {shape}"
        )
    return x.reshape((len(x),) + shape)


def _check_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim != 1:
        raise SourceError(f"{name}: labels must be one integer per row, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            return y.astype(np.int64)
        raise SourceError(f"{name}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def _check_ids(ids: np.ndarray, name: str) -> np.ndarray:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SourceError(f"{name}: 'id' must be one integer per row, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)


def _resolve(spec: str):
    """The filesystem and path of a source; a URI pyarrow cannot use is the user's error."""
    try:
        return storage.resolve(spec)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{spec}: cannot be opened ({storage.reason(exc)})") from None


# ---------------------------------------------------------------------------------------- npz


class _RemoteRows:
    """Rows of a C-ordered array stored uncompressed in a remote file, fetched by byte range.

    The remote stand-in for ``np.memmap``: a shard worker downloads its own rows and nothing
    else. The file is opened for each read, so no connection is held in between.
    """

    def __init__(self, fs, path: str, offset: int, shape: Tuple[int, ...], dtype: np.dtype):
        self._fs, self._path, self._offset = fs, path, offset
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self._row_bytes = int(np.prod(self.shape[1:])) * dtype.itemsize

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("only contiguous row ranges can be read")
        n = max(0, stop - start)
        with self._fs.open_input_file(self._path) as fh:
            data = fh.read_at(n * self._row_bytes, self._offset + start * self._row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((n,) + self.shape[1:])


def _stored_layout(fh, info: zipfile.ZipInfo, name: str, member: str):
    """Shape, Fortran order, dtype and data offset of an uncompressed ``.npy`` member.

    Object arrays are refused: they would need unpickling, which we never do on user files.
    """
    fmt = np.lib.format
    fh.seek(info.header_offset)
    local = fh.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise SourceError(f"{name}: corrupt .npz (bad header of member {member})")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    fh.seek(info.header_offset + 30 + name_len + extra_len)
    version = fmt.read_magic(fh)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = reader(fh)
    if dtype.hasobject:
        raise SourceError(f"{name}: member {member} holds Python objects; refusing to unpickle")
    return shape, fortran, dtype, fh.tell()


def _npz_member(fs, path: str, fh, zf: zipfile.ZipFile, member: str, name: str, lazy: bool):
    """One ``.npy`` member of an ``.npz``, reading no more of the file than needed.

    An uncompressed member is memory-mapped on a local disk; on remote storage a ``lazy`` one
    (``x``, the only large array) is fetched later by row range, others are read now. A
    compressed member can only be read whole.

    Args:
        fs, path: the archive's filesystem and path in it.
        fh: the archive opened for reading (seekable), as ``zf`` reads it.
        zf: the archive.
        member: e.g. ``x.npy``.
        name: the source's name, for messages.
        lazy: fetch rows on demand rather than now (remote storage only).
    """
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(member) as data:
            return np.lib.format.read_array(data, allow_pickle=False)
    shape, fortran, dtype, offset = _stored_layout(fh, info, name, member)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if offset + nbytes > fh.size() or info.file_size < nbytes:
        raise SourceError(f"{name}: truncated .npz (member {member} is incomplete)")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    order = "F" if fortran else "C"
    if storage.is_local(fs):
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    if lazy and not fortran:  # a Fortran-ordered array's rows are not contiguous bytes
        return _RemoteRows(fs, path, offset, shape, dtype)
    return np.frombuffer(fh.read_at(nbytes, offset), dtype=dtype).reshape(shape, order=order)


class NpzSource(Source):
    """Arrays ``x``, ``y`` and optional ``id`` in a NumPy ``.npz`` archive (a path or a URI)."""

    def __init__(self, path: str):
        self.name = path
        fs, fpath = _resolve(path)
        try:
            with fs.open_input_file(fpath) as fh, zipfile.ZipFile(fh) as zf:
                members = set(zf.namelist())
                if "x.npy" not in members:
                    raise SourceError(f"{path}: .npz has no array 'x' (found: {sorted(members)})")

                def load(member: str, lazy: bool = False):
                    return _npz_member(fs, fpath, fh, zf, member, path, lazy)

                self._x = load("x.npy", lazy=True)
                self._y = _check_labels(np.asarray(load("y.npy")), path) if "y.npy" in members else None
                ids = _check_ids(np.asarray(load("id.npy")), path) if "id.npy" in members else None
        except SourceError:
            raise
        except FileNotFoundError:
            raise SourceError(f"{path}: file not found") from None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, struct.error) as exc:
            raise SourceError(f"{path}: corrupt or truncated .npz ({storage.reason(exc)})") from None
        if self._x.ndim < 2:
            raise SourceError(f"{path}: 'x' must have one row per example, got shape {self._x.shape}")
        self.n_rows = int(self._x.shape[0])
        for arr, what in ((self._y, "y"), (ids, "id")):
            if arr is not None and len(arr) != self.n_rows:
                raise SourceError(f"{path}: '{what}' has {len(arr)} rows but 'x' has {self.n_rows}")
        self._ids = ids if ids is not None else np.arange(self.n_rows, dtype=np.int64)

    @property
    def example_shape(self):
        return tuple(self._x.shape[1:])

    def _read_x(self, start, stop):
        return self._x[start:stop]


# ------------------------------------------------------------------------------------ parquet


class ParquetSource(Source):
    """A Parquet table with ``label``, optional ``id`` and ``x`` (list of floats) or ``image``.

    The file may be a path or a URI; only the row groups of the rows asked for are read.
    """

    def __init__(self, path: str, scale: Optional[float] = None):
        import pyarrow.parquet as pq

        self.name = path
        self.scale = scale
        fs, fpath = _resolve(path)
        try:
            self._file = pq.ParquetFile(fpath, filesystem=fs)
        except FileNotFoundError:
            raise SourceError(f"{path}: file not found") from None
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError on corrupt files
            raise SourceError(f"{path}: corrupt or unreadable Parquet ({storage.reason(exc)})") from None
        names = set(self._file.schema_arrow.names)
        if "x" in names:
            self._col = "x"
        elif "image" in names:
            self._col = "image"
        else:
            raise SourceError(f"{path}: Parquet needs an 'x' or 'image' column (found: {sorted(names)})")
        meta = self._file.metadata
        self.n_rows = int(meta.num_rows)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        try:
            self._y = _check_labels(self._column("label"), path) if "label" in names else None
            ids = _check_ids(self._column("id"), path) if "id" in names else None
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{path}: corrupt or unreadable Parquet ({storage.reason(exc)})") from None
        self._ids = ids if ids is not None else np.arange(self.n_rows, dtype=np.int64)
        self._shape = None

    def _column(self, col: str) -> np.ndarray:
        arr = self._file.read(columns=[col]).column(col)
        if arr.null_count:
            raise SourceError(f"{self.name}: column '{col}' has {arr.null_count} null values")
        return arr.to_numpy()

    @property
    def example_shape(self):
        if self._shape is None:
            self._shape = tuple(self._read_x(0, min(1, self.n_rows)).shape[1:])
        return self._shape

    def _check_equal_lengths(self, lengths, start: int) -> None:
        """Refuses ragged rows, naming the first row whose length differs from the block's first."""
        import pyarrow.compute as pc

        if len(lengths) == 0:
            return
        mm = pc.min_max(lengths)
        if mm["min"] != mm["max"]:
            arr = lengths.to_numpy()
            bad = int(np.argmax(arr != arr[0]))
            raise SourceError(f"{self.name}: rows of '{self._col}' have different lengths "
                              f"(row {start + bad} differs from row {start})")

    def _read_x(self, start, stop):
        import pyarrow as pa
        import pyarrow.compute as pc

        if stop <= start:
            return np.zeros((0, 0), dtype=np.float32)
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        last = int(np.searchsorted(self._starts, stop, side="left"))
        groups = list(range(first, last))
        try:
            table = self._file.read_row_groups(groups, columns=[self._col])
        except Exception as exc:
            raise SourceError(f"{self.name}: corrupt or truncated Parquet ({storage.reason(exc)})") from None
        col = table.column(self._col).slice(start - int(self._starts[first]), stop - start).combine_chunks()
        if col.null_count:
            raise SourceError(f"{self.name}: column '{self._col}' has null values")
        n = stop - start
        if self._col == "image":
            if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
                raise SourceError(f"{self.name}: 'image' must be a binary column, got {col.type}")
            self._check_equal_lengths(pc.binary_length(col), start)
            flat = np.frombuffer(b"".join(col.to_pylist()), dtype=np.uint8)
            scale = 1.0 / 255.0 if self.scale is None else self.scale
            x = flat.astype(np.float32) * np.float32(scale)
        else:
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                self._check_equal_lengths(pc.list_value_length(col), start)
            elif not pa.types.is_fixed_size_list(col.type):
                raise SourceError(f"{self.name}: 'x' must be a list column, got {col.type}")
            x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            if self.scale is not None:
                x = x * np.float32(self.scale)
        if n and x.size % n:
            raise SourceError(f"{self.name}: rows of '{self._col}' have different lengths")
        return x.reshape(n, -1)


# ---------------------------------------------------------------------------------------- IDX

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (MNIST format), gzipped or not, from a path or a URI."""
    fs, fpath = _resolve(path)
    try:
        with fs.open_input_stream(fpath, compression=None) as fh:
            data = fh.readall()
        if storage.basename(path).endswith(".gz"):
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: corrupt IDX file ({storage.reason(exc)})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise SourceError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    count = int(np.prod(dims))
    body = data[4 + 4 * ndim :]
    if len(body) < count * dtype.itemsize:
        raise SourceError(f"{path}: truncated IDX file")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(dims)


def idx_labels_path(images_path: str) -> str:
    """The labels file beside an images file: ``train-images-idx3-ubyte`` → ``train-labels-idx1-ubyte``."""
    base = storage.basename(images_path)
    for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
        if a in base:
            return storage.join(storage.dirname(images_path), base.replace(a, b))
    raise SourceError(f"{images_path}: cannot find the labels file (expected '*-images-idx3-ubyte*')")


class ArraySource(Source):
    """Rows held in memory: IDX files and the bundled digits are small enough to read whole."""

    def __init__(self, name: str, x: np.ndarray, y: Optional[np.ndarray], ids: Optional[np.ndarray] = None):
        self.name = name
        self._x = x
        self._y = None if y is None else _check_labels(np.asarray(y), name)
        self.n_rows = int(len(x))
        self._ids = np.arange(self.n_rows, dtype=np.int64) if ids is None else _check_ids(ids, name)

    @property
    def example_shape(self):
        return tuple(self._x.shape[1:])

    def _read_x(self, start, stop):
        return self._x[start:stop]


def idx_source(path: str, scale: Optional[float] = None) -> ArraySource:
    images = read_idx(path)
    labels = read_idx(idx_labels_path(path))
    if len(labels) != len(images):
        raise SourceError(f"{path}: {len(images)} images but {len(labels)} labels")
    scale = 1.0 / 255.0 if scale is None else scale
    x = images.astype(np.float32) * np.float32(scale)
    if x.ndim == 3:
        x = x[..., None]
    return ArraySource(path, x, labels)


DIGITS_TEST_FRACTION = 0.25


def digits_arrays(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (8×8, values 0..16 scaled to 0..1), split by a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    n_test = int(round(len(x) * DIGITS_TEST_FRACTION))
    rows = order[n_test:] if split == "train" else order[:n_test]
    return x[rows], y[rows]


def open_source(spec: str, scale: Optional[float] = None) -> Source:
    """Opens a source from its spec string (a path or URI, or ``digits[:train|:test]``).

    The spec is all a worker gets, so a URI carries its storage options with it (e.g.
    ``s3://bucket/train.npz?endpoint_override=host:9000&scheme=http``); the kind of source is
    told by the file name, ignoring the query string.

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
        return ParquetSource(spec, scale=scale)
    if "idx" in low:
        return idx_source(spec, scale=scale)
    _resolve(spec)  # a URI pyarrow cannot use is refused as such
    if not storage.exists(spec):
        raise SourceError(f"{spec}: file not found")
    raise SourceError(f"{spec}: unknown source kind (expected .npz, .parquet, an IDX file or 'digits')")
