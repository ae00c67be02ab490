"""Parquet tables: ``label`` (optional for test sets), an optional ``id``, and the inputs as

* ``x``: a list of floats per row, reshaped to the model input (scaled only when asked);
* ``image``: uint8 pixel bytes per row, reshaped and scaled by 1/255; or
* ``image`` holding *encoded* images: PNG/JPEG/... bytes in a binary column, or a struct column
  with a ``bytes`` field (the Hugging Face ``datasets`` image layout, ``struct<bytes, path>``),
  decoded by :mod:`.images` (told apart from raw pixels by the image file signature).

An integer ``id`` column gives the ids; a string ``id`` column gives each row a key (ids are
then row numbers). The file may be a path or a URI; only the row groups of the rows asked for
are read, so a worker decodes only its own rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from distributed_influence.data.sources.base import (
    Rows,
    Source,
    check_ids,
    check_keys,
    check_labels,
    reshape_to,
    resolve,
)
from distributed_influence.data.sources.images import decode_many, looks_encoded, target_of
from distributed_influence.errors import SourceError
from distributed_influence.store import storage


class ParquetSource(Source):
    """A Parquet table with ``label``, optional ``id`` and ``x`` (list of floats) or ``image``."""

    def __init__(self, path: str, scale: Optional[float] = None, resize: bool = False):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.name = path
        self.scale = scale
        self.resize = resize
        fs, fpath = resolve(path)
        try:
            self._file = pq.ParquetFile(fpath, filesystem=fs)
        except FileNotFoundError:
            raise SourceError(f"{path}: file not found") from None
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError on corrupt files
            raise SourceError(f"{path}: corrupt or unreadable Parquet ({storage.reason(exc)})") from None
        schema = self._file.schema_arrow
        names = set(schema.names)
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
        self._struct = False
        if self._col == "image":
            kind = schema.field("image").type
            if pa.types.is_struct(kind):
                if kind.get_field_index("bytes") < 0:
                    raise SourceError(f"{path}: struct column 'image' has no 'bytes' field ({kind})")
                self._struct = True
                self.decodes_images = True
            elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
                raise SourceError(f"{path}: 'image' must be a binary column or a struct with "
                                  f"'bytes', got {kind}")
        try:
            self._y = check_labels(self._column("label"), path) if "label" in names else None
            ids = None
            if "id" in names:
                id_type = schema.field("id").type
                if pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
                    self._keys = check_keys(self._column("id").astype(object), path)
                else:
                    ids = check_ids(self._column("id"), path)
            if self._col == "image" and not self._struct and self.n_rows:
                first = self._image_values(0, 1)[0]
                self.decodes_images = first is not None and looks_encoded(first)
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

    def describe(self) -> dict:
        kind = "encoded images" if self.decodes_images else ("pixel bytes" if self._col == "image" else "x lists")
        return {**super().describe(), "kind": "parquet", "inputs": kind}

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

    def _block(self, start: int, stop: int):
        """The input column of rows [start, stop), reading only the row groups holding them."""
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        last = int(np.searchsorted(self._starts, stop, side="left"))
        try:
            table = self._file.read_row_groups(list(range(first, last)), columns=[self._col])
        except Exception as exc:
            raise SourceError(f"{self.name}: corrupt or truncated Parquet ({storage.reason(exc)})") from None
        return table.column(self._col).slice(start - int(self._starts[first]), stop - start).combine_chunks()

    def _image_values(self, start: int, stop: int) -> list:
        """The image bytes of rows [start, stop) (None where missing)."""
        col = self._block(start, stop)
        if self._struct:
            col = col.field("bytes")
        return col.to_pylist()

    def _blobs(self, start: int, stop: int) -> list:
        values = self._image_values(start, stop)
        for i, v in enumerate(values):
            if v is None:
                raise SourceError(f"{self.name}: row {start + i}: no image bytes in column 'image'")
        return values

    def _decode(self, start: int, stop: int, input_shape, resize: bool) -> np.ndarray:
        return decode_many(self._blobs(start, stop), lambda i: f"{self.name}: row {start + i}",
                           target_of(input_shape), resize, self.scale)

    def read(self, start: int, stop: int, input_shape: Optional[Sequence[int]] = None) -> Rows:
        if not self.decodes_images:
            return super().read(start, stop, input_shape)
        self.check_range(start, stop)
        x = self._decode(start, stop, input_shape, self.resize)
        if input_shape is not None:
            x = reshape_to(x, input_shape, self.name)
        y, keys = self.labels(), self.keys()
        return Rows(x=x, y=None if y is None else y[start:stop], ids=self.ids()[start:stop],
                    keys=None if keys is None else keys[start:stop])

    def _read_x(self, start, stop):
        import pyarrow as pa
        import pyarrow.compute as pc

        if stop <= start:
            return np.zeros((0, 0), dtype=np.float32)
        if self.decodes_images:
            return self._decode(start, stop, None, False)
        col = self._block(start, stop)
        if col.null_count:
            raise SourceError(f"{self.name}: column '{self._col}' has null values")
        n = stop - start
        if self._col == "image":
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
