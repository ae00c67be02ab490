"""Bad decisions files, settings and output directories: each is refused through the command line
in this process with exit code 2 and exactly one line naming the file, line and value, and
nothing is written (no output directory, no staged directory left beside it)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from example_records import write_rows
from review_data import (
    HEADER,
    digest,
    ids,
    inputs,
    keys,
    labels,
    nothing_written,
    refused,
    write_audit,
    write_csv,
    write_npz,
    write_parquet,
)

I, Y = ids(), labels()
GOOD = f"{I[0]},{Y[0]},keep,,,"  # a valid line, so the bad one is never the only line


def line(row: int, action: str = "keep", new_label: str = "", label=None, key: str = "") -> str:
    return f"{I[row]},{Y[row] if label is None else label},{action},{new_label},{key},2024-05-01T10:00:00Z"


#: name → (source, the file's content, what the one line must say). Keyed sources are Parquet
#: with a string id column: their ids are row numbers and their keys img/NNN.png.
CASES = {
    "empty file": ("npz", "", "empty file, no header line"),
    "blank lines only": ("npz", "\n\n\n", "empty file, no header line"),
    "missing column": ("npz", "train_id,label,new_label\n" + f"{I[0]},{Y[0]},\n", "line 1: no column 'action'"),
    "column twice": ("npz", "train_id,label,action,new_label,label\n", "line 1: column 'label' appears twice"),
    "unknown id": ("npz", f"{HEADER}\n{GOOD}\n99999,0,keep,,,\n", "line 3: train_id 99999 is not an id of"),
    "row number instead of id": ("npz", f"{HEADER}\n{GOOD}\n5,{Y[5]},remove,,,\n", "line 3: train_id 5 is not an id"),
    "id not an integer": ("npz", f"{HEADER}\n{GOOD}\nabc,0,keep,,,\n", "line 3: train_id 'abc' is not an integer"),
    "id a float": ("npz", f"{HEADER}\n{I[1]}.0,{Y[1]},keep,,,\n", f"line 2: train_id '{I[1]}.0' is not an integer"),
    "id beyond int64": ("npz", f"{HEADER}\n{2 ** 64},0,keep,,,\n", "line 2: train_id 18446744073709551616 is out of"),
    "duplicate id": ("npz", f"{HEADER}\n{GOOD}\n{line(1)}\n{line(0, 'remove')}\n",
                     f"line 4: train_id {I[0]} appears again (first on line 2)"),
    "unknown action": ("npz", f"{HEADER}\n{GOOD}\n{line(1, 'delete')}\n", "line 3: unknown action 'delete'"),
    "action in capitals": ("npz", f"{HEADER}\n{line(1, 'Keep')}\n", "line 2: unknown action 'Keep'"),
    "label of another data set": ("npz", f"{HEADER}\n{GOOD}\n{line(2, label=(Y[2] + 1) % 3)}\n",
                                  f"line 3: label {(Y[2] + 1) % 3} of train_id {I[2]} differs from its label {Y[2]}"),
    "label not an integer": ("npz", f"{HEADER}\n{line(1, label='cat')}\n", "line 2: label 'cat' is not an integer"),
    "relabel without new_label": ("npz", f"{HEADER}\n{GOOD}\n{line(1, 'relabel')}\n",
                                  f"line 3: action relabel of train_id {I[1]} has no new_label"),
    "new_label on a keep": ("npz", f"{HEADER}\n{line(1, 'keep', '2')}\n",
                            "line 2: new_label '2' given for action keep (only relabel takes one)"),
    "new_label on a remove": ("npz", f"{HEADER}\n{line(1, 'remove', '0')}\n", "new_label '0' given for action remove"),
    "class out of range": ("npz", f"{HEADER}\n{GOOD}\n{line(1, 'relabel', '3')}\n",
                           "line 3: new_label 3 is outside 0..2 (the labels of"),
    "negative class": ("npz", f"{HEADER}\n{line(1, 'relabel', '-1')}\n", "line 2: new_label -1 is outside 0..2"),
    "class not an integer": ("npz", f"{HEADER}\n{line(1, 'relabel', 'two')}\n",
                             "line 2: new_label 'two' is not an integer"),
    "relabel to its own label": ("npz", f"{HEADER}\n{line(1, 'relabel', str(Y[1]))}\n",
                                 f"line 2: relabel of train_id {I[1]} to its own label {Y[1]}"),
    "too few fields": ("npz", f"{HEADER}\n{GOOD}\n{I[1]},{Y[1]},keep\n", "line 3: 3 fields, but the header has 6"),
    "unclosed quote": ("npz", f'{HEADER}\n{I[1]},{Y[1]},keep,,"img/1.png,\n', "not valid CSV"),
    "key on a source without keys": ("npz", f"{HEADER}\n{line(1, key='img/001.png')}\n",
                                     "line 2: train_key 'img/001.png' given, but"),
    "key of another row": ("keyed", f"{HEADER}\n0,{Y[0]},keep,,img/000.png,\n3,{Y[3]},keep,,img/004.png,\n",
                           "line 3: train_key 'img/004.png' of train_id 3 is not its key 'img/003.png'"),
    "not UTF-8": ("npz", (HEADER + "\n").encode() + b"\xff\xfe,0,keep,,,\n", "not UTF-8 text"),
    "binary file": ("npz", b"PK\x03\x04\x00\x00binary", "NUL bytes"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"npz": write_npz(root / "train.npz"), "keyed": write_parquet(root / "train.parquet", id_column="str")}


def test_at_least_twenty_distinct_bad_files():
    assert len(CASES) >= 20 and len({content for _, content, _ in CASES.values()}) == len(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_decisions_file_is_refused_with_one_line(name, sources, tmp_path, capsys):
    kind, content, expected = CASES[name]
    path = tmp_path / "decisions.csv"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    before = digest(sources[kind])
    message = refused(capsys, ["--train", sources[kind], "--out", str(tmp_path / "out"), "--decisions", str(path)])
    assert expected in message, message
    assert message.startswith(f"{path}: "), message  # names the file
    assert nothing_written(tmp_path)
    assert digest(sources[kind]) == before


def test_missing_decisions_file(sources, tmp_path, capsys):
    message = refused(capsys, ["--train", sources["npz"], "--out", str(tmp_path / "out"),
                               "--decisions", str(tmp_path / "nope.csv")])
    assert message == f"{tmp_path / 'nope.csv'}: decisions file not found"
    assert nothing_written(tmp_path)


def test_the_first_problem_by_line_is_named(sources, tmp_path, capsys):
    """Two problems found by the same check: the earlier line is the one reported."""
    path = write_csv(tmp_path / "d.csv", [GOOD, "77777,0,keep,,,", "88888,0,keep,,,"])
    message = refused(capsys, ["--train", sources["npz"], "--out", str(tmp_path / "out"), "--decisions", path])
    assert "line 3: train_id 77777" in message


def test_an_empty_out_dir_stays_empty_when_refused(sources, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    path = write_csv(tmp_path / "d.csv", [line(1, "relabel", "9")])
    refused(capsys, ["--train", sources["npz"], "--out", str(out), "--decisions", path])
    assert os.listdir(out) == []
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []


# ------------------------------------------------------------------- settings and the output


@pytest.fixture
def audit_of_npz(tmp_path):
    return write_audit(tmp_path / "audit", I, Y, np.arange(1, len(I) + 1), Y)


@pytest.mark.parametrize("argv, expected", [
    ([], "give --decisions CSV, or --audit OUT --auto TOP"),
    (["--decisions", "d.csv", "--audit", "{audit}", "--auto", "5"], "give --decisions or --auto, not both"),
    (["--auto", "5"], "--auto 5 needs --audit OUT"),
    (["--decisions", "d.csv", "--policy", "remove"], "--policy is what --auto does"),
    (["--decisions", "d.csv", "--classes", "1"], "--classes must be an integer >= 2"),
    (["--audit", "{audit}", "--auto", "0"], "--auto must take at least 1 row, got '0'"),
    (["--audit", "{audit}", "--auto", "-5"], "--auto must take at least 1 row, got '-5'"),
    (["--audit", "{audit}", "--auto", "0%"], "--auto percentage must be > 0% and at most 100%, got '0%'"),
    (["--audit", "{audit}", "--auto", "101%"], "at most 100%, got '101%'"),
    (["--audit", "{audit}", "--auto", "nan%"], "at most 100%, got 'nan%'"),
    (["--audit", "{audit}", "--auto", "ten"], "--auto must be a number of rows (e.g. 500) or a percentage"),
    (["--audit", "{audit}", "--auto", "1.5"], "--auto must be a number of rows"),
    (["--audit", "{audit}", "--auto", "21"], "--auto 21 is more than the 20 training rows of the audit"),
    (["--audit", "{audit}", "--auto", "5", "--classes", "4"], "--classes 4, but the audit's model has 3 classes"),
    (["--audit", "{tmp}", "--auto", "5"], "no manifest.json (is it the --out of a finished audit?)"),
    (["--audit", "{audit}", "--auto", "5", "--min-confidence", "0.7"],
     "train_scores has no predicted_probability column (an audit of an earlier version): rerun the audit"),
    (["--audit", "{audit}", "--auto", "5", "--policy", "remove", "--min-confidence", "0.7"],
     "--min-confidence gates the relabelling of --auto with --policy relabel"),
    (["--decisions", "d.csv", "--min-confidence", "0.7"], "--min-confidence gates the relabelling of --auto"),
    (["--audit", "{audit}", "--auto", "5", "--min-confidence", "0"], "--min-confidence must be a probability in (0, 1]"),
    (["--audit", "{audit}", "--auto", "5", "--min-confidence", "nan"], "--min-confidence must be a probability"),
])
def test_bad_settings_are_refused_with_one_line(argv, expected, sources, audit_of_npz, tmp_path, capsys):
    write_csv(tmp_path / "d.csv", [GOOD])
    argv = [a.replace("d.csv", str(tmp_path / "d.csv")).format(audit=audit_of_npz, tmp=tmp_path) for a in argv]
    message = refused(capsys, ["--train", sources["npz"], "--out", str(tmp_path / "out")] + argv)
    assert expected in message, message
    assert nothing_written(tmp_path)


def test_out_where_the_source_is_is_refused(tmp_path, capsys):
    src = write_npz(tmp_path / "train.npz")
    path = write_csv(tmp_path / "d.csv", [GOOD])
    message = refused(capsys, ["--train", src, "--out", str(tmp_path), "--decisions", path, "--overwrite"])
    assert message == (f"--out {tmp_path} is where the training source {src} is: write the corrected data to "
                       f"a new directory")
    assert sorted(os.listdir(tmp_path)) == ["d.csv", "train.npz"]


def test_out_inside_an_image_folder_is_refused(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / "imgs" / cls / "0.png")
    path = write_csv(tmp_path / "d.csv", ["0,0,keep,,a/0.png,"])
    out = tmp_path / "imgs" / "fixed"
    message = refused(capsys, ["--train", str(tmp_path / "imgs"), "--out", str(out), "--decisions", path])
    assert "is where the training source" in message
    assert not out.exists()


def test_a_non_empty_out_is_refused_and_overwrite_replaces_only_own_output(sources, tmp_path, capsys):
    from distributed_influence.cli import main

    path = write_csv(tmp_path / "d.csv", [GOOD])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--train", sources["npz"], "--out", str(out), "--decisions", path]
    assert "is not empty (pass --overwrite" in refused(capsys, argv)
    assert "holds 'notes.txt', which apply-review did not write" in refused(capsys, argv + ["--overwrite"])
    (out / "notes.txt").unlink()
    (out / "train.npz").write_text("not an output")  # a name we write, but no summary.json of ours
    assert "has no summary.json of apply-review" in refused(capsys, argv + ["--overwrite"])
    assert (out / "train.npz").read_text() == "not an output"
    (out / "train.npz").unlink()
    assert main(["apply-review"] + argv) == 0  # into the empty directory
    first = digest(out / "summary.json")
    assert "is not empty" in refused(capsys, argv)
    path = write_csv(tmp_path / "d.csv", [GOOD, line(1, "remove")])
    assert main(["apply-review"] + argv + ["--overwrite"]) == 0
    assert digest(out / "summary.json") != first
    assert sorted(os.listdir(out)) == ["label_map.parquet", "summary.json", "train.npz"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []


def test_out_that_is_a_file_is_refused(sources, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    path = write_csv(tmp_path / "d.csv", [GOOD])
    assert "is a file, not a directory" in refused(capsys, ["--train", sources["npz"], "--out", str(tmp_path / "out"),
                                                            "--decisions", path])


def test_out_under_a_regular_file_is_refused_with_one_line(sources, tmp_path, capsys):
    """The system will not make DIR: its parent is a file (unlike a read-only directory, this
    stops root too)."""
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "out"
    path = write_csv(tmp_path / "d.csv", [GOOD])
    message = refused(capsys, ["--train", sources["npz"], "--out", str(out), "--decisions", path])
    assert message.startswith(f"--out {out}: cannot be written ("), message
    assert sorted(os.listdir(tmp_path)) == ["d.csv", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["npz", "keyed"])
def test_a_full_disk_while_copying_is_refused_naming_out(kind, sources, tmp_path, capsys, monkeypatch):
    """The disk of the copy, not the source, is at fault: the line names --out, and the staged
    directory is removed."""
    import pyarrow.parquet as pq

    from distributed_influence.cleaning import copies

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if kind == "npz":
        monkeypatch.setattr(copies, "_write_member", full)
    else:
        monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    out = tmp_path / "out"
    path = write_csv(tmp_path / "d.csv", [GOOD] if kind == "npz" else [f"0,{Y[0]},keep,,img/000.png,"])
    message = refused(capsys, ["--train", sources[kind], "--out", str(out), "--decisions", path])
    assert message == f"--out {out}: cannot be written ([Errno 28] No space left on device)"
    assert nothing_written(tmp_path)


def test_a_failed_publish_leaves_the_earlier_output_as_it_was(sources, tmp_path, capsys, monkeypatch):
    from distributed_influence.cli import main

    out = tmp_path / "out"
    path = write_csv(tmp_path / "d.csv", [GOOD])
    argv = ["--train", sources["npz"], "--out", str(out), "--decisions", path, "--overwrite"]
    assert main(["apply-review"] + argv) == 0
    before = {name: digest(out / name) for name in os.listdir(out)}
    rename = os.rename

    def refuse_staged(src, dst):
        if str(src).endswith(".tmp"):  # the staged directory: moving it into place fails
            raise PermissionError(errno.EACCES, "Permission denied")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_staged)
    write_csv(tmp_path / "d.csv", [GOOD, line(1, "remove")])
    message = refused(capsys, argv)
    monkeypatch.undo()
    assert message == f"--out {out}: cannot be written ([Errno 13] Permission denied)"
    assert {name: digest(out / name) for name in os.listdir(out)} == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")] == []


def test_a_tfrecord_key_on_two_records_is_refused_naming_both(tmp_path, capsys):
    """The driver of an audit never reads the keys; apply-review does, and names the places as the
    audit's refusal does: the record and its file."""
    repeated = keys()
    repeated[13] = repeated[3]
    paths = write_rows(tmp_path, "train", inputs(), Y, repeated, files=2)  # rows 0..9 and 10..19
    spec = str(tmp_path / "train-*.tfrecord")
    path = write_csv(tmp_path / "d.csv", [])
    message = refused(capsys, ["--train", spec, "--out", str(tmp_path / "out"), "--decisions", path])
    assert message == f"{spec}: duplicate key 'img/003.png' at record 3 of {paths[0]} and record 3 of {paths[1]}"
    assert nothing_written(tmp_path)
