"""The review loop end to end in a real browser: decisions made on the page and exported, applied
by ``apply-review`` and audited again; and train ids beyond 2^53 carried exactly to the export.
"""

import csv
import glob
import json
import os

import numpy as np
import pytest
import report_audits
from browser import (
    BIG,
    COLUMNS,
    csv_rows,
    current,
    decide,
    export,
    loaded_images,
    needs_browser,
    open_page,
    press,
    progress,
    start_browser,
)

from distributed_influence.report import gallery
from distributed_influence.report import page as report
from distributed_influence.store import tables

#: The shared audit output (a fixture of report_audits, computed once per session).
demo_out = report_audits.demo_out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium for this module (see :func:`browser.start_browser`)."""
    yield from start_browser(tmp_path_factory)


def _with_large_ids(out: str, data_dir: str) -> int:
    """Moves every training id of an audit's output by one shift, so that the most suspicious
    example's id is :data:`BIG`, as a source with hashed int64 ids would have it: in
    ``train_scores``, in the train index (where the supporters come from) and in a copy of the
    training source (where the thumbnails come from), which the manifest then names.

    Returns:
        The shift.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tables.read_manifest(out)
    train = tables.read_table(out, tables.TRAIN_SCORES, manifest).to_pydict()
    shift = BIG - train["train_id"][int(np.argmin(train["audit_rank"]))]
    paths = [os.path.join(out, p) for p in manifest["tables"][tables.TRAIN_SCORES]]
    for path in paths + sorted(glob.glob(os.path.join(out, "index", "shard-*.parquet"))):
        table = pq.read_table(path)
        ids = pa.array(table.column("train_id").to_numpy() + shift, pa.int64())
        pq.write_table(table.set_column(table.column_names.index("train_id"), "train_id", ids), path)
    source = dict(np.load(os.path.join(data_dir, "train.npz")))
    source["id"] = source["id"] + shift
    copy = os.path.join(out, "train_large_ids.npz")
    np.savez(copy, **source)
    path = os.path.join(out, tables.MANIFEST)
    with open(path, encoding="utf-8") as fh:
        raw = json.load(fh)
    raw["config"]["train"] = copy
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(raw, fh)
    return shift


