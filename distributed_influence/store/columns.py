"""Matrices as Parquet columns: one row of the table per row of the matrix.

Two layouts. A fixed-size list column (``fixed_list``) is what a user's query engine reads as an
array per row; the work files use it for small matrices. A fixed-size binary column
(``packed``) holds each row's raw little-endian bytes: a flat column, with no per-value nesting
levels to encode, so big float matrices (a train index shard's features) are written and read
at about the speed of the disk, several times faster than as a list column. :func:`matrix`
reads both.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_list(arr: np.ndarray, dtype=None) -> pa.Array:
    """(n, w) → a fixed-size list column of n rows of w values."""
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if arr.dtype.kind in "iuf":
        # Numbers from their buffer (native byte order): ``pa.array`` of a NumPy array first
        # imports pandas, a slow import on the driver between the fit and scoring, for a head
        # of a few kB.
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        values = pa.Array.from_buffers(pa.from_numpy_dtype(arr.dtype), arr.size, [None, pa.py_buffer(arr)])
    else:
        values = pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, arr.shape[1])


def packed(arr: np.ndarray, dtype) -> pa.Array:
    """(n, w) → a fixed-size binary column: row i holds the w values' bytes, little-endian."""
    arr = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<"))
    width = arr.shape[1] * arr.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(arr), [None, pa.py_buffer(arr)])


def matrix(col, dtype) -> np.ndarray:
    """A column written by :func:`fixed_list` or :func:`packed`, as a new (n, w) array of dtype."""
    flat = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_binary(flat.type):
        le = np.dtype(dtype).newbyteorder("<")
        width = flat.type.byte_width // le.itemsize
        data = np.frombuffer(flat.buffers()[1], dtype=le, count=(flat.offset + len(flat)) * width)
        return np.array(data[flat.offset * width:].reshape(len(flat), width), dtype=dtype)  # writable
    width = flat.type.list_size
    return np.array(flat.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(-1, width)
