"""Each source reads the same rows as a brute-force reader, whole and by row range."""

import gzip
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RANGES

from distributed_influence.data.sources import open_source
from distributed_influence.errors import SourceError


def _check(src, x, y, ids, shape):
    assert src.n_rows == len(x)
    for a, b in RANGES:
        rows = src.read(a, b, shape)
        np.testing.assert_allclose(rows.x, x[a:b].reshape((b - a,) + shape), rtol=1e-7)
        if y is not None:
            np.testing.assert_array_equal(rows.y, y[a:b])
        np.testing.assert_array_equal(rows.ids, ids[a:b])


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_rows_and_ids(tmp_path, arrays, compressed):
    x, y, ids = arrays
    path = str(tmp_path / "d.npz")
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y, id=ids)
    src = open_source(path)
    with np.load(path, allow_pickle=False) as ref:
        _check(src, ref["x"], ref["y"], ref["id"], (4, 3))
    if not compressed:
        assert isinstance(src._x, np.memmap)  # read lazily, row range by row range
    # Flat rows reshape to a model input of the same size.
    np.testing.assert_allclose(src.read(3, 5, (12,)).x, x[3:5].reshape(2, 12))


def test_npz_without_ids_uses_row_numbers_and_test_without_labels(tmp_path, arrays):
    x, _, _ = arrays
    path = str(tmp_path / "d.npz")
    np.savez(path, x=x)
    src = open_source(path)
    assert not src.has_labels and src.read(5, 8).y is None
    np.testing.assert_array_equal(src.ids(), np.arange(50))


def test_npz_object_array_is_refused_not_unpickled(tmp_path):
    path = str(tmp_path / "obj.npz")
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(SourceError, match="refusing to unpickle|corrupt"):
        open_source(path)


def test_truncated_npz_is_refused(tmp_path, arrays):
    x, y, _ = arrays
    path = tmp_path / "t.npz"
    np.savez(str(path), x=x, y=y)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="corrupt|truncated"):
        open_source(str(path))


def test_parquet_x_list_column_with_ids(tmp_path, arrays):
    x, y, ids = arrays
    path = str(tmp_path / "d.parquet")
    table = pa.table({"id": ids, "label": y, "x": [row.ravel().tolist() for row in x]})
    pq.write_table(table, path, row_group_size=8)  # ranges cross row-group borders
    src = open_source(path)
    ref = pq.read_table(path).to_pydict()
    _check(src, np.array(ref["x"], dtype=np.float32), np.array(ref["label"]), np.array(ref["id"]), (4, 3))


def test_parquet_image_column_scaled(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(50, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 3, size=50)
    path = str(tmp_path / "img.parquet")
    pq.write_table(pa.table({"label": y, "image": [im.tobytes() for im in img]}), path, row_group_size=16)
    src = open_source(path)
    _check(src, img.astype(np.float32) / 255.0, y, np.arange(50), (6, 6, 1))


def test_parquet_without_x_or_image_is_refused(tmp_path):
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"label": [1, 2]}), path)
    with pytest.raises(SourceError, match="'x' or 'image'"):
        open_source(path)


def test_corrupt_parquet_is_refused(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(SourceError, match="corrupt"):
        open_source(str(path))


def _write_idx(path, arr, gz):
    codes = {np.dtype(np.uint8): 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[arr.dtype], arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels(tmp_path, gz):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(50, 5, 5), dtype=np.uint8)
    lab = rng.integers(0, 10, size=50).astype(np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(str(tmp_path / f"train-images-idx3-ubyte{ext}"), img, gz)
    _write_idx(str(tmp_path / f"train-labels-idx1-ubyte{ext}"), lab, gz)
    src = open_source(str(tmp_path / f"train-images-idx3-ubyte{ext}"))
    _check(src, img.astype(np.float32) / 255.0, lab.astype(np.int64), np.arange(50), (5, 5, 1))


def test_digits_bundled_split():
    from sklearn.datasets import load_digits

    tr, te = open_source("digits"), open_source("digits:test")
    assert tr.n_rows + te.n_rows == 1797
    both = np.concatenate([tr.read(0, tr.n_rows).x, te.read(0, te.n_rows).x]).reshape(1797, 64)
    ref = load_digits().data / 16.0
    # Same multiset of images: compare sorted row keys.
    key = lambda a: np.sort(np.round(a * 16).astype(int) @ (17 ** np.arange(64) % 1000003))
    np.testing.assert_array_equal(key(both), key(ref))


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "absent.npz"))
    other = tmp_path / "data.csv"
    other.write_text("1,2\n")
    with pytest.raises(SourceError, match="unknown source kind"):
        open_source(str(other))


@pytest.mark.parametrize("column", ["x", "image"])
def test_parquet_rows_of_different_lengths_are_refused(tmp_path, column):
    rows = [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4, 0.5]] + [[0.0] * 4] * 2
    values = rows if column == "x" else [bytes(len(r)) for r in rows]
    path = str(tmp_path / "ragged.parquet")
    pq.write_table(pa.table({"label": [0, 1, 0, 1], column: values}), path)
    with pytest.raises(SourceError, match="different lengths"):
        open_source(path).read(0, 4)
