"""The reader interface every data format implements, and the checks they share.

Every source reads an arbitrary row range, so a shard worker reads only its own rows straight
from storage and no training data passes through the driver. Ids are int64 (the source's
integer ``id`` column, else the 0-based row number in the source's stable order); a source
whose examples have natural string names (image files, a string ``id`` column, a TFRecord id
feature) also gives them as *keys*, which the tables carry as ``train_key``/``test_key``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np

from distributed_influence.errors import SourceError
from distributed_influence.store import storage


@dataclasses.dataclass
class Rows:
    """A block of rows: model-ready inputs, labels (or None), int64 ids and string keys (or None)."""

    x: np.ndarray
    y: Optional[np.ndarray]
    ids: np.ndarray
    keys: Optional[np.ndarray] = None


class Source(abc.ABC):
    """A table of examples that can be read by row range.

    Labels and ids are small (one integer per row), so most sources read them whole when they
    are opened (into ``_y`` and ``_ids``); only the inputs are read by row range. Sources that
    cannot know their labels without reading every record (TFRecord) override :meth:`read`
    and set ``labels_checked = False``, so the worker checks the labels of the rows it reads.
    """

    name: str
    n_rows: int
    _y: Optional[np.ndarray]
    _ids: np.ndarray
    _keys: Optional[np.ndarray] = None
    #: Whether :meth:`labels` holds every label (and the driver can check them before any work).
    labels_checked: bool = True
    #: Whether the source decodes images (then :meth:`read` needs the model's input shape).
    decodes_images: bool = False

    @property
    def has_labels(self) -> bool:
        """Whether the source carries labels."""
        return self._y is not None

    @property
    def has_keys(self) -> bool:
        """Whether rows have string keys (file paths, a string ``id`` column, an id feature)."""
        return self._keys is not None

    def labels(self) -> Optional[np.ndarray]:
        """All labels as int64, or None."""
        return self._y

    def ids(self) -> np.ndarray:
        """All ids as int64: the source's ``id`` column, else the 0-based row numbers."""
        return self._ids

    def keys(self) -> Optional[np.ndarray]:
        """All string keys (an object array), or None when the source has none or cannot list
        them without reading every row."""
        return self._keys

    def layout(self) -> Optional[dict]:
        """What a worker needs to open this source without scanning it again (small, JSON-ready).

        None for sources that open cheaply; TFRecord returns its files and record counts.
        """
        return None

    def describe(self) -> dict:
        """A summary for the manifest."""
        return {"kind": type(self).__name__, "rows": int(self.n_rows), "keys": self.has_keys}

    @abc.abstractmethod
    def _read_x(self, start: int, stop: int) -> np.ndarray:
        """Raw inputs of rows [start, stop)."""

    @property
    @abc.abstractmethod
    def example_shape(self) -> Tuple[int, ...]:
        """Shape of one example as stored (before any reshape to the model input)."""

    def check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.n_rows:
            raise SourceError(f"{self.name}: row range [{start}, {stop}) outside 0..{self.n_rows}")

    def read(self, start: int, stop: int, input_shape: Optional[Sequence[int]] = None) -> Rows:
        """Reads rows [start, stop) and shapes them for the model.

        Args:
            start: first row (0-based).
            stop: one past the last row.
            input_shape: the model's input shape; flat rows are reshaped to it.
        """
        self.check_range(start, stop)
        x = np.asarray(self._read_x(start, stop), dtype=np.float32)
        if input_shape is not None:
            x = reshape_to(x, input_shape, self.name)
        y = self.labels()
        keys = self.keys()
        return Rows(x=x, y=None if y is None else y[start:stop], ids=self.ids()[start:stop],
                    keys=None if keys is None else keys[start:stop])


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


def check_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim != 1:
        raise SourceError(f"{name}: labels must be one integer per row, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            return y.astype(np.int64)
        raise SourceError(f"{name}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def check_ids(ids: np.ndarray, name: str) -> np.ndarray:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SourceError(f"{name}: 'id' must be one integer per row, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64)


def check_keys(keys: np.ndarray, name: str) -> np.ndarray:
    """String keys must name one row each: a duplicate would make a table ambiguous."""
    keys = np.asarray(keys, dtype=object)
    uniq, counts = np.unique(keys.astype(str), return_counts=True)
    if len(uniq) != len(keys):
        raise SourceError(f"{name}: duplicate key {str(uniq[np.argmax(counts > 1)])!r}")
    return keys


def resolve(spec: str):
    """The filesystem and path of a source; a URI pyarrow cannot use is the user's error."""
    try:
        return storage.resolve(spec)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{spec}: cannot be opened ({storage.reason(exc)})") from None

