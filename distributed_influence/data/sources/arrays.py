"""Sources held in memory: IDX files (MNIST format) and scikit-learn's bundled digits.

* IDX files as used by MNIST / Fashion-MNIST (``...-images-idx3-ubyte[.gz]``; the labels file is
  found beside it by name).
* ``digits`` / ``digits:train`` / ``digits:test``: scikit-learn's bundled 8×8 handwritten digits.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import Optional, Tuple

import numpy as np

from distributed_influence.data.sources.base import Source, check_ids, check_labels, resolve
from distributed_influence.errors import SourceError
from distributed_influence.store import storage

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (MNIST format), gzipped or not, from a path or a URI."""
    fs, fpath = resolve(path)
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
        self._y = None if y is None else check_labels(np.asarray(y), name)
        self.n_rows = int(len(x))
        self._ids = np.arange(self.n_rows, dtype=np.int64) if ids is None else check_ids(ids, name)

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


