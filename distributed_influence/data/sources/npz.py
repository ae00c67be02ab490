"""NumPy ``.npz`` archives: arrays ``x`` (model-ready), ``y`` (int labels, optional for test sets)
and an optional integer ``id``.

Uncompressed members are memory-mapped (local files) or fetched by byte range (remote ones),
never unpickled.
"""

from __future__ import annotations

import struct
import zipfile
from typing import Tuple

import numpy as np

from distributed_influence.data.sources.base import Source, check_ids, check_labels, resolve
from distributed_influence.errors import SourceError
from distributed_influence.store import storage


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


def read_member(fs, path: str, fh, zf: zipfile.ZipFile, member: str, name: str, lazy: bool):
    """One ``.npy`` member of an ``.npz``, reading no more of the file than needed.

    Public because whatever reads an archive again (``apply-review`` copying it) must read each
    member as this source does: memory-mapped, by range on remote storage, never unpickled.

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
        fs, fpath = resolve(path)
        try:
            with fs.open_input_file(fpath) as fh, zipfile.ZipFile(fh) as zf:
                members = set(zf.namelist())
                if "x.npy" not in members:
                    raise SourceError(f"{path}: .npz has no array 'x' (found: {sorted(members)})")

                def load(member: str, lazy: bool = False):
                    return read_member(fs, fpath, fh, zf, member, path, lazy)

                self._x = load("x.npy", lazy=True)
                self._y = check_labels(np.asarray(load("y.npy")), path) if "y.npy" in members else None
                ids = check_ids(np.asarray(load("id.npy")), path) if "id.npy" in members else None
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


