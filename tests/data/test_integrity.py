"""Inputs that must not slip through at the source level: GZIP-compressed TFRecords (read, or
refused naming the file), ids and keys given twice (refused naming both rows), and the content
fingerprint of sources of several files, which changes exactly when the files a source reads do."""

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from example_records import example, write, write_rows

from distributed_influence.cli import build_parser, config_from_args
from distributed_influence.config import AuditConfig
from distributed_influence.data.sources import open_source
from distributed_influence.errors import ConfigError, SourceError
from distributed_influence.store.workstore import fingerprint

N = 60  # fewer than a block parsed at once (images.SMALL_BLOCK): float lists go record by record


@pytest.fixture(scope="module")
def rows():
    import tensorflow  # noqa: F401 - the writer's import (seconds), once for the module, not in a test

    rng = np.random.default_rng(5)
    return rng.normal(size=(N, 6)).astype(np.float32), rng.integers(0, 3, size=N), [f"r{i:03d}" for i in range(N)]


# ---------------------------------------------------------------------------------- GZIP


def test_gzip_tfrecords_read_the_rows_of_the_uncompressed_files(rows, tmp_path):
    """Counted and skipped on the decompressed stream: every row range, read by a worker that
    was given the driver's layout, equals the same rows of the uncompressed files."""
    x, y, keys = rows
    write_rows(tmp_path, "plain", x, y, keys, files=3)
    write_rows(tmp_path, "packed", x, y, keys, files=3, gzip=True, suffix=".tfrecord.gz")
    plain = open_source(str(tmp_path / "plain-*.tfrecord"))
    packed = open_source(str(tmp_path / "packed-*.tfrecord.gz"))
    assert packed.counts == plain.counts == [20, 20, 20]
    assert [f["compression"] for f in packed.describe()["files"]] == ["gzip"] * 3
    assert "compression" not in plain.describe()["files"][0]
    worker = open_source(str(tmp_path / "packed-*.tfrecord.gz"), layout=packed.layout())
    for a, b in [(0, N), (0, 1), (21, 57), (19, 41), (59, 60), (40, 40)]:
        got, want = worker.read(a, b, (6,)), plain.read(a, b, (6,))
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.x, x[a:b])
        np.testing.assert_array_equal(got.y, y[a:b])
        np.testing.assert_array_equal(got.keys, keys[a:b])


def test_compression_flag_reads_gzip_files_not_named_so(rows, tmp_path):
    """TFDS/Beam shards need not end in .gz: --compression gzip reads them; without it the
    refusal says what the file looks like."""
    x, y, _ = rows
    path = write(tmp_path / "beam.tfrecord-00000-of-00001", [example(x[i], y[i]) for i in range(N)], gzip=True)
    src = open_source(path, compression="gzip")
    assert src.n_rows == N
    np.testing.assert_array_equal(src.read(10, 20, (6,)).x, x[10:20])
    with pytest.raises(SourceError) as err:
        open_source(path)
    assert str(err.value).startswith(f"{path}: record 0: truncated")
    assert str(err.value).endswith("(the file looks GZIP-compressed: name it *.gz or pass --compression gzip)")


def _gzip_file(tmp_path, rows, name: str) -> bytearray:
    x, y, _ = rows
    return bytearray(open(write(tmp_path / name, [example(x[i], y[i]) for i in range(N)], gzip=True), "rb").read())


