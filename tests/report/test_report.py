"""`distributed-influence report`: the HTML page and its figures, from real audit outputs."""

import argparse
import html
import html.parser
import json
import os
import re
import shutil

import numpy as np
import pytest
import report_audits
from PIL import Image

from distributed_influence.errors import InputError
from distributed_influence.report import gallery, neighbours
from distributed_influence.report import page as report
from distributed_influence.store import tables

#: The shared audit outputs (fixtures of report_audits, computed once per session).
demo_out, flat_out = report_audits.demo_out, report_audits.flat_out

VOID_TAGS = {"meta", "img", "br", "hr", "link", "input"}




_copy_output = report_audits.copy_output


def _images(page: str) -> list:
    with open(page, encoding="utf-8") as fh:
        return re.findall(r'<img[^>]*\ssrc="([^"]+)"', fh.read())


def _assert_valid_pngs(page: str) -> list:
    """Every figure the page links exists beside it and opens as a PNG with a real size."""
    srcs = _images(page)
    assert srcs
    for src in srcs:
        assert not os.path.isabs(src) and src.endswith(".png"), src
        path = os.path.join(os.path.dirname(page), src)
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0, src
    return srcs


class _TagChecker(html.parser.HTMLParser):
    """Checks that every non-void tag is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()


def _assert_well_formed(page: str) -> str:
    with open(page, encoding="utf-8") as fh:
        text = fh.read()
    checker = _TagChecker()
    checker.feed(text)
    checker.close()
    assert text.startswith("<!DOCTYPE html>") and checker.stack == []
    return text


def test_report_draws_examples_with_images(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    page = report.write_report(out)
    assert page == os.path.join(out, "report", "index.html")
    text = _assert_well_formed(page)
    srcs = _assert_valid_pngs(page)
    examples = [s for s in srcs if s.startswith("example_")]
    assert len(examples) == 8
    assert {"audit_curve.png", "alpha_label.png", "decomposition_error.png"} <= set(srcs)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert f"<td>{manifest['n_train']}</td>" in text and f"<td>{manifest['n_test']}</td>" in text
    assert f"{manifest['head_fit']['max_abs_grad']:.2e}" in text
    assert "representer value</th>" not in text  # pictures, not the fallback table
    states = re.findall(r"<h3>test \d+: .*?\((misclassified|correct)\)</h3>", text)
    assert states == sorted(states, key=lambda s: s != "misclassified")


def test_known_bad_adds_found_curve(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    flipped = os.path.join(demo_out, "data", "flipped_ids.txt")
    curve = os.path.join(out, "report", "audit_curve.png")
    report.write_report(out, n_examples=0)
    without = open(curve, "rb").read()
    page = report.write_report(out, known_bad=flipped, n_examples=0)
    text = _assert_well_formed(page)
    assert "audit_curve.png" in _assert_valid_pngs(page)
    assert open(curve, "rb").read() != without  # the known-bad curve and the diagonal were drawn
    n_flipped = len(np.loadtxt(flipped, dtype=np.int64))
    assert f"{n_flipped} in the training set" in text
    assert "5% checked" in text and "20% checked" in text


def test_examples_option_limits_figures(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    page = report.write_report(out, n_examples=2)
    assert len([s for s in _assert_valid_pngs(page) if s.startswith("example_")]) == 2


def test_flat_sources_show_ids_and_values(flat_out, tmp_path):
    out = _copy_output(flat_out, tmp_path / "out")
    page = report.write_report(out, n_examples=3)
    text = _assert_well_formed(page)
    srcs = _assert_valid_pngs(page)
    assert not [s for s in srcs if s.startswith("example_")]
    assert "does not hold images" in text
    assert text.count("representer value</th>") == 3
    assert len(re.findall(r"<td>proponent</td>", text)) == 3 * 3


def test_moved_source_falls_back_with_a_note(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    manifest["config"]["train"] = str(tmp_path / "<moved>" / "train.npz")
    json.dump(manifest, open(path, "w"))
    page = report.write_report(out, n_examples=2)
    text = _assert_well_formed(page)
    assert "cannot be read" in text and "&lt;moved&gt;" in text and "<moved>" not in text
    assert not [s for s in _assert_valid_pngs(page) if s.startswith("example_")]
    assert text.count("representer value</th>") == 2


def test_missing_out_raises_input_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match="nowhere"):
        report.write_report(missing)


def test_missing_table_raises_input_error(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    shutil.rmtree(os.path.join(out, tables.TEST_SCORES))
    with pytest.raises(InputError, match=tables.TEST_SCORES):
        report.write_report(out)


def test_bad_known_bad_file_raises_input_error(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    bad = tmp_path / "bad.txt"
    bad.write_text("3 4\nfive\n")
    with pytest.raises(InputError, match="bad.txt"):
        report.write_report(out, known_bad=str(bad))
    with pytest.raises(InputError, match="absent.txt"):
        report.write_report(out, known_bad=str(tmp_path / "absent.txt"))


def test_parser_and_command(demo_out, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    report.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", "somewhere", "--known-bad", "bad.txt", "--examples", "3"])
    assert (args.out, args.known_bad, args.examples, args.func) == ("somewhere", "bad.txt", 3, report.cmd_report)
    out = _copy_output(demo_out, tmp_path / "out")
    args = parser.parse_args(["report", out, "--examples", "1"])
    assert args.known_bad is None
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "report", "index.html")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["report"]._actions:
        assert action.help, action.dest


def test_select_examples_puts_misclassified_first():
    test = {"test_id": np.array([10, 11, 12, 13]), "label": np.array([1, -1, 2, 0]),
            "label_known": np.array([True, False, True, True]), "predicted_class": np.array([1, 0, 0, 0])}
    assert list(neighbours.select_examples(test, 3)) == [2, 0, 1]
    assert list(neighbours.select_examples(test, 0)) == []
    assert neighbours.misclassified(test).tolist() == [False, False, True, False]  # an unknown label never is


def test_audit_curve_counts_known_bad_in_rank_order():
    checked, found = report.audit_curve(np.array([3, 1, 4, 2]), np.array([0, 1, 1, 0]))
    np.testing.assert_allclose(checked, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(found, [0, 0.5, 0.5, 0.5, 1])


# ------------------------------------------------------------------------------ label review


def _review(out: str) -> dict:
    """The review data a report wrote beside its page (review-data.js)."""
    return gallery.read_review_data(os.path.join(out, "report", gallery.DATA_JS))


def _brute_force_supporters(out: str, suspect: int, cls: int, k: int) -> list:
    """Top-k r_j = α_{j,c} (x_j · x_i) over all other training rows, from the index by NumPy sorting."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(os.path.join(out, "index", "shard-*.parquet")))])
    ids = t.column("train_id").to_numpy()
    # The index packs each row's values as little-endian bytes (README, "Explaining new test examples").
    x = np.stack([np.frombuffer(b, "<f4") for b in t.column("features").to_pylist()]).astype(np.float64)
    alpha = np.stack([np.frombuffer(b, "<f8") for b in t.column("alpha").to_pylist()])
    r = alpha[:, cls] * (x @ x[ids == suspect][0])
    order = sorted((v, i) for v, i in zip((-r).tolist(), ids.tolist()) if i != suspect)
    return [i for _v, i in order[:k]]


