"""Matrices as Parquet columns: both layouts round-trip exactly, through real Parquet files."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_influence.store import index
from distributed_influence.store.columns import fixed_list, matrix, packed


@pytest.mark.parametrize("layout", [fixed_list, packed])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_matrix_round_trips_through_parquet_in_both_layouts(tmp_path, layout, dtype):
    rng = np.random.default_rng(0)
    m = (rng.normal(size=(257, 13)) * 1e3).astype(dtype)
    m[3, 4] = np.finfo(np.float32).tiny if dtype != np.int32 else -7
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"m": layout(m, dtype)}), path, row_group_size=100)  # 3 row groups
    back = matrix(pq.read_table(path).column("m"), dtype)
    assert back.dtype == dtype and back.flags.writeable
    np.testing.assert_array_equal(back, m)
    # A slice of the column (non-zero offset) reads its own rows only.
    col = pa.table({"m": layout(m, dtype)}).column("m").combine_chunks()
    np.testing.assert_array_equal(matrix(col.slice(100, 57), dtype), m[100:157])


def test_index_shard_written_by_an_earlier_version_with_list_columns_still_reads(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 9)).astype(np.float32)
    alpha = rng.normal(size=(40, 3))
    ids, labels = np.arange(40) * 3, rng.integers(0, 3, size=40)
    old = str(tmp_path / "old.parquet")
    pq.write_table(pa.table({"train_id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int32()),
                             "features": fixed_list(x, np.float32), "alpha": fixed_list(alpha, np.float64)}), old)
    new = str(tmp_path / "new.parquet")
    index.write_shard(new, ids, labels, x, alpha)
    assert pa.types.is_fixed_size_binary(pq.read_schema(new).field("features").type)
    for path in (old, new):
        shard = index.read_shard(path)
        np.testing.assert_array_equal(shard["x"], x)
        np.testing.assert_array_equal(shard["alpha"], alpha)
        np.testing.assert_array_equal(shard["ids"], ids)


@pytest.mark.parametrize("arr", [
    np.arange(12.0).reshape(3, 4),
    np.arange(12, dtype=">i4").reshape(3, 4),  # big-endian input
    np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2],  # not contiguous
    np.array([[True, False], [False, False]]),
    np.zeros((0, 5), np.float32),
], ids=["float64", "big-endian", "strided", "bool", "empty"])
def test_fixed_list_equals_pyarrows_own_conversion(arr):
    """``fixed_list`` builds number columns from the buffer (not ``pa.array``): the same column.
    (``pa.array`` itself refuses byte-swapped input: it is given the values in native order.)"""
    native = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    expected = pa.FixedSizeListArray.from_arrays(pa.array(native.reshape(-1)), arr.shape[1])
    got = fixed_list(arr)
    assert got.type.value_type == expected.type.value_type and got.to_pylist() == expected.to_pylist()