def test_corrupt_or_truncated_gzip_is_refused_naming_the_file(rows, tmp_path):
    data = _gzip_file(tmp_path, rows, "ok.tfrecord.gz")
    cases = {
        "header.tfrecord.gz": (data[:2] + b"\x09" + data[3:], "zlib inflate failed: unknown compression method"),
        "check.tfrecord.gz": (data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:],
                              "zlib inflate failed: incorrect data check"),
        "cut.tfrecord.gz": (data[: len(data) // 2], "Truncated compressed stream"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(bytes(content))
        with pytest.raises(SourceError) as err:
            open_source(str(path))
        assert str(err.value) == f"{path}: corrupt or truncated GZIP file ({reason})"


def test_a_tfr_gz_name_is_a_tfrecord():
    from distributed_influence.data.sources.records import compression_of, is_tfrecord_name

    assert is_tfrecord_name("train.tfr.gz") and is_tfrecord_name("x.tfrecord-00001-of-00010.gz")
    assert not is_tfrecord_name("train-images-idx3-ubyte.gz")
    assert compression_of("a.tfrecord.GZ", None) == "gzip" and compression_of("a.tfrecord", None) is None
    assert compression_of("a.tfrecord.gz", "none") is None and compression_of("a.tfrecord", "gzip") == "gzip"


def test_compression_enters_the_digest_only_when_set():
    """Runs that leave --compression alone keep their digest (and so their run key) from before it."""
    base = dict(model="model.keras", train="digits", test="digits:test", out="out")
    assert AuditConfig(**base).digest() == "494113c87bf8b1a3"  # pinned in tests/config/test_config.py
    assert AuditConfig(**base, compression="gzip").digest() != AuditConfig(**base).digest()
    audit = next(a for a in build_parser()._actions if a.dest == "command").choices["audit"]
    argv = ["--model", "m.keras", "--train", "t-*.gz", "--test", "digits", "--out", "o"]
    assert config_from_args(audit.parse_args(argv + ["--compression", "gzip"])).compression == "gzip"
    assert config_from_args(audit.parse_args(argv)).compression is None
    with pytest.raises(ConfigError, match=r"--compression must be one of gzip, none, got 'zip'"):
        AuditConfig(**base, compression="zip")


# ------------------------------------------------------------------------------ duplicates


def test_first_repeat_finds_the_first_value_met_twice():
    from distributed_influence.data.sources.base import first_repeat

    assert first_repeat(np.array([3, 1, 2])) is None and first_repeat(np.array([], np.int64)) is None
    assert first_repeat(np.array([5, 1, 5, 1])) == (0, 2)
    assert first_repeat(np.array([5, 1, 7, 1, 5])) == (1, 3)  # 1 repeats before 5 does
    assert first_repeat(np.array(["b", "a", "a", "b"])) == (1, 2)


def test_duplicate_ids_and_keys_name_both_rows(rows, tmp_path):
    x, y, keys = rows
    ids = np.arange(N) * 10
    ids[41] = ids[17]
    str_keys = list(keys)
    str_keys[40] = str_keys[3]
    np.savez(tmp_path / "dup.npz", x=x, y=y, id=ids)
    pq.write_table(pa.table({"x": list(x), "label": y, "id": ids}), tmp_path / "dup_int.parquet")
    pq.write_table(pa.table({"x": list(x), "label": y, "id": str_keys}), tmp_path / "dup_str.parquet")
    expected = {
        "dup.npz": "duplicate id 170 at row 17 and row 41",
        "dup_int.parquet": "duplicate id 170 at row 17 and row 41",
        "dup_str.parquet": "duplicate key 'r003' at row 3 and row 40",
    }
    for name, words in expected.items():
        path = str(tmp_path / name)
        with pytest.raises(SourceError) as err:
            open_source(path)
        assert str(err.value) == f"{path}: {words}"


# ---------------------------------------------------------------------------- fingerprints


def _folder(root, n=6):
    for i in range(n):
        os.makedirs(root / f"c{i % 2}", exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.png").write_bytes(b"png" * (i + 1))
    return str(root)


def test_folder_fingerprint_follows_the_images_it_reads(tmp_path):
    spec = _folder(tmp_path / "imgs")
    first = fingerprint(spec)
    assert fingerprint(spec) == first  # stable: the same listing gives the same run key
    added = tmp_path / "imgs" / "c1" / "new.jpg"
    added.write_bytes(b"jpg")
    assert fingerprint(spec) not in (first, None)
    added.unlink()
    assert fingerprint(spec) == first  # nothing but the listing enters it
    png = tmp_path / "imgs" / "c0" / "2.png"
    st = png.stat()
    png.write_bytes(b"PNG" * 3)  # rewritten, same size
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    rewritten = fingerprint(spec)
    assert rewritten != first
    os.rename(png, tmp_path / "imgs" / "c1" / "2.png")  # moved to another class: another label
    assert fingerprint(spec) not in (first, rewritten)
    # What the folder source ignores does not start a run afresh.
    os.rename(tmp_path / "imgs" / "c1" / "2.png", png)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "imgs" / "README.txt").write_text("about")
    (tmp_path / "imgs" / "c0" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "imgs" / "top.png").write_bytes(b"x")
    assert fingerprint(spec) == first


def test_glob_and_list_fingerprints_follow_their_files(rows, tmp_path):
    x, y, _ = rows
    paths = write_rows(tmp_path, "t", x, y, files=3)
    spec = str(tmp_path / "t-*.tfrecord")
    listed = ",".join(paths[:2])
    first, first_list = fingerprint(spec), fingerprint(listed)
    write(tmp_path / "t-00003-of-00003.tfrecord", [example(x[0], y[0])])  # matches the glob
    assert fingerprint(spec) != first and fingerprint(listed) == first_list
    os.remove(tmp_path / "t-00003-of-00003.tfrecord")
    assert fingerprint(spec) == first
    write(paths[1], [example(x[i], y[i]) for i in range(5)])  # rewritten
    assert fingerprint(spec) != first and fingerprint(listed) != first_list


def test_a_single_file_keeps_the_fingerprint_of_earlier_versions(tmp_path):
    """Size and modification time, as before: run keys of single-file sources do not move."""
    path = tmp_path / "train.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.zeros(3, np.int64))
    st = path.stat()
    assert fingerprint(str(path)) == f"{path}|{st.st_size}|{st.st_mtime_ns}"
    assert fingerprint("digits:test") == "digits:test"


def test_fingerprints_read_no_file(tmp_path):
    """A folder and a glob of 64 GiB files (sparse: nothing on disk) are fingerprinted from their
    listing in well under a second; reading them would take minutes."""
    big = 64 * 2**30
    for name in ("c0/a.png", "c1/b.png"):
        os.makedirs(tmp_path / "imgs" / os.path.dirname(name), exist_ok=True)
        with open(tmp_path / "imgs" / name, "wb") as fh:
            fh.truncate(big)
    for i in range(2):
        with open(tmp_path / f"big-{i}.tfrecord", "wb") as fh:
            fh.truncate(big)
    t0 = time.perf_counter()
    for spec in (str(tmp_path / "imgs"), str(tmp_path / "big-*.tfrecord")):
        assert "|2 files|" in fingerprint(spec)
    assert time.perf_counter() - t0 < 1.0


@pytest.fixture(scope="module")
def s3():
    from moto_s3 import moto_s3

    yield from moto_s3()


def test_gzip_and_fingerprints_on_s3(rows, s3, tmp_path):
    """The same reading and listing through pyarrow's S3 client: GZIP files of a glob read by
    row range, and a folder and a glob fingerprinted from their listing, changing with a new object."""
    x, y, keys = rows
    for path in write_rows(tmp_path, "train", x, y, keys, files=2, gzip=True, suffix=".tfrecord.gz"):
        s3.upload(path, f"tfr/{os.path.basename(path)}")
    spec = s3.uri("tfr/train-*.tfrecord.gz")
    src = open_source(spec)
    assert src.counts == [30, 30]
    got = open_source(spec, layout=src.layout()).read(25, 41, (6,))  # across the two files
    np.testing.assert_array_equal(got.x, x[25:41])
    np.testing.assert_array_equal(got.keys, keys[25:41])
    for c in range(2):
        s3.put(f"imgs/c{c}/{c}.png", b"png")
    folder = s3.uri("imgs")
    before = {spec: fingerprint(spec), folder: fingerprint(folder)}
    assert all("|2 files|" in f for f in before.values())
    s3.put("tfr/train-00002-of-00002.tfrecord.gz", b"")
    s3.put("imgs/c1/more.png", b"png")
    assert all(fingerprint(s) != f for s, f in before.items())


def test_a_damaged_record_length_is_refused_before_it_is_read(rows, tmp_path):
    """A header whose length runs past the end of the file: one line, and no attempt to read
    that many bytes (a damaged length can ask for up to 2^64)."""
    import struct

    from distributed_influence.data.sources.records import Reader

    x, y, keys = rows
    (path,) = write_rows(tmp_path, "damaged", x[:3], y[:3], keys[:3], files=1)
    data = bytearray(open(path, "rb").read())
    data[:8] = struct.pack("<Q", 1 << 40)
    open(path, "wb").write(bytes(data))
    for step in ("next", "skip"):
        reader = Reader(path)
        try:
            with pytest.raises(SourceError) as err:
                getattr(reader, step)()
        finally:
            reader.close()
        assert str(err.value) == f"{path}: record 0: truncated (length {1 << 40} past the end of the file)"
