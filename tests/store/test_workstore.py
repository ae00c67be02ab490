"""The work store across versions: a work directory is resumed only by the version and partials
format that wrote it, and any other one is refused with one line, exit 2, nothing touched.

The runs are in process (no Ray): what is checked is where partial results live and who may
reuse them, which does not depend on the engine.
"""

import json
import os

import pytest
from conftest import assert_same_results, audit_config

import distributed_influence
from distributed_influence.cli import main
from distributed_influence.engine.job import run_audit
from distributed_influence.errors import ConfigError
from distributed_influence.store import workstore
from distributed_influence.store.workstore import FORMAT_FILE, WorkStore, run_key
from distributed_influence.testing import InjectedFault

SHARDS = 3
KEY_INPUTS = ("494113c87bf8b1a3", b"model bytes", "digits", "digits:test", [(0, 20), (20, 40), (40, 60)])


def test_run_key_changes_with_the_version_and_the_partials_format(monkeypatch):
    key = run_key(*KEY_INPUTS)
    assert run_key(*KEY_INPUTS) == key  # the same job, the same version: the same directory
    monkeypatch.setattr(distributed_influence, "__version__", "0.0.9")
    older = run_key(*KEY_INPUTS)
    assert older != key
    monkeypatch.setattr(workstore, "PARTIALS_FORMAT", workstore.PARTIALS_FORMAT + 1)
    assert run_key(*KEY_INPUTS) not in (key, older)


def _crash_after_one_shard(files, out, inject_fault) -> str:
    """A tiny audit whose driver fails after persisting one scored shard; its work directory."""
    inject_fault("stop-driver-after:1")
    with pytest.raises(InjectedFault):
        run_audit(audit_config(files, out, shards=SHARDS), use_ray=False)
    inject_fault(None)
    work = os.path.join(out, "_work")
    (key,) = os.listdir(work)
    return os.path.join(work, key)


def _snapshot(root) -> dict:
    """Every file under ``root`` with its bytes: what a refused run must leave as it was."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, root)] = fh.read()
    return found


def _audit_cli(files, out, capsys, *extra) -> tuple:
    code = main(["audit", "--model", files["model"], "--train", files["train"], "--test", files["test"],
                 "--out", out, "--k", "4", "--shards", str(SHARDS), "--in-process", *extra])
    captured = capsys.readouterr()
    return code, captured.err


def _refused(files, out, capsys, expected: str) -> None:
    """The same command run again: refused with exactly ``expected``, exit 2, ``out`` untouched."""
    before = _snapshot(out)
    code, err = _audit_cli(files, out, capsys)
    assert (code, err) == (2, f"distributed-influence: error: {expected}\n")
    assert _snapshot(out) == before


def test_work_directory_records_the_version_and_format_that_wrote_it(files, tmp_path, inject_fault):
    work = _crash_after_one_shard(files, str(tmp_path / "out"), inject_fault)
    with open(os.path.join(work, FORMAT_FILE)) as fh:
        record = json.load(fh)
    inputs = record.pop("inputs")
    assert record == {"version": distributed_influence.__version__, "partials_format": workstore.PARTIALS_FORMAT,
                      "run_key": os.path.basename(work)}
    # A short hash of each part of the run key, so that a later run can say which one changed.
    assert set(inputs) == set(workstore.INPUT_NAMES) and all(len(v) == 16 for v in inputs.values())


def test_work_directory_with_another_recorded_format_is_refused(files, reference, tmp_path, inject_fault, capsys):
    out = str(tmp_path / "out")
    work = _crash_after_one_shard(files, out, inject_fault)
    with open(os.path.join(work, FORMAT_FILE), "w") as fh:  # as another version would have left it
        json.dump({"version": "0.0.9", "partials_format": 0, "run_key": os.path.basename(work)}, fh)
    this = f"this is {distributed_influence.__version__}, partials format {workstore.PARTIALS_FORMAT}"
    _refused(files, out, capsys, f"{out}/_work: holds partial results of another version (0.0.9, partials "
                                 f"format 0; {this}): rerun with --overwrite to replace them, or delete {out}/_work")

    # --overwrite drops them: nothing of the old directory is mixed into the new results.
    code, _ = _audit_cli(files, out, capsys, "--overwrite")
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["resume"] == {"reused_shards": [], "computed_shards": [0, 1, 2], "fit_reused": False}
    assert not os.path.exists(os.path.join(out, "_work"))
    assert_same_results(reference, out)


def test_partials_of_another_partials_format_are_refused(files, tmp_path, inject_fault, capsys, monkeypatch):
    out = str(tmp_path / "out")
    _crash_after_one_shard(files, out, inject_fault)
    monkeypatch.setattr(workstore, "PARTIALS_FORMAT", workstore.PARTIALS_FORMAT + 1)  # a later layout
    v = distributed_influence.__version__
    _refused(files, out, capsys, f"{out}/_work: holds partial results of another version ({v}, partials format "
                                 f"{workstore.PARTIALS_FORMAT - 1}; this is {v}, partials format "
                                 f"{workstore.PARTIALS_FORMAT}): rerun with --overwrite to replace them, or delete "
                                 f"{out}/_work")


def test_partials_left_before_formats_were_recorded_are_refused(files, tmp_path, inject_fault, capsys, monkeypatch):
    out = str(tmp_path / "out")
    work = _crash_after_one_shard(files, out, inject_fault)
    os.remove(os.path.join(work, FORMAT_FILE))  # the layout of every version before this record
    monkeypatch.setattr(distributed_influence, "__version__", "99.0.0")  # the version that reruns it
    _refused(files, out, capsys, f"{out}/_work: holds partial results of an earlier version (no partials format "
                                 f"recorded; this is 99.0.0, partials format {workstore.PARTIALS_FORMAT}): rerun "
                                 f"with --overwrite to replace them, or delete {out}/_work")


def test_results_of_another_version_say_so(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"run_key": "0123", "versions": {"distributed_influence": "0.0.9"}}))
    with pytest.raises(ConfigError) as err:
        WorkStore.open(str(out), "4567", overwrite=False)
    assert str(err.value) == (f"{out}: holds results of another version (0.0.9; this is "
                              f"{distributed_influence.__version__}); use --overwrite to replace them, "
                              f"or choose another --out")
    assert os.listdir(out) == ["manifest.json"]
