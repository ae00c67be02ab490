"""The label review's interactive gallery: its data file, and the page driven in a real browser.

The browser tests open the report from ``file://`` in headless Chromium through the system's
chromedriver (Selenium), as a reviewer would: filter, decide by key and by button, reload,
export ``decisions.csv`` and check it against the ``train_scores`` table.

Train ids are strings in the data and on the page (int64 ids beyond 2^53 would not survive a
JavaScript number), so the helpers here read them as strings too.
"""

import datetime
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
    needs_browser,
    open_page,
    press,
    progress,
    shown,
    start_browser,
)

from distributed_influence.report import gallery
from distributed_influence.report import page as report
from distributed_influence.store import tables

#: The shared audit outputs (fixtures of report_audits, computed once per session).
demo_out, flat_out = report_audits.demo_out, report_audits.flat_out

#: A key that is markup, has commas and quotes: what a file name may hold.
EVIL = '<img src=x onerror="window.__xss=1">, "quoted" & </script>'




@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium for this module (see :func:`browser.start_browser`)."""
    yield from start_browser(tmp_path_factory)


def _key(tid: int) -> str:
    return f"{EVIL} {tid}" if tid % 2 else f"img/{tid:03d}, \"q\".png"


def _with_keys(out: str) -> dict:
    """Gives the audit's train_scores a ``train_key`` column, as a source with keys would (the
    contract appends it after the other columns); returns {train_id: key}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = {}
    for part in tables.read_manifest(out)["tables"][tables.TRAIN_SCORES]:
        path = os.path.join(out, part)
        table = pq.read_table(path)
        ids = table.column("train_id").to_pylist()
        keys.update({i: _key(i) for i in ids})
        pq.write_table(table.append_column(pa.field("train_key", pa.string()), pa.array([_key(i) for i in ids])), path)
    return keys


def _train(out: str) -> dict:
    """train_scores as {train_id: row dict}."""
    table = tables.read_table(out, tables.TRAIN_SCORES, tables.read_manifest(out)).to_pylist()
    return {row["train_id"]: row for row in table}


# --------------------------------------------------------------------------- the data file


def test_review_data_matches_train_scores(demo_out, tmp_path):
    out = report_audits.copy_output(demo_out, tmp_path / "out")
    flipped = os.path.join(demo_out, "data", "flipped_ids.txt")
    keys = _with_keys(out)
    page = report.write_report(out, known_bad=flipped, n_examples=0, n_review=25)
    data = gallery.read_review_data(os.path.join(out, "report", gallery.DATA_JS))
    train, manifest = _train(out), tables.read_manifest(out)
    bad = set(np.loadtxt(flipped, dtype=np.int64).tolist())

    assert (data["format"], data["run_key"], data["n_classes"], data["n_train"]) == (2, manifest["run_key"], 10, 150)
    assert data["has_keys"] and data["known_bad"] and data["thumbs"] == "thumbs"
    top = sorted(train.values(), key=lambda r: r["audit_rank"])[:25]
    assert [s["id"] for s in data["suspects"]] == [str(r["train_id"]) for r in top]
    for s in data["suspects"]:
        tid = int(s["id"])
        row = train[tid]
        assert (s["rank"], s["label"], s["pred"], s["bad"], s["key"]) == (
            row["audit_rank"], row["label"], row["predicted_class"], tid in bad, keys[tid])
        np.testing.assert_allclose([s["p"], s["pp"], s["score"]],
                                   [row["label_probability"], row["predicted_probability"], row["audit_score"]], rtol=1e-3)
        assert len(s["sup"]["label"]) == 3 and len(s["sup"]["pred"]) == 3
        for j, r in s["sup"]["label"] + s["sup"]["pred"]:
            assert data["examples"][j] == [train[int(j)]["label"], train[int(j)]["audit_rank"], int(j) in bad,
                                           keys[int(j)]]
            assert j != s["id"] and os.path.isfile(os.path.join(out, "report", "thumbs", f"train_{j}.png"))
    with open(page, encoding="utf-8") as fh:
        text = fh.read()
    # The page holds no data (the scripts draw it) and loads it, then the scripts in order, from beside it.
    assert ('<script src="review-data.js"></script>\n<script src="review-store.js"></script>\n'
            '<script src="review.js"></script>') in text
    assert "onerror" not in text and "__xss" not in text and "quoted" not in text
    for name in gallery.SCRIPTS:
        with open(os.path.join(out, "report", name), encoding="utf-8") as fh:
            assert fh.read() == gallery.static_text(name)


