"""Decisions applied to every format, and the outputs read back independently (NumPy, zipfile,
pyarrow, pandas): relabelled rows carry their new labels, removed rows are gone, ids, keys,
row order and every other column are unchanged, and the source is never touched."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from example_records import write_rows
from review_data import (
    HEADER,
    N_ROWS,
    digest,
    ids,
    inputs,
    keys,
    labels,
    write_csv,
    write_npz,
    write_parquet,
)

from distributed_influence.cleaning.apply import apply_review
from distributed_influence.cli import main

I, Y, X = ids(), labels(), inputs()
RELABEL = {1: 2, 4: 0, 9: 1}  # row → new label (rows 1 and 4 have label 1, row 9 label 0)
REMOVE = (2, 5, 17)
KEEP, UNSURE = (0, 7), (3,)


def decision_lines(row_id, key=None) -> list:
    """The decisions above as CSV lines, naming rows by ``row_id(row)`` (and keys when given)."""
    k = (lambda r: key(r)) if key else (lambda r: "")
    lines = [f"{row_id(r)},{Y[r]},relabel,{c},{k(r)},2024-05-01T10:00:00Z" for r, c in RELABEL.items()]
    lines += [f"{row_id(r)},{Y[r]},remove,,{k(r)}," for r in REMOVE]
    lines += [f"{row_id(r)},{Y[r]},keep,,{k(r)}," for r in KEEP]
    lines += [f"{row_id(r)},{Y[r]},unsure,,{k(r)}," for r in UNSURE]
    return lines


def expected_labels() -> np.ndarray:
    y = Y.copy()
    for r, c in RELABEL.items():
        y[r] = c
    return y


KEPT = np.array([r not in REMOVE for r in range(N_ROWS)])


def check_label_map(path, train_ids, with_keys: bool) -> None:
    m = pq.read_table(path)
    assert m.column_names == ["train_id"] + (["train_key"] if with_keys else []) + ["label", "new_label", "action"]
    assert m.column("train_id").to_pylist() == list(train_ids)
    if with_keys:
        assert m.column("train_key").to_pylist() == keys()
    assert m.column("label").to_pylist() == list(Y)
    new = expected_labels().astype(object)
    new[list(REMOVE)] = None
    assert m.column("new_label").to_pylist() == list(new)
    action = ["undecided"] * N_ROWS
    for rows, name in ((RELABEL, "relabel"), (REMOVE, "remove"), (KEEP, "keep"), (UNSURE, "unsure")):
        for r in rows:
            action[r] = name
    assert m.column("action").to_pylist() == action


def check_summary(out) -> None:
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["command"] == "apply-review" and s["rows"] == N_ROWS and s["rows_written"] == N_ROWS - len(REMOVE)
    assert s["counts"] == {"keep": 2, "relabel": 3, "remove": 3, "unsure": 1, "undecided": 11}
    # Given classes: rows 0,3,6,... are class 0; 1,4,7,... class 1; 2,5,8,... class 2.
    assert s["by_class"] == [
        {"class": 0, "rows": 7, "keep": 1, "relabel": 1, "remove": 0, "unsure": 1, "undecided": 4, "relabelled_in": 1},
        {"class": 1, "rows": 7, "keep": 1, "relabel": 2, "remove": 0, "unsure": 0, "undecided": 4, "relabelled_in": 1},
        {"class": 2, "rows": 6, "keep": 0, "relabel": 0, "remove": 3, "unsure": 0, "undecided": 3, "relabelled_in": 1},
    ]


def test_npz_with_ids(tmp_path, capsys):
    weight = np.linspace(0, 1, N_ROWS)
    names = np.array([7, 8, 9])  # not one entry per row: copied as it is
    src = write_npz(tmp_path / "train.npz", weight=weight, class_codes=names)
    before = digest(src)
    out = tmp_path / "clean"
    code = main(["apply-review", "--train", src, "--out", str(out),
                 "--decisions", write_csv(tmp_path / "d.csv", decision_lines(lambda r: I[r]))])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert printed[0] == f"wrote {out}: train.npz, label_map.parquet, summary.json (17 of 20 rows in train.npz)"
    assert printed[1] == "decisions: 2 kept, 3 relabelled, 3 removed, 1 unsure; 11 rows undecided (left as they are)"
    assert sorted(os.listdir(out)) == ["label_map.parquet", "summary.json", "train.npz"]
    with zipfile.ZipFile(out / "train.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert sorted(zf.namelist()) == ["class_codes.npy", "id.npy", "weight.npy", "x.npy", "y.npy"]
    with np.load(out / "train.npz", allow_pickle=False) as d:
        np.testing.assert_array_equal(d["y"], expected_labels()[KEPT])
        assert d["y"].dtype == Y.dtype
        np.testing.assert_array_equal(d["id"], I[KEPT])
        np.testing.assert_array_equal(d["x"], X[KEPT])
        np.testing.assert_array_equal(d["weight"], weight[KEPT])
        np.testing.assert_array_equal(d["class_codes"], names)
    check_label_map(out / "label_map.parquet", I, with_keys=False)
    check_summary(out)
    assert digest(src) == before


def test_compressed_npz_without_ids_gains_row_numbers_and_is_memory_mapped(tmp_path):
    from distributed_influence.data.sources import open_source

    src = write_npz(tmp_path / "train.npz", with_ids=False, compressed=True)
    out = tmp_path / "clean"
    apply_review(src, str(out), decisions=write_csv(tmp_path / "d.csv", decision_lines(lambda r: r)))
    with np.load(out / "train.npz", allow_pickle=False) as d:
        np.testing.assert_array_equal(d["id"], np.arange(N_ROWS)[KEPT])
        np.testing.assert_array_equal(d["y"], expected_labels()[KEPT])
        np.testing.assert_array_equal(d["x"], X[KEPT])
    copy = open_source(str(out / "train.npz"))
    assert isinstance(copy._x, np.memmap)  # stored members: the audit of the copy maps them
    np.testing.assert_array_equal(copy.ids(), np.arange(N_ROWS)[KEPT])
    check_label_map(out / "label_map.parquet", np.arange(N_ROWS), with_keys=False)


@pytest.mark.parametrize("id_column", ["int", None, "str"])
def test_parquet(tmp_path, id_column):
    src = write_parquet(tmp_path / "train.parquet", id_column=id_column)
    before = digest(src)
    row_id = (lambda r: I[r]) if id_column == "int" else (lambda r: r)
    key = (lambda r: keys()[r]) if id_column == "str" else None
    out = tmp_path / "clean"
    summary = apply_review(src, str(out), decisions=write_csv(tmp_path / "d.csv", decision_lines(row_id, key)))
    assert summary["files"] == ["train.parquet", "label_map.parquet", "summary.json"]
    original = pq.read_table(src)
    copy = pq.read_table(out / "train.parquet")
    names = original.column_names + ([] if id_column else ["id"])
    assert copy.column_names == names
    assert copy.schema.field("label").type == original.schema.field("label").type  # int8 kept
    assert copy.schema.metadata[b"origin"] == b"review tests"
    assert copy.column("label").to_pylist() == list(expected_labels()[KEPT])
    kept = np.flatnonzero(KEPT)
    for col in ("x", "note"):
        assert copy.column(col).to_pylist() == [original.column(col)[int(r)].as_py() for r in kept]
    expected_ids = {"int": list(I[KEPT]), None: list(kept), "str": [keys()[r] for r in kept]}[id_column]
    assert copy.column("id").to_pylist() == expected_ids
    meta = pq.ParquetFile(out / "train.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert meta.num_row_groups == pq.ParquetFile(src).metadata.num_row_groups
    check_label_map(out / "label_map.parquet", I if id_column == "int" else np.arange(N_ROWS),
                    with_keys=id_column == "str")
    check_summary(out)
    assert digest(src) == before


def test_header_only_file_writes_an_unchanged_copy(tmp_path):
    src = write_npz(tmp_path / "train.npz", with_ids=False)
    summary = apply_review(src, str(tmp_path / "out"), decisions=write_csv(tmp_path / "d.csv", []))
    assert summary["counts"] == {"keep": 0, "relabel": 0, "remove": 0, "unsure": 0, "undecided": N_ROWS}
    with np.load(tmp_path / "out" / "train.npz") as d:
        np.testing.assert_array_equal(d["y"], Y)
        np.testing.assert_array_equal(d["x"], X)
        np.testing.assert_array_equal(d["id"], np.arange(N_ROWS))


def test_new_labels_wider_than_the_label_dtype_widen_it(tmp_path):
    np.savez(tmp_path / "train.npz", x=X, y=Y.astype(np.int8), id=I)
    lines = [f"{I[1]},{Y[1]},relabel,200,,"]
    summary = apply_review(str(tmp_path / "train.npz"), str(tmp_path / "out"), classes=201,
                           decisions=write_csv(tmp_path / "d.csv", lines))
    with np.load(tmp_path / "out" / "train.npz") as d:
        assert d["y"].dtype == np.int64 and d["y"][1] == 200 and list(d["y"][2:]) == list(Y[2:])
    assert summary["n_classes"] == 201 and summary["classes"] == "--classes 201"
    src = write_parquet(tmp_path / "train.parquet")  # an int8 label column
    apply_review(src, str(tmp_path / "out2"), classes=201, decisions=write_csv(tmp_path / "d.csv", lines))
    copy = pq.read_table(tmp_path / "out2" / "train.parquet")
    assert str(copy.schema.field("label").type) == "int64" and copy.column("label")[1].as_py() == 200


def test_image_folder_gets_a_label_map_joined_by_pandas(tmp_path):
    import pandas as pd
    from PIL import Image

    folder = tmp_path / "images"
    files = []
    for cls in ("cat", "dog"):
        for i in range(3):
            (folder / cls).mkdir(parents=True, exist_ok=True)
            Image.new("L", (4, 4), color=i).save(folder / cls / f"{i}.png")
            files.append(f"{cls}/{i}.png")
    # Rows are class by class, by sorted path: ids 0..5 are cat/0..2, dog/0..2.
    lines = ["1,0,relabel,1,cat/1.png,", "4,1,remove,,dog/1.png,", "5,1,keep,,dog/2.png,"]
    out = tmp_path / "out"
    summary = apply_review(str(folder), str(out), decisions=write_csv(tmp_path / "d.csv", lines))
    assert sorted(os.listdir(out)) == ["label_map.parquet", "summary.json"]  # no copy of the images
    assert summary["format"] is None and summary["source_kind"] == "image folder" and summary["n_classes"] == 2
    # The join docs/cli.md shows: the user's own table of files, merged on the relative path.
    files = pd.DataFrame({"path": files})
    m = pd.read_parquet(out / "label_map.parquet")
    files = files.merge(m[["train_key", "new_label"]], left_on="path", right_on="train_key").dropna(subset=["new_label"])
    assert files.path.tolist() == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/2.png"]
    assert files.new_label.astype(int).tolist() == [0, 1, 0, 1, 1]
    assert sorted(os.listdir(folder)) == ["cat", "dog"]


def test_digits_gets_a_label_map_only(tmp_path, capsys):
    import pandas as pd

    from distributed_influence.data.sources import digits_arrays

    _, y = digits_arrays("train")
    lines = [f"0,{y[0]},relabel,{(y[0] + 1) % 10},,", f"1,{y[1]},remove,,,"]
    out = tmp_path / "out"
    assert main(["apply-review", "--train", "digits", "--out", str(out),
                 "--decisions", write_csv(tmp_path / "d.csv", lines)]) == 0
    assert "(no copy of a digits source: join label_map.parquet into the input pipeline)" in capsys.readouterr().out
    m = pq.read_table(out / "label_map.parquet")
    assert m.num_rows == len(y) and m.column("new_label")[0].as_py() == (y[0] + 1) % 10
    assert m.column("new_label")[1].as_py() is None and m.column("action")[2].as_py() == "undecided"
    # The join docs/cli.md shows for sources in memory: rows in the source's order.
    x, y_given = digits_arrays("train")
    m = pd.read_parquet(out / "label_map.parquet")
    keep = m.new_label.notna().values; x, y = x[keep], m.new_label[keep].astype("int64").values  # noqa: E702
    assert len(x) == len(y_given) - 1 and y[0] == (y_given[0] + 1) % 10 and list(y[1:]) == list(y_given[2:])


def test_tfrecord_gets_a_label_map_joined_by_a_lookup_table(tmp_path):
    """TensorFlow writes the records and runs the join docs/cli.md shows."""
    import tensorflow as tf

    write_rows(tmp_path, "train", X, Y, keys(), files=2)
    spec = str(tmp_path / "train-*.tfrecord")
    out = tmp_path / "out"
    summary = apply_review(spec, str(out), decisions=write_csv(
        tmp_path / "d.csv", decision_lines(lambda r: r, lambda r: keys()[r])))
    assert summary["format"] is None and summary["files"] == ["label_map.parquet", "summary.json"]
    check_label_map(out / "label_map.parquet", np.arange(N_ROWS), with_keys=True)
    # The join of docs/cli.md: a lookup table from key to new label (-1: removed), then a filter.
    m = pq.read_table(out / "label_map.parquet").to_pandas()
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        m.train_key.values, m.new_label.fillna(-1).astype("int64").values), default_value=-1)
    spec_ = {"id": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}
    ds = tf.data.TFRecordDataset(sorted(str(p) for p in tmp_path.glob("train-*.tfrecord")))
    ds = ds.map(lambda r: tf.io.parse_single_example(r, spec_))
    ds = ds.map(lambda ex: {**ex, "label": table.lookup(ex["id"])}).filter(lambda ex: ex["label"] >= 0)
    got = [(ex["id"].decode(), int(ex["label"])) for ex in ds.as_numpy_iterator()]
    assert got == [(keys()[r], int(expected_labels()[r])) for r in np.flatnonzero(KEPT)]


def test_python_function_returns_what_summary_json_holds(tmp_path):
    src = write_npz(tmp_path / "train.npz")
    summary = apply_review(src, str(tmp_path / "out"), decisions=write_csv(
        tmp_path / "d.csv", decision_lines(lambda r: I[r]), header=HEADER))
    assert summary == json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["from"] == {"decisions": str(tmp_path / "d.csv")}


def test_a_file_as_a_spreadsheet_saves_it(tmp_path):
    """Byte-order mark, CRLF line ends, quoted fields, columns in another order, an extra
    column, spaces around values and blank lines: the same decisions."""
    rows = [f'relabel,"{I[r]}", {Y[r]},"reviewer, A",{c}' for r, c in RELABEL.items()]
    rows += [f"remove,{I[r]},{Y[r]},," for r in REMOVE] + [f" keep ,{I[r]},{Y[r]},B," for r in KEEP]
    rows += [f"unsure,{I[r]},{Y[r]},," for r in UNSURE]
    text = "\r\n".join(["action,train_id,label,reviewer,new_label"] + rows + ["", ""])
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    out = tmp_path / "out"
    apply_review(write_npz(tmp_path / "train.npz"), str(out), decisions=str(path))
    check_label_map(out / "label_map.parquet", I, with_keys=False)
    check_summary(out)


@pytest.mark.parametrize("with_keys", [True, False])
def test_tfrecord_labels_and_keys_are_what_read_returns(tmp_path, with_keys):
    """The walk apply-review takes (no image decoded) reads each record as the audit's workers do."""
    from distributed_influence.data.sources import open_source

    write_rows(tmp_path, "train", X, Y, keys() if with_keys else None, files=2)
    src = open_source(str(tmp_path / "train-*.tfrecord"))
    labels_, ids_, keys_ = src.labels_and_keys()
    rows = src.read(0, src.n_rows)
    assert labels_.dtype == np.int64 and list(labels_) == list(rows.y) == list(Y)
    assert list(ids_) == list(rows.ids) == list(range(N_ROWS))
    if with_keys:
        assert list(keys_) == list(rows.keys) == keys()
    else:
        assert keys_ is None and rows.keys is None


