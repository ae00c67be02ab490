"""Inputs that must not slip through a whole job: keys given twice (found where the workers read
them, across shards), GZIP TFRecords (read like plain ones), and a folder that changed under a
rerun (never resumed as if unchanged). Each bad input is refused by the command with one line
and exit code 2, before anything is written."""

import dataclasses
import io
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_same_results, audit_config
from example_records import example, write, write_rows
from PIL import Image

from distributed_influence.cli import main
from distributed_influence.engine.job import run_audit
from distributed_influence.store import tables
from distributed_influence.testing import InjectedFault


def _config(files, out, k=4, **changes):
    """The settings of `files` (k = 4: the `reference` tables') with other sources or settings."""
    return dataclasses.replace(audit_config(files, out, k=k), **changes)


def _train(files):
    with np.load(files["train"]) as d:
        return d["x"], d["y"]


def _audit(files, train, out, *extra, test=None):
    """``distributed-influence audit --in-process`` as a user runs it: (exit code, stderr lines)."""
    return main(["audit", "--in-process", "--model", files["model"], "--train", train,
                 "--test", test or files["test"], "--out", str(out), "--k", "3", *extra])


def _refused(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def _published(out) -> set:
    """What of a finished run's output is in ``out``: tables, manifest, index."""
    return set(os.listdir(out)) & (set(tables.TABLES) | {tables.MANIFEST, "index"}) if os.path.exists(out) else set()


def test_a_tfrecord_key_repeated_across_shards_stops_the_job_before_anything_is_written(files, tmp_path, capsys):
    """The driver reads no record: the workers return the keys they read, and the key on row 7
    (first file, first shard) and row 45 (second file, last shard) is found all the same."""
    x, y = _train(files)
    keys = [f"img-{i:02d}" for i in range(len(x))]
    keys[45] = keys[7]
    paths = write_rows(tmp_path, "train", x, y, keys, files=2)
    spec = str(tmp_path / "train-*.tfrecord")
    out = tmp_path / "out"
    line = _refused(capsys, _audit(files, spec, out, "--shards", "3"))
    assert line == (f"distributed-influence: error: {spec}: duplicate key 'img-07' at record 7 of {paths[0]} "
                    f"and record 15 of {paths[1]}")
    assert not out.exists()


def test_overwrite_keeps_another_jobs_work_until_this_run_saves_its_first_result(files, tmp_path, capsys,
                                                                                  inject_fault):
    """--overwrite replaces another job's partial work, but a run refused before its first result
    (a repeated key the workers find) leaves it in place: nothing written, nothing removed."""
    out = tmp_path / "out"
    inject_fault("stop-driver-after:1")
    with pytest.raises(InjectedFault):
        run_audit(_config(files, str(out), shards=3), use_ray=False)
    inject_fault(None)
    before = {p: (out / p).read_bytes() for p in _files(out)}
    x, y = _train(files)
    keys = [f"img-{i:02d}" for i in range(len(x))]
    keys[45] = keys[7]
    write_rows(tmp_path, "train", x, y, keys, files=2)
    _refused(capsys, _audit(files, str(tmp_path / "train-*.tfrecord"), out, "--shards", "3", "--overwrite"))
    assert {p: (out / p).read_bytes() for p in _files(out)} == before


def _bad_inputs(files, tmp_path) -> dict:
    """name → (train spec, test spec or None, extra flags, the line's text after the prefix)."""
    x, y = _train(files)
    keys = [f"k{i}" for i in range(len(x))]
    ids = np.arange(len(x)) + 100
    ids[50] = ids[12]
    dup_keys = list(keys)
    dup_keys[33] = dup_keys[2]
    tfr = write(tmp_path / "dup.tfrecord", [example(x[i], y[i], dup_keys[i]) for i in range(len(x))])
    test_tfr = write(tmp_path / "dup_test.tfrecord", [example(x[i], None, "t" if i in (4, 9) else keys[i])
                                                      for i in range(20)])
    np.savez(tmp_path / "dup.npz", x=x, y=y, id=ids)
    pq.write_table(pa.table({"x": list(x), "label": y, "id": dup_keys}), tmp_path / "dup_str.parquet")
    pq.write_table(pa.table({"x": list(x), "label": y, "id": ids}), tmp_path / "dup_int.parquet")
    good = bytearray(open(write_rows(tmp_path, "ok", x, y, files=1, gzip=True, suffix=".tfrecord.gz")[0], "rb").read())
    corrupt = tmp_path / "corrupt.tfrecord.gz"
    corrupt.write_bytes(bytes(good[:-8] + bytes(b ^ 0xFF for b in good[-8:-4]) + good[-4:]))  # bad CRC
    plain = write_rows(tmp_path, "plain", x, y, files=1)[0]
    return {
        "tfrecord id feature": (tfr, None, [], f"{tfr}: duplicate key 'k2' at record 2 and record 33"),
        "tfrecord test keys": (files["train"], test_tfr, [], f"{test_tfr}: duplicate key 't' at record 4 and record 9"),
        "npz id array": (str(tmp_path / "dup.npz"), None, [], f"{tmp_path / 'dup.npz'}: duplicate id 112 at row 12 "
                                                             f"and row 50"),
        "parquet string id": (str(tmp_path / "dup_str.parquet"), None, [],
                              f"{tmp_path / 'dup_str.parquet'}: duplicate key 'k2' at row 2 and row 33"),
        "parquet int id": (str(tmp_path / "dup_int.parquet"), None, [],
                           f"{tmp_path / 'dup_int.parquet'}: duplicate id 112 at row 12 and row 50"),
        "corrupt gzip": (str(corrupt), None, [],
                         f"{corrupt}: corrupt or truncated GZIP file (zlib inflate failed: incorrect data check)"),
        "plain file read as gzip": (plain, None, ["--compression", "gzip"],
                                    f"{plain}: corrupt or truncated GZIP file (zlib inflate failed: incorrect header "
                                    f"check)"),
    }


def test_bad_inputs_are_refused_with_one_line_and_nothing_written(files, tmp_path, capsys):
    for name, (train, test, extra, words) in _bad_inputs(files, tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        line = _refused(capsys, _audit(files, train, out, *extra, test=test))
        assert line == f"distributed-influence: error: {words}", name
        assert not out.exists(), name


def test_gzip_tfrecords_give_the_tables_of_the_npz(files, reference, tmp_path):
    """Three GZIP files (told by their name) and one named like a plain file (told by the flag):
    the tables equal those of the same rows given as .npz."""
    x, y = _train(files)
    write_rows(tmp_path, "train", x, y, files=3, gzip=True, suffix=".tfrecord.gz")
    out = str(tmp_path / "out")
    m = run_audit(_config(files, out, train=str(tmp_path / "train-*.tfrecord.gz")), use_ray=False)
    assert [f["records"] for f in m["sources"]["train"]["files"]] == [20, 20, 20]
    assert_same_results(reference, out)
    with np.load(files["test"]) as d:
        test = write(tmp_path / "test.tfrecord", [example(r, c) for r, c in zip(d["x"], d["y"])], gzip=True)
    out2 = str(tmp_path / "out2")
    run_audit(_config(files, out2, test=test, compression="gzip", train=str(tmp_path / "train-*.tfrecord.gz")),
              use_ray=False)
    assert_same_results(reference, out2)


def _png(row: np.ndarray) -> bytes:
    """A row of the model's 6 inputs as a 1 × 6 grey PNG: the folder's images are real files."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round((row + 4) * 30), 0, 255).astype(np.uint8)[None, :], "L").save(buf, "PNG")
    return buf.getvalue()


def test_a_changed_folder_is_not_resumed_as_if_unchanged(files, tmp_path, inject_fault, capsys, caplog):
    """Partial work of a folder, then one image rewritten (same number of images, so the row
    count and shard plan match): the rerun is refused like that of a changed file, with one line
    and nothing touched, naming the changed source; with --overwrite it starts afresh (a log line
    says why) and reuses nothing."""
    x, y = _train(files)
    folder = tmp_path / "images"
    for i, (row, c) in enumerate(zip(x, y)):
        os.makedirs(folder / str(c), exist_ok=True)
        (folder / str(c) / f"{i:02d}.png").write_bytes(_png(row))
    out = tmp_path / "out"
    config = _config(files, str(out), k=3, train=str(folder), shards=3)
    inject_fault("stop-driver-after:1")
    with pytest.raises(InjectedFault):
        run_audit(config, use_ray=False)
    inject_fault(None)
    work = out / "_work"
    (key,) = os.listdir(work)
    before = {p: (out / p).read_bytes() for p in _files(out)}

    changed = folder / str(y[5]) / "05.png"
    st = changed.stat()
    changed.write_bytes(_png(x[6]))
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    line = _refused(capsys, _audit(files, str(folder), out, "--shards", "3"))
    assert "different job: the training source changed since they were started" in line, line
    assert "--overwrite" in line
    assert {p: (out / p).read_bytes() for p in _files(out)} == before  # nothing written, nothing removed

    with caplog.at_level(logging.WARNING, logger="distributed_influence.store.workstore"):
        assert _audit(files, str(folder), out, "--shards", "3", "--overwrite") == 0
    assert any("starting afresh: the training source changed" in r.getMessage() for r in caplog.records)
    manifest = tables.read_manifest(str(out))
    assert manifest["resume"]["reused_shards"] == [] and manifest["resume"]["computed_shards"] == [0, 1, 2]
    assert manifest["run_key"] != key and not work.exists()


def _files(root) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