def test_every_static_script_is_copied_beside_the_page():
    """A script added to static/ (package data: static/*.js) but not to SCRIPTS would be
    shipped and never loaded."""
    from importlib import resources

    static = resources.files("distributed_influence.report").joinpath("static")
    assert sorted(gallery.SCRIPTS) == sorted(f.name for f in static.iterdir() if f.name.endswith(".js"))
    assert gallery.SCRIPTS[-1] == gallery.SCRIPT_JS  # review.js uses what the others define


def test_ids_beyond_2_53_round_trip_exactly(tmp_path):
    """int64 ids (hashed ids fill all 64 bits) are strings in the data, suspects, supporters and
    examples alike: as JSON numbers they would reach the browser as the nearest double."""
    assert float(BIG) == float(BIG - 1)  # what a JavaScript number would make of it
    train = {"train_id": np.array([BIG, BIG + 2, 5], dtype=np.int64), "label": np.array([0, 1, 1]),
             "predicted_class": np.array([1, 1, 0]), "label_probability": np.array([0.1, 0.5, 0.2], np.float32),
             "audit_score": np.array([3.0, 1.0, 2.0], np.float32), "audit_rank": np.array([1, 3, 2])}
    supporters = {BIG: {"label": [(BIG + 2, 0.5)], "predicted": [(5, 0.25)]},
                  5: {"label": [(BIG, 1.0)], "predicted": []}}
    data = gallery.review_data({"n_classes": 2}, train, None, np.array([0, 2]), np.array([True, False, False]),
                               supporters, True, True, "thumbs")
    text = gallery.data_script(data)
    assert f'"id":"{BIG}"' in text
    path = tmp_path / gallery.DATA_JS
    path.write_text(text, encoding="ascii")
    back = gallery.read_review_data(str(path))
    assert back == data and back["format"] == gallery.DATA_FORMAT == 2
    assert [s["id"] for s in back["suspects"]] == [str(BIG), "5"] and int(back["suspects"][0]["id"]) == BIG
    assert back["suspects"][0]["sup"] == {"label": [[str(BIG + 2), 0.5]], "pred": [["5", 0.25]]}
    assert back["suspects"][1]["sup"] == {"label": [[str(BIG), 1.0]], "pred": []}
    assert back["examples"] == {"5": [1, 2, False, None], str(BIG): [0, 1, True, None],
                                str(BIG + 2): [1, 3, False, None]}


def test_positions_finds_rows_and_marks_missing_ids():
    keys = np.array([30, BIG, 10, 20], dtype=np.int64)
    np.testing.assert_array_equal(gallery.positions(keys, np.array([20, BIG, 40, BIG - 1, 30, 10])),
                                  [3, 1, -1, -1, 0, 2])
    np.testing.assert_array_equal(gallery.positions(np.zeros(0, np.int64), np.array([1, 2])), [-1, -1])
    assert gallery.positions(keys, np.zeros(0, np.int64)).size == 0


def test_data_script_escapes_markup_and_round_trips(tmp_path):
    data = {"suspects": [{"id": 1, "key": EVIL + " \u2028\u2029 é ☃ \\ \n"}], "run_key": None, "n": 1.5}
    text = gallery.data_script(data)
    assert text.isascii() and text.count("\n") == 3
    assert not set("<>&") & set(text.split("\n")[1])  # inert even if pasted into a page
    path = tmp_path / gallery.DATA_JS
    path.write_text(text, encoding="ascii")
    assert gallery.read_review_data(str(path)) == data
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a review data file"):
        gallery.read_review_data(str(path))


def test_review_data_without_finite_probability_or_keys():
    train = {"train_id": np.array([7, 3, 5]), "label": np.array([0, 1, 2]), "predicted_class": np.array([1, 1, 0]),
             "label_probability": np.array([np.nan, 0.5, 0.25], dtype=np.float32),
             "audit_score": np.array([2.0, 1.0, np.inf], dtype=np.float32), "audit_rank": np.array([1, 3, 2])}
    rows = np.array([0, 2, 1])
    data = gallery.review_data({}, train, None, rows, np.zeros(3, dtype=bool), None, False, False, "thumbs")
    assert data["suspects"] == [
        {"id": "7", "rank": 1, "label": 0, "pred": 1, "p": None, "score": 2.0, "bad": False},
        {"id": "5", "rank": 2, "label": 2, "pred": 0, "p": 0.25, "score": None, "bad": False},
        {"id": "3", "rank": 3, "label": 1, "pred": 1, "p": 0.5, "score": 1.0, "bad": False}]
    # No n_classes in the manifest: the classes seen; no run key: the script keys by the page's path.
    assert (data["n_classes"], data["run_key"], data["has_keys"], data["thumbs"], data["examples"]) == (
        3, None, False, None, {})
    json.loads(gallery.data_script(data).split("\n")[1])  # strict JSON: no NaN, no Infinity
    html_text = gallery.gallery_html(data)
    assert 'data-mode="table"' in html_text and 'id="rv-bad"' not in html_text and "train_key" not in html_text


