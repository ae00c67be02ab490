"""Audit, clean, audit again: a real audit of a small model on labels with known flips, then
``apply-review --auto`` with each policy, then the audit of each corrected copy, whose
``train_scores`` must carry the new labels under the same ids, minus the removed rows."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import audit_config

from distributed_influence.cli import main
from distributed_influence.engine.job import run_audit
from distributed_influence.store import tables

FLIPPED = np.array([3, 10, 17, 25, 33, 48])


def train_scores(out: str) -> dict:
    t = tables.read_table(out, tables.TRAIN_SCORES)
    return {c: t.column(c).to_numpy() for c in ("train_id", "label", "audit_rank", "predicted_class")}


@pytest.fixture(scope="module")
def noisy(files, data, tmp_path_factory):
    """The shared model's training rows with six labels flipped and ids 500, 502, ..., audited."""
    x, y = data[0], data[1].copy()
    y[FLIPPED] = (y[FLIPPED] + 1) % 3
    root = tmp_path_factory.mktemp("clean_e2e")
    train = str(root / "data" / "train.npz")
    os.makedirs(os.path.dirname(train))
    ids = 500 + 2 * np.arange(len(y), dtype=np.int64)
    np.savez(train, x=x, y=y, id=ids)
    out = str(root / "audit")
    run_audit(audit_config({**files, "train": train}, out, k=3), use_ray=False)
    return {"files": files, "train": train, "audit": out, "root": root, "ids": ids}


@pytest.mark.parametrize("policy, top", [("relabel", "20%"), ("remove", "6")])
def test_clean_with_auto_then_audit_the_copy(noisy, policy, top):
    first = train_scores(noisy["audit"])
    found = np.isin(first["train_id"][first["audit_rank"] <= 12], noisy["ids"][FLIPPED])
    assert found.sum() >= 3  # the audit ranks most flips near the top: there is something to clean
    clean = str(noisy["root"] / f"clean_{policy}")
    assert main(["apply-review", "--train", noisy["train"], "--out", clean, "--audit", noisy["audit"],
                 "--auto", top, "--policy", policy]) == 0
    label_map = pq.read_table(os.path.join(clean, "label_map.parquet")).to_pandas()
    kept = label_map[label_map.action != "remove"]
    again = str(noisy["root"] / f"audit_{policy}")
    run_audit(audit_config({**noisy["files"], "train": os.path.join(clean, "train.npz")}, again, k=3),
              use_ray=False)
    second = train_scores(again)
    order = np.argsort(second["train_id"])
    np.testing.assert_array_equal(second["train_id"][order], np.sort(kept.train_id.to_numpy()))
    by_id = dict(zip(kept.train_id, kept.new_label.astype(int)))
    assert [by_id[i] for i in second["train_id"]] == second["label"].tolist()
    if policy == "relabel":
        top_rows = first["audit_rank"] <= 12
        relabel = top_rows & (first["predicted_class"] != first["label"])
        assert relabel.any() and (label_map.action == "relabel").sum() == relabel.sum()
        new = dict(zip(first["train_id"][relabel], first["predicted_class"][relabel]))
        assert all(by_id[i] == c for i, c in new.items())
        assert len(second["train_id"]) == len(first["train_id"])
    else:
        gone = set(first["train_id"][first["audit_rank"] <= 6])
        assert set(label_map.train_id[label_map.action == "remove"]) == gone
        assert not gone & set(second["train_id"]) and len(second["train_id"]) == len(first["train_id"]) - 6