@needs_browser
def test_decisions_from_the_page_apply_to_npz_and_parquet_and_audit_again(demo_out, browser, tmp_path):
    """The whole loop: decisions made on the page and exported, applied by apply-review to the
    audit's .npz source and to a Parquet copy of it, and both corrected copies audited again.
    The relabelled rows carry their new labels, the removed rows are gone, ids are unchanged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distributed_influence.cleaning.apply import apply_review
    from distributed_influence.config import AuditConfig
    from distributed_influence.engine.job import run_audit

    driver, downloads = browser
    out = report_audits.copy_output(demo_out, tmp_path / "out")
    page = report.write_report(out, n_examples=0, n_review=20)
    data = gallery.read_review_data(os.path.join(out, "report", gallery.DATA_JS))
    open_page(driver, page)
    # Walk to the first suspect the model disagrees with; relabel it to the model's class, remove
    # the next one, keep the one after it.
    target = next(s["id"] for s in data["suspects"] if s["label"] != s["pred"])
    for _ in data["suspects"]:
        if current(driver) == target:
            break
        press(driver, "l")
    relabelled = decide(driver, "r")
    removed = decide(driver, "x")
    kept = decide(driver, "k")
    assert relabelled == target and len({relabelled, removed, kept}) == 3
    decisions = export(driver, downloads, tmp_path / "decisions.csv")
    with open(decisions, newline="", encoding="utf-8") as fh:
        rows = {r["train_id"]: r for r in csv.DictReader(fh)}
    pred = {s["id"]: s["pred"] for s in data["suspects"]}
    assert {t: (r["action"], r["new_label"]) for t, r in rows.items()} == {
        relabelled: ("relabel", str(pred[relabelled])), removed: ("remove", ""), kept: ("keep", "")}

    # The sources: the audit's .npz, and the same rows as Parquet (ids, labels, flat pixels).
    src = np.load(os.path.join(demo_out, "data", "train.npz"))
    ids, labels, x = src["id"], src["y"], src["x"]
    parquet = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"id": ids, "label": labels.astype(np.int64),
                             "x": pa.array(list(x.reshape(len(x), -1).astype(np.float32)),
                                           pa.list_(pa.float32()))}), parquet)
    want_ids = ids[ids != int(removed)]
    want_labels = np.where(ids == int(relabelled), pred[relabelled], labels)[ids != int(removed)]
    for source in (os.path.join(demo_out, "data", "train.npz"), parquet):
        name = os.path.basename(source)
        fixed = str(tmp_path / f"fixed_{name}")
        apply_review(source, fixed, decisions=decisions)
        copy = os.path.join(fixed, name)
        if name.endswith(".npz"):
            got = np.load(copy, allow_pickle=False)
            got_ids, got_labels, got_x = got["id"], got["y"], got["x"]
        else:
            t = pq.read_table(copy)
            got_ids, got_labels = t.column("id").to_numpy(), t.column("label").to_numpy()
            got_x = np.stack(t.column("x").to_numpy(zero_copy_only=False)).reshape((-1,) + x.shape[1:])
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_labels, want_labels)
        np.testing.assert_array_equal(got_x, x[ids != int(removed)])
        # Audited again: the tables know the new labels, and the removed row is gone.
        again = str(tmp_path / f"again_{name}")
        run_audit(AuditConfig(model=os.path.join(demo_out, "data", "digits_cnn.keras"), train=copy,
                              test=os.path.join(demo_out, "data", "test.npz"), out=again, k=3), use_ray=False)
        scores = tables.read_table(again, tables.TRAIN_SCORES, tables.read_manifest(again)).to_pydict()
        np.testing.assert_array_equal(scores["train_id"], want_ids)
        np.testing.assert_array_equal(scores["label"], want_labels)


@needs_browser
def test_ids_beyond_2_53_reach_decisions_csv_exactly(demo_out, browser, tmp_path):
    """Hashed int64 ids stay exact from the data to the thumbnails, localStorage and decisions.csv;
    stored decisions that apply-review would refuse (no integer label, an id that is not one)
    are left out on load, and the page says so."""
    driver, downloads = browser
    out = report_audits.copy_output(demo_out, tmp_path / "out")
    _with_large_ids(out, os.path.join(demo_out, "data"))
    page = report.write_report(out, n_examples=0, n_review=6)
    data = gallery.read_review_data(os.path.join(out, "report", gallery.DATA_JS))
    first, second, third = data["suspects"][:3]
    assert first["id"] == str(BIG) and all(int(s["id"]) > 2**53 and "sup" in s for s in data["suspects"])
    store = "distributed-influence/review/" + data["run_key"]
    kept = {"action": "keep", "new_label": None, "label": second["label"], "rank": second["rank"],
            "decided_at": "2025-01-31T09:15:02.123Z"}
    damaged = {second["id"]: kept, third["id"]: dict(kept, label="", rank=third["rank"]), "12x": kept}
    open_page(driver, page)
    driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", store,
                          json.dumps({"format": 1, "decisions": damaged}))
    driver.refresh()
    assert progress(driver) == "1 decided / 6 shown / 6 suspects"
    assert driver.find_element("id", "rv-export").text == "export decisions.csv (1)"
    assert driver.find_element("id", "rv-store-note").text.startswith("2 stored decision(s)")

    # The thumbnails of the first suspect and of its supporters are found by their exact ids.
    card = driver.find_element("css selector", f'.suspect[data-train-id="{BIG}"]')
    sups = first["sup"]["label"] + (first["sup"]["pred"] if first["pred"] != first["label"] else [])
    images = loaded_images(driver, card)
    assert [src for src, _w in images] == [f"thumbs/train_{j}.png" for j in [first["id"]] + [j for j, _r in sups]]
    assert all(width > 0 for _src, width in images), images

    assert decide(driver, "x") == str(BIG)
    assert progress(driver) == "2 decided / 6 shown / 6 suspects"
    stored = driver.execute_script("return Object.keys(JSON.parse(localStorage.getItem(arguments[0])).decisions)",
                                   store)
    assert sorted(stored) == sorted([str(BIG), second["id"]])
    rows = csv_rows(export(driver, downloads, tmp_path / "decisions.csv"))
    assert rows[0] == [c for c in COLUMNS if c != "train_key"]
    assert [r[:4] for r in rows[1:]] == [[str(BIG), str(first["label"]), "remove", ""],
                                        [second["id"], str(second["label"]), "keep", ""]]
    assert int(rows[1][0]) == BIG