def test_label_review_gallery_csv_and_class_table(demo_out, tmp_path):
    from distributed_influence.store.results import load_results

    out = _copy_output(demo_out, tmp_path / "out")
    flipped = np.loadtxt(os.path.join(demo_out, "data", "flipped_ids.txt"), dtype=np.int64)
    page = report.write_report(out, known_bad=os.path.join(demo_out, "data", "flipped_ids.txt"),
                               n_examples=0, n_review=20)
    text = _assert_well_formed(page)
    srcs = _assert_valid_pngs(page)
    res = load_results(out)
    train = res.train_scores.to_pydict()
    order = np.argsort(train["audit_rank"])
    top_ids = np.asarray(train["train_id"])[order[:20]]
    # The section on the test errors: the largest error_influence values, in order, and the
    # number of wrong test predictions counted from the test table.
    section = text.split("Training examples behind the test errors")[1].split("<h2>")[0]
    err = np.asarray(train["error_influence"], np.float64)
    want = np.asarray(train["train_id"])[np.argsort(-err, kind="stable")[:20]]
    assert [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", section)] == want.tolist()
    test_t = res.test_scores.to_pydict()
    n_wrong = sum(a != b for a, b in zip(test_t["label"], test_t["predicted_class"]))
    assert 0 < n_wrong and f"over the {n_wrong} wrongly predicted test examples" in section

    suspects = _review(out)["suspects"]
    # Ids are strings in the data (exact beyond 2^53 in the browser).
    assert [s["id"] for s in suspects] == [str(i) for i in top_ids]
    assert [s["rank"] for s in suspects] == list(range(1, 21))
    assert [s["bad"] for s in suspects] == np.isin(top_ids, flipped).tolist()
    assert not [s for s in srcs if s.startswith("thumbs/")]  # thumbnails are drawn by the script
    for s in suspects:  # every thumbnail the script will ask for exists
        for tid in [s["id"]] + [j for kind in s["sup"].values() for j, _r in kind]:
            with Image.open(os.path.join(out, "report", "thumbs", f"train_{tid}.png")) as im:
                assert im.format == "PNG" and im.size == (8, 8)
    labels = dict(zip(train["train_id"], train["label"]))
    preds = dict(zip(train["train_id"], train["predicted_class"]))
    for s in suspects[:5]:  # supporters equal brute force over the index
        tid = int(s["id"])
        assert [int(j) for j, _r in s["sup"]["label"]] == _brute_force_supporters(out, tid, labels[tid], 3)
        assert [int(j) for j, _r in s["sup"]["pred"]] == _brute_force_supporters(out, tid, preds[tid], 3)

    # suspects.csv: the top of the ranking (20 reviewed, or 10% of 150 = 15 rows), as in the table.
    with open(os.path.join(out, "report", "suspects.csv"), encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert lines[0] == "train_id,label,predicted_class,label_probability,audit_score,audit_rank"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == top_ids.tolist()
    for r, i in zip(rows, order[:20]):
        assert (int(r[1]), int(r[2]), int(r[5])) == (train["label"][i], train["predicted_class"][i],
                                                     train["audit_rank"][i])
        np.testing.assert_allclose([float(r[3]), float(r[4])],
                                   [train["label_probability"][i], train["audit_score"][i]], rtol=1e-6)

    # Per-class counts of the top 5% (8 rows) and 10% (15 rows) of 150.
    lab = np.asarray(train["label"])[order]
    for c in range(10):
        five, ten = int(np.sum(lab[:8] == c)), int(np.sum(lab[:15] == c))
        total = int(np.sum(lab == c))
        assert re.search(rf'<tr class="rv-link" data-given="{c}"[^>]*><td>{c}</td><td>{total}</td><td>{five} \(',
                         text), c
        assert re.search(rf"<td>{c}</td><td>{total}</td><td>{five} \([^<]*\)</td><td>{ten} \(", text), c
    pairs = {}
    for a, b in zip(lab[:15], np.asarray(train["predicted_class"])[order][:15]):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    best = max(pairs.values())
    first = re.search(r'<tr class="rv-link" data-pair="(\d+):(\d+)"[^>]*><td>\1 → \2[^<]*</td><td>\d+</td>'
                      r"<td>(\d+)</td>", text)
    assert int(first.group(3)) == best and pairs[(int(first.group(1)), int(first.group(2)))] == best


def test_label_review_table_for_flat_data(flat_out, tmp_path, monkeypatch):
    from distributed_influence.report import review as report_review

    out = _copy_output(flat_out, tmp_path / "out")
    page = report.write_report(out, n_examples=0, n_review=5)
    text = _assert_well_formed(page)
    data = _review(out)
    monkeypatch.setattr(report_review, "INDEX_CACHE_BYTES", 0)  # index shards read twice: same page
    assert _assert_well_formed(report.write_report(out, n_examples=0, n_review=5)) == text
    assert _review(out) == data
    assert 'data-mode="table"' in text and 'class="gallery"' not in text
    assert data["thumbs"] is None and not os.path.exists(os.path.join(out, "report", "thumbs"))
    assert len(data["suspects"]) == 5
    for s in data["suspects"]:  # supporters listed, each described for its caption
        assert len(s["sup"]["label"]) == 3 and len(s["sup"]["pred"]) == 3
        assert all(isinstance(j, str) and j in data["examples"] for kind in s["sup"].values() for j, _r in kind)
    assert os.path.isfile(os.path.join(out, "report", "suspects.csv"))
    with pytest.raises(Exception, match="--review"):
        report.write_report(out, n_review=-1)


def test_label_review_without_index_says_so(demo_out, tmp_path):
    out = _copy_output(demo_out, tmp_path / "out")
    shutil.rmtree(os.path.join(out, "index"))
    page = report.write_report(out, n_examples=0, n_review=4)
    text = _assert_well_formed(page)
    suspects = _review(out)["suspects"]
    assert "train index cannot be read" in text and len(suspects) == 4
    assert not [s for s in suspects if "sup" in s]
    _assert_valid_pngs(page)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Every image of the page, loaded now: the review's thumbnails are lazy, so a browser would
# leave those out of sight unloaded. Switched to eager, each loads or fails, then is checked.
_CHECK = """<script>
window.addEventListener('load', async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(done => {
    i.addEventListener('load', done);
    i.addEventListener('error', done);
  })));
  const broken = imgs.filter(i => i.naturalWidth === 0).map(i => i.getAttribute('src'));
  const out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = JSON.stringify({total: imgs.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.slow  # starts a browser
def test_report_loads_in_headless_chromium(demo_out, tmp_path):
    """A real browser renders the page and every image it references loads."""
    import subprocess

    out = _copy_output(demo_out, tmp_path / "out")
    page = report.write_report(out, known_bad=os.path.join(demo_out, "data", "flipped_ids.txt"), n_review=30)
    expected = _images(page)
    # A copy of the page with a checker script beside it (same folder: same relative image paths).
    probe = os.path.join(os.path.dirname(page), "_probe.html")
    with open(page, encoding="utf-8") as fh:
        open(probe, "w", encoding="utf-8").write(fh.read().replace("</body>", _CHECK + "</body>"))
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(args + ["--dump-dom", "file://" + probe], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    suspects = _review(out)["suspects"]  # all 30 on the gallery's first page, with their supporters
    drawn = len(suspects) + sum(len(s["sup"]["label"]) + (len(s["sup"]["pred"]) if s["pred"] != s["label"] else 0)
                                for s in suspects)
    assert result == {"total": len(expected) + drawn, "broken": []}
    assert len(re.findall(r'<div class="suspect card', dom)) == 30  # the gallery was rendered
    shot = tmp_path / "page.png"
    subprocess.run(args + ["--window-size=1200,1600", f"--screenshot={shot}", "file://" + page],
                   capture_output=True, timeout=120)
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        assert len(set(im.convert("L").getdata())) > 2  # something was drawn, not a blank page