def test_uncompressed_parquet_is_copied_uncompressed(tmp_path):
    """pyarrow names the codec of such a file UNCOMPRESSED, a name its writer does not take."""
    src = write_parquet(tmp_path / "train.parquet", compression=None)
    out = tmp_path / "clean"
    apply_review(src, str(out), decisions=write_csv(tmp_path / "d.csv", decision_lines(lambda r: I[r])))
    meta = pq.ParquetFile(out / "train.parquet").metadata
    assert {meta.row_group(g).column(c).compression
            for g in range(meta.num_row_groups) for c in range(meta.num_columns)} == {"UNCOMPRESSED"}
    assert pq.read_table(out / "train.parquet").column("label").to_pylist() == list(expected_labels()[KEPT])


@pytest.mark.parametrize("reported, written", [("UNCOMPRESSED", "none"), ("UNKNOWN", "snappy"), ("LZO", "snappy"),
                                               ("SNAPPY", "snappy"), ("GZIP", "gzip"), ("ZSTD", "zstd")])
def test_the_sources_codec_is_given_to_the_writer_by_a_name_it_takes(reported, written):
    """Codecs as Parquet metadata names them (UNKNOWN, or LZO, which pyarrow reads but cannot write, are
    written with the writer's default), each accepted by ParquetWriter."""
    from types import SimpleNamespace

    from distributed_influence.cleaning.copies import _parquet_compression

    column = SimpleNamespace(compression=reported)
    group = SimpleNamespace(column=lambda c: column)
    meta = SimpleNamespace(num_row_groups=1, num_columns=1, row_group=lambda g: group)
    assert _parquet_compression(meta) == written
    with pq.ParquetWriter(pa.BufferOutputStream(), pa.schema([("a", pa.int64())]), compression=written) as w:
        w.write_table(pa.table({"a": [1]}))