# --------------------------------------------------------------------------------- browser


@needs_browser
def test_review_page_filters_decides_reloads_and_exports(demo_out, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    driver, downloads = browser
    out = report_audits.copy_output(demo_out, tmp_path / "out")
    keys = _with_keys(out)
    page = report.write_report(out, known_bad=os.path.join(demo_out, "data", "flipped_ids.txt"), n_examples=0,
                               n_review=60)
    data = gallery.read_review_data(os.path.join(out, "report", gallery.DATA_JS))
    train = _train(out)
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    open_page(driver, page)

    # Paging: 48 of the 60 suspects on the first page, each thumbnail lazy; the rest on the next.
    assert progress(driver) == "0 decided / 60 shown / 60 suspects"
    assert [s[0] for s in shown(driver)] == [s["id"] for s in data["suspects"][:48]]
    thumbs = driver.find_elements("css selector", "#rv-items img.thumb")
    assert len(thumbs) == 48 and {t.get_attribute("loading") for t in thumbs} == {"lazy"}
    press(driver, "n")
    assert [s[0] for s in shown(driver)] == [s["id"] for s in data["suspects"][48:]]
    press(driver, "p")
    # Keys from the data set are text, never markup.
    first = driver.find_element("css selector", f'.suspect[data-train-id="{data["suspects"][0]["id"]}"] .key')
    assert first.text == keys[int(data["suspects"][0]["id"])]
    assert driver.execute_script("return window.__xss") is None
    # The card says how sure the model is of its class, as train_scores has it.
    s0 = data["suspects"][0]
    meta = driver.find_element("css selector", f'.suspect[data-train-id="{s0["id"]}"] .meta').text
    assert f"model says {s0['pred']} ({s0['pp']:.3f})" in meta, meta

    # Known-bad only; a row of the per-class table shows that given label.
    driver.find_element("id", "rv-bad").click()
    assert [s[0] for s in shown(driver)] == [s["id"] for s in data["suspects"] if s["bad"]]
    driver.find_element("id", "rv-bad").click()
    label = data["suspects"][0]["label"]
    driver.find_element("css selector", f'tr.rv-link[data-given="{label}"]').click()
    assert [s[0] for s in shown(driver)] == [s["id"] for s in data["suspects"] if s["label"] == label]

    # A pair of the page's pair table opens the gallery on that pair's suspects.
    row = next(r for r in driver.find_elements("css selector", "tr.rv-link[data-pair]")
               if len(set(r.get_attribute("data-pair").split(":"))) == 2)  # the model disagrees
    given, pred = map(int, row.get_attribute("data-pair").split(":"))
    row.click()
    in_pair = [s["id"] for s in data["suspects"] if (s["label"], s["pred"]) == (given, pred)]
    assert in_pair and [s[0] for s in shown(driver)] == in_pair
    assert progress(driver) == f"0 decided / {len(in_pair)} shown / 60 suspects"
    driver.save_screenshot(str(tmp_path / "pair.png"))
    by_model = decide(driver, "r")
    expected = {by_model: ("relabel", str(pred))}

    # The model's class and undecided only, then the keys: remove, skip one, not sure, back,
    # relabel to another class. Each decision moves on; a decided suspect leaves this view.
    Select(driver.find_element("id", "rv-pair")).select_by_value("")
    cls = data["suspects"][0]["pred"]
    Select(driver.find_element("id", "rv-pred")).select_by_value(str(cls))
    of_class = [s["id"] for s in data["suspects"] if s["pred"] == cls]
    assert [s[0] for s in shown(driver)] == of_class
    driver.find_element("id", "rv-undecided").click()
    left = [t for t in of_class if t not in expected]
    assert [s[0] for s in shown(driver)] == left and len(left) >= 3
    assert current(driver) == left[0]
    expected[decide(driver, "x")] = ("remove", "")
    press(driver, "l")
    expected[decide(driver, "u")] = ("unsure", "")
    assert [s[0] for s in shown(driver)] == [t for t in left if t not in expected]
    press(driver, "j", Keys.ARROW_LEFT)
    target = current(driver)
    assert target == left[1]
    other = (train[int(target)]["label"] + 3) % 10
    press(driver, "o")
    picker = driver.find_element("css selector", f'.suspect[data-train-id="{target}"] select.rv-picker')
    assert driver.switch_to.active_element == picker
    Select(picker).select_by_value(str(other))
    picker.send_keys(Keys.ENTER)
    expected[target] = ("relabel", str(other))
    # One by button, with the class filter cleared.
    Select(driver.find_element("id", "rv-pred")).select_by_value("")
    by_button = shown(driver)[0][0]
    driver.find_element("css selector", f'.suspect[data-train-id="{by_button}"] button[data-action="keep"]').click()
    expected[by_button] = ("keep", "")
    assert progress(driver) == "5 decided / 55 shown / 60 suspects"
    assert not set(expected) & {s[0] for s in shown(driver)}

    # Sorting by label probability.
    driver.find_element("id", "rv-undecided").click()
    assert progress(driver) == "5 decided / 60 shown / 60 suspects"
    Select(driver.find_element("id", "rv-sort")).select_by_value("p")
    by_p = sorted(data["suspects"], key=lambda s: (s["p"], s["rank"]))
    assert [s[0] for s in shown(driver)] == [s["id"] for s in by_p[:48]]

    # A reload loses nothing; the decisions are stored under the audit's run key.
    driver.refresh()
    assert progress(driver) == "5 decided / 60 shown / 60 suspects"
    stored = driver.execute_script("return Object.keys(localStorage)")
    assert stored == ["distributed-influence/review/" + tables.read_manifest(out)["run_key"]]
    decided = {s[0]: s[3] for s in shown(driver) if s[0] in expected}
    for tid, (action, _new) in expected.items():
        assert tid not in decided or f"d-{action}" in decided[tid]

    # Export: decisions.csv, rows in audit_rank order, checked against train_scores.
    rows = csv_rows(export(driver, downloads, tmp_path / "decisions.csv"))
    assert rows[0] == COLUMNS and len(rows) == 1 + len(expected)
    assert [r[0] for r in rows[1:]] == sorted(expected, key=lambda t: train[int(t)]["audit_rank"])
    now = datetime.datetime.now(datetime.timezone.utc)
    for tid, label, action, new_label, key, decided_at in rows[1:]:
        assert (action, new_label) == expected[tid]
        assert (int(label), key) == (train[int(tid)]["label"], keys[int(tid)])
        if tid == by_model:
            assert int(new_label) == train[int(tid)]["predicted_class"]  # "r": the model's class
        assert decided_at.endswith("Z")
        assert started <= datetime.datetime.fromisoformat(decided_at.replace("Z", "+00:00")) <= now


@needs_browser
def test_review_table_for_flat_data(flat_out, browser, tmp_path):
    """Flat data: the same review as a table, decided by key, exported without train_key."""
    from selenium.webdriver.common.keys import Keys

    driver, downloads = browser
    out = report_audits.copy_output(flat_out, tmp_path / "out")
    page = report.write_report(out, n_examples=0, n_review=10)
    data = gallery.read_review_data(os.path.join(out, "report", gallery.DATA_JS))
    open_page(driver, page)
    rows = driver.find_elements("css selector", "#rv-items table.suspects tr.suspect")
    assert [r.get_attribute("data-train-id") for r in rows] == [s["id"] for s in data["suspects"]]
    assert not driver.find_elements("css selector", "#rv-items img") and not driver.find_elements("id", "rv-bad")
    first = data["suspects"][0]
    press(driver, "k", "x")
    assert progress(driver) == "2 decided / 10 shown / 10 suspects"
    classes = [c.split() for _t, _l, _p, c in shown(driver)]
    assert "d-keep" in classes[0] and "d-remove" in classes[1] and "current" in classes[2]
    press(driver, "j", Keys.BACKSPACE)  # back to the second, and forget its decision
    assert progress(driver) == "1 decided / 10 shown / 10 suspects"
    rows = csv_rows(export(driver, downloads, tmp_path / "decisions.csv"))
    assert rows[0] == [c for c in COLUMNS if c != "train_key"]
    assert rows[1][:4] == [first["id"], str(first["label"]), "keep", ""] and len(rows) == 2
