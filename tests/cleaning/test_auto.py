"""``--audit OUT --auto TOP``: the top TOP rows of a small synthetic ``train_scores`` table,
against results worked out by hand; and audits of another training set, refused."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from review_data import (
    N_ROWS,
    ids,
    keys,
    labels,
    nothing_written,
    refused,
    write_audit,
    write_csv,
    write_npz,
    write_parquet,
)

from distributed_influence.cleaning.apply import apply_review
from distributed_influence.cli import main

I, Y = ids(), labels()
#: Rows in audit_rank order: row 4 is rank 1, row 11 rank 2, ...
ORDER = [4, 11, 2, 17, 8, 0, 13] + [r for r in range(N_ROWS) if r not in (4, 11, 2, 17, 8, 0, 13)]
RANK = np.empty(N_ROWS, dtype=np.int64)
RANK[ORDER] = np.arange(1, N_ROWS + 1)
#: The model disagrees with the label of rows 4, 2, 8 and 13 (it says label + 1 mod 3).
DISAGREE = [4, 2, 8, 13]
PREDICTED = Y.copy()
PREDICTED[DISAGREE] = (Y[DISAGREE] + 1) % 3


@pytest.fixture
def setup(tmp_path):
    """The npz source and its audit, whose rows are stored in reverse order (looked up by id)."""
    src = write_npz(tmp_path / "train.npz")
    rev = slice(None, None, -1)
    audit = write_audit(tmp_path / "audit", I[rev], Y[rev], RANK[rev], PREDICTED[rev])
    return src, audit


# By hand: Y = 0,1,2,0,1,2,... so row 4 (label 1) becomes 2, row 2 (label 2) becomes 0, row 8
# (label 2) becomes 0, row 13 (label 1) becomes 2. 25 % of 20 rows is 5; 12 % is 2.4, rounded up.
CASES = [
    ("3", "relabel", {4: 2, 2: 0}, [11], []),
    ("12%", "relabel", {4: 2, 2: 0}, [11], []),
    ("25%", "relabel", {4: 2, 2: 0, 8: 0}, [11, 17], []),
    ("7", None, {4: 2, 2: 0, 8: 0, 13: 2}, [11, 17, 0], []),
    ("100%", "relabel", {4: 2, 2: 0, 8: 0, 13: 2}, [r for r in range(N_ROWS) if r not in DISAGREE], []),
    ("3", "remove", {}, [], [4, 11, 2]),
    ("10%", "remove", {}, [], [4, 11]),
    ("2.5%", "remove", {}, [], [4]),
]


@pytest.mark.parametrize("top, policy, relabelled, kept, removed", CASES)
def test_auto_against_hand_computed_decisions(setup, tmp_path, top, policy, relabelled, kept, removed, capsys):
    src, audit = setup
    out = tmp_path / "out"
    argv = ["apply-review", "--train", src, "--out", str(out), "--audit", audit, "--auto", top]
    assert main(argv + (["--policy", policy] if policy else [])) == 0
    y = Y.copy()
    for r, c in relabelled.items():
        y[r] = c
    keep = np.ones(N_ROWS, bool)
    keep[removed] = False
    with np.load(out / "train.npz") as d:
        np.testing.assert_array_equal(d["y"], y[keep])
        np.testing.assert_array_equal(d["id"], I[keep])
    action = np.full(N_ROWS, "undecided", dtype=object)
    action[list(relabelled)] = "relabel"
    action[kept] = "keep"
    action[removed] = "remove"
    m = pq.read_table(out / "label_map.parquet")
    assert m.column("action").to_pylist() == list(action)
    summary = json.load(open(out / "summary.json"))
    n_top = len(relabelled) + len(kept) + len(removed)
    assert summary["from"] == {"audit": audit, "auto": top, "top_rows": n_top, "policy": policy or "relabel"}
    assert summary["n_classes"] == 3 and summary["classes"] == "the audit's model has 3 classes"
    assert summary["counts"]["relabel"] == len(relabelled) and summary["counts"]["remove"] == len(removed)
    assert f"{len(kept)} kept, {len(relabelled)} relabelled, {len(removed)} removed" in capsys.readouterr().out


def test_min_confidence_relabels_only_where_the_model_is_sure(tmp_path):
    """Of the disagreeing rows in the top 7 (4, 2, 8, 13), the model gives its class 0.9, 0.5, 0.7
    (the gate itself: relabelled) and 0.95: row 2 keeps its label, as do the agreeing rows."""
    src = write_npz(tmp_path / "train.npz")
    confidence = np.full(N_ROWS, 0.99)
    confidence[DISAGREE] = [0.9, 0.5, 0.7, 0.95]
    audit = write_audit(tmp_path / "audit", I, Y, RANK, PREDICTED, confidence=confidence)
    summary = apply_review(src, str(tmp_path / "out"), audit=audit, auto=7, min_confidence=0.7)
    y = Y.copy()
    y[[4, 8, 13]] = [2, 0, 2]  # label + 1 mod 3, as PREDICTED says
    with np.load(tmp_path / "out" / "train.npz") as d:
        np.testing.assert_array_equal(d["y"], y)
    action = pq.read_table(tmp_path / "out" / "label_map.parquet").column("action").to_pylist()
    assert [r for r, a in enumerate(action) if a == "relabel"] == [4, 8, 13]
    assert sorted(r for r, a in enumerate(action) if a == "keep") == [0, 2, 11, 17]
    assert summary["from"]["min_confidence"] == 0.7 and summary["counts"]["relabel"] == 3


def test_python_function_takes_a_count(setup, tmp_path):
    src, audit = setup
    summary = apply_review(src, str(tmp_path / "out"), audit=audit, auto=3, policy="remove")
    assert summary["rows_written"] == N_ROWS - 3 and summary["from"]["top_rows"] == 3


def test_decisions_with_an_audit_take_its_class_count(setup, tmp_path, capsys):
    """The source's labels only reach class 2; the audit's model has 4 classes, so 3 is a class."""
    src, _ = setup
    audit = write_audit(tmp_path / "audit4", I, Y, RANK, PREDICTED, n_classes=4)
    path = write_csv(tmp_path / "d.csv", [f"{I[1]},{Y[1]},relabel,3,,"])
    summary = apply_review(src, str(tmp_path / "out"), decisions=path, audit=audit)
    assert summary["counts"]["relabel"] == 1 and summary["by_class"][-1]["class"] == 3
    path = write_csv(tmp_path / "d.csv", [f"{I[1]},{Y[1]},relabel,4,,"])
    message = refused(capsys, ["--train", src, "--out", str(tmp_path / "o2"), "--decisions", path, "--audit", audit])
    assert message.endswith("line 2: new_label 4 is outside 0..3 (the audit's model has 4 classes)")


def test_a_binary_model_has_two_classes(tmp_path, capsys):
    np.savez(tmp_path / "train.npz", x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 1, 0]))
    audit = write_audit(tmp_path / "audit", np.arange(4), [0, 1, 1, 0], [1, 2, 3, 4], [1, 1, 1, 0], n_classes=2)
    path = write_csv(tmp_path / "d.csv", ["0,0,relabel,2,,"])
    message = refused(capsys, ["--train", str(tmp_path / "train.npz"), "--out", str(tmp_path / "out"),
                               "--decisions", path, "--audit", audit])
    assert message.endswith("new_label 2 is outside 0..1 (the audit's model has 2 classes)")
    summary = apply_review(str(tmp_path / "train.npz"), str(tmp_path / "out"), audit=audit, auto="50%")
    assert summary["counts"] == {"keep": 1, "relabel": 1, "remove": 0, "unsure": 0, "undecided": 2}


def _other(kind: str, tmp_path):
    """An audit that differs from the source in one way."""
    label, train_id = Y.copy(), I.copy()
    if kind == "rows":
        return write_audit(tmp_path / "a", I[:-1], Y[:-1], RANK[:-1], PREDICTED[:-1]), "has 19 training rows but"
    if kind == "id":
        train_id[5] = 5
        return write_audit(tmp_path / "a", train_id, Y, RANK, PREDICTED), "train_id 5 is not an id of --train"
    label[6] = 2
    return write_audit(tmp_path / "a", I, label, RANK, PREDICTED), f"train_id {I[6]} has label 2 there but 0"


@pytest.mark.parametrize("kind", ["rows", "id", "label"])
def test_audit_of_another_training_set_is_refused(setup, tmp_path, kind, capsys):
    src, _ = setup
    audit, expected = _other(kind, tmp_path)
    message = refused(capsys, ["--train", src, "--out", str(tmp_path / "out"), "--audit", audit, "--auto", "5"])
    assert expected in message and message.startswith(f"--audit {audit}") and "another training set" in message
    assert nothing_written(tmp_path)


def test_keys_of_the_audit_must_be_the_sources(tmp_path, capsys):
    src = write_parquet(tmp_path / "train.parquet", id_column="str")
    rows = np.arange(N_ROWS)
    argv = ["--train", src, "--out", str(tmp_path / "out"), "--auto", "5", "--audit"]
    no_keys = write_audit(tmp_path / "a1", rows, Y, RANK, PREDICTED)
    assert "has keys but the audit's train_scores does not" in refused(capsys, argv + [no_keys])
    other = keys()
    other[3] = "img/elsewhere.png"
    wrong = write_audit(tmp_path / "a2", rows, Y, RANK, PREDICTED, keys_=other)
    assert "train_id 3 has key 'img/elsewhere.png' there but 'img/003.png'" in refused(capsys, argv + [wrong])
    assert nothing_written(tmp_path)
    good = write_audit(tmp_path / "a3", rows, Y, RANK, PREDICTED, keys_=keys())
    assert main(["apply-review"] + argv + [good]) == 0
    assert pq.read_table(tmp_path / "out" / "label_map.parquet").column("train_key").to_pylist() == keys()


def test_an_explain_output_is_not_an_audit(setup, tmp_path, capsys):
    src, audit = setup
    import shutil

    shutil.rmtree(tmp_path / "audit" / "train_scores")
    message = refused(capsys, ["--train", src, "--out", str(tmp_path / "out"), "--audit", audit, "--auto", "5"])
    assert message == f"--audit {audit}: no train_scores table (the output of explain, not of an audit?)"