@pytest.mark.parametrize("kind", ["npz", "parquet"])
def test_a_removal_keeps_a_uint8_label_dtype(tmp_path, kind):
    """A removed row's label is never written, so it must not widen ``y``/``label`` (docs/cli.md: the
    dtype is kept unless a new label does not fit it)."""
    if kind == "npz":
        np.savez(tmp_path / "train.npz", x=X, y=Y.astype(np.uint8), id=I)
        src = str(tmp_path / "train.npz")
    else:
        src = write_parquet(tmp_path / "train.parquet", label_type=pa.uint8())
    lines = [f"{I[1]},{Y[1]},relabel,2,,", f"{I[2]},{Y[2]},remove,,,"]
    apply_review(src, str(tmp_path / "out"), decisions=write_csv(tmp_path / "d.csv", lines))
    expected = [2 if r == 1 else int(Y[r]) for r in range(N_ROWS) if r != 2]
    if kind == "npz":
        with np.load(tmp_path / "out" / "train.npz") as d:
            assert d["y"].dtype == np.uint8 and d["y"].tolist() == expected
    else:
        copy = pq.read_table(tmp_path / "out" / "train.parquet")
        assert copy.schema.field("label").type == pa.uint8() and copy.column("label").to_pylist() == expected


def test_a_key_with_spaces_at_its_ends_is_matched_as_written(tmp_path):
    """The review page quotes a key whose ends are spaces so that they survive the file; reading
    it back must keep them too, or the key is not the source's."""
    spaced = keys()
    spaced[3] = " img/003 (copy).png "
    src = write_parquet(tmp_path / "train.parquet", id_column="str", keys_=spaced)
    # As review.js writes the line: the key quoted, because trimming would change it.
    lines = [f'3,{Y[3]},relabel,{(Y[3] + 1) % 3},"{spaced[3]}",2024-05-01T10:00:00Z', f"4,{Y[4]},keep,,{spaced[4]},"]
    out = tmp_path / "out"
    summary = apply_review(src, str(out), decisions=write_csv(tmp_path / "d.csv", lines))
    assert summary["counts"]["relabel"] == 1 and summary["counts"]["keep"] == 1
    m = pq.read_table(out / "label_map.parquet")
    assert m.column("train_key")[3].as_py() == spaced[3] and m.column("new_label")[3].as_py() == (Y[3] + 1) % 3
    assert pq.read_table(out / "train.parquet").column("id").to_pylist() == spaced
