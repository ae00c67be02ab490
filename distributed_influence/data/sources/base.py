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

    def place(self, row: int) -> str:
        """Where a row is, in words a user finds it by (``row 7``; a TFRecord names its file)."""
        return f"row {row}"

    def keys_listed(self) -> bool:
        """Whether the driver holds every key (checked when the source was opened); False when
        only the workers see them, as they read the rows (TFRecord id features)."""
        return not self.has_keys or self.keys() is not None

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


def first_repeat(values: np.ndarray) -> Optional[Tuple[int, int]]:
    """Positions (i, j), i < j, of the first value met a second time in reading order, or None.

    The one sort also gives the other place of that value, so a refusal can name both rows
    (a user fixing the data needs both, not just the key).
    """
    values = np.asarray(values)
    if len(values) < 2:
        return None
    order = np.argsort(values, kind="stable")  # equal values keep reading order
    same = np.flatnonzero(values[order][1:] == values[order][:-1])
    if not len(same):
        return None
    # The earliest later occurrence is the second of its value (a third comes after it).
    k = same[np.argmin(order[same + 1])]
    return int(order[k]), int(order[k + 1])


def duplicate_error(name: str, what: str, value, first: str, second: str) -> SourceError:
    """The one-line refusal of a repeated id or key: which, and the two places it occurs."""
    shown = repr(value) if isinstance(value, str) else str(value)
    return SourceError(f"{name}: duplicate {what} {shown} at {first} and {second}")


def check_unique_keys(src: "Source", ids: np.ndarray, keys: np.ndarray) -> None:
    """Refuses keys that the workers read and one of which names two rows.

    For sources whose keys the driver never sees whole (:meth:`Source.keys_listed` is False):
    the workers return the keys of the rows they read, and this runs on all of them at once,
    so a key repeated across two shards is found as surely as one within a shard.

    Args:
        src: the source as the driver opened it (it names the places).
        ids: the rows' ids, which for a keyed source are its row numbers.
        keys: the rows' keys, in the same order.
    """
    repeat = first_repeat(np.asarray(keys))
    if repeat is not None:
        i, j = repeat
        raise duplicate_error(src.name, "key", str(keys[i]), src.place(int(ids[i])), src.place(int(ids[j])))


def check_ids(ids: np.ndarray, name: str) -> np.ndarray:
    """Ids must be integers, one per row, and name one row each: the tables are keyed by them."""
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SourceError(f"{name}: 'id' must be one integer per row, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    repeat = first_repeat(ids)
    if repeat is not None:
        raise duplicate_error(name, "id", int(ids[repeat[0]]), f"row {repeat[0]}", f"row {repeat[1]}")
    return ids


def check_keys(keys: np.ndarray, name: str) -> np.ndarray:
    """String keys must name one row each: a duplicate would make a table ambiguous."""
    keys = np.asarray(keys, dtype=object)
    repeat = first_repeat(keys.astype(str))
    if repeat is not None:
        raise duplicate_error(name, "key", str(keys[repeat[0]]), f"row {repeat[0]}", f"row {repeat[1]}")
    return keys


def resolve(spec: str):
    """The filesystem and path of a source; a URI pyarrow cannot use is the user's error."""
    try:
        return storage.resolve(spec)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{spec}: cannot be opened ({storage.reason(exc)})") from None

