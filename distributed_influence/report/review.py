"""The report's label-review section: the training labels a person should check first.

An audit ends with someone reviewing suspicious training labels. This section gives them:

1. the N most suspicious training examples (``audit_rank`` order) as an interactive gallery of
   thumbnails for image data, or as a table otherwise: id, given label, the model's class and
   its probability of the given label, audit score and rank. The page filters, sorts and pages
   them, and records a decision per suspect (keep, relabel, remove, not sure) that it exports
   as ``decisions.csv`` (:mod:`distributed_influence.report.gallery`);
2. for each of them, the training examples that support its given label and its predicted
   class most strongly: the suspect is scored against the audit's train index (``OUT/index``)
   exactly as the audit scores a test example, r_j = α_{j,c} (x_j · x_suspect), for c the
   given label and the predicted class;
3. a per-class table (how many of the top 5% / 10% fall in each given class) and the most
   common given → predicted pairs among them; a click on a row shows its suspects;
4. ``suspects.csv`` beside the page, for a relabelling tool or a spreadsheet.

The page holds no suspect itself: they are in ``review-data.js`` beside it, and the script
draws one page of them at a time, so N can be large while the page stays small. Supporters
are capped (a few each) and thumbnails are PNGs at the examples' own size.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np

from distributed_influence.report import gallery
from distributed_influence.report.pictures import load_role_pictures, write_thumbnail
from distributed_influence.store import storage

#: Suspects offered for review by default (``--review``). The page draws one page of them at a
#: time, so this bounds the report's run time and its thumbnails folder, not the page.
DEFAULT_REVIEW = 1000
#: Supporting training examples shown per suspect and class.
SUPPORTERS = 3
#: Shares of the ranking summarised per class.
TOP_FRACTIONS = (0.05, 0.10)
#: given → predicted pairs listed.
MAX_PAIRS = 10
#: Index shards kept in memory between finding the suspects' features and scoring them (a
#: 60,000 × 1601 float32 index is 0.4 GB); beyond it, shards are read a second time.
INDEX_CACHE_BYTES = 1 << 30
THUMB_DIR = "thumbs"
SUSPECTS_CSV = "suspects.csv"
CSV_COLUMNS = ("train_id", "label", "predicted_class", "label_probability", "audit_score", "audit_rank")


def top_rows(audit_rank: np.ndarray, n: int) -> np.ndarray:
    """Rows of the n most suspicious training examples, most suspicious first."""
    return np.argsort(audit_rank, kind="stable")[:max(0, n)]


def top_count(n_rows: int, fraction: float) -> int:
    """How many rows the top ``fraction`` of the ranking holds (at least one)."""
    return max(1, int(math.ceil(fraction * n_rows)))


def class_counts(train: Dict[str, np.ndarray], fractions=TOP_FRACTIONS) -> List[Tuple[int, int, List[int]]]:
    """Per given class: (class, training examples, [count in the top p for p in fractions])."""
    labels, rank = train["label"], train["audit_rank"]
    classes = np.unique(labels)
    tops = [rank <= top_count(len(rank), p) for p in fractions]
    return [(int(c), int(np.sum(labels == c)), [int(np.sum(top & (labels == c))) for top in tops])
            for c in classes]


def pair_counts(train: Dict[str, np.ndarray], fractions=TOP_FRACTIONS,
                limit: int = MAX_PAIRS) -> List[Tuple[int, int, List[int]]]:
    """The most common (given label, predicted class) pairs in the top of the ranking.

    Returns:
        (given, predicted, [count in the top p for p in fractions]) ordered by the count in the
        widest fraction, then the narrower ones, then given and predicted class.
    """
    labels, pred, rank = train["label"], train["predicted_class"], train["audit_rank"]
    counts = []
    for p in fractions:
        top = rank <= top_count(len(rank), p)
        pairs, n = np.unique(np.stack([labels[top], pred[top]], axis=1), axis=0, return_counts=True)
        counts.append({(int(a), int(b)): int(c) for (a, b), c in zip(pairs, n)})
    keys = sorted(set().union(*counts), key=lambda k: tuple(-c.get(k, 0) for c in reversed(counts)) + k)
    return [(a, b, [c.get((a, b), 0) for c in counts]) for a, b in keys[:limit]]


def write_suspects_csv(path: str, table, n_rows: int) -> int:
    """Writes the ``n_rows`` most suspicious training examples as CSV, in ``audit_rank`` order.

    Args:
        table: the ``train_scores`` table (pyarrow).

    Returns:
        The number of rows written.
    """
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    order = pc.sort_indices(table, sort_keys=[("audit_rank", "ascending")])
    rows = table.select(list(CSV_COLUMNS)).take(order.slice(0, n_rows))
    with open(path, "wb") as fh:  # a plain header line: spreadsheets and csv readers take either
        fh.write((",".join(CSV_COLUMNS) + "\n").encode())
        pcsv.write_csv(rows, fh, pcsv.WriteOptions(include_header=False, quoting_style="none"))
    return rows.num_rows


def find_supporters(out_dir: str, suspects: Dict[str, np.ndarray],
                    k: int = SUPPORTERS) -> Tuple[Optional[Dict[int, dict]], Optional[str]]:
    """The training examples that support each suspect's given label and predicted class.

    The suspects' features are read from the train index, then each suspect is scored against
    the whole index for both classes, by the audit's own scoring; the suspect itself (which
    always supports its own label) is left out.

    Returns:
        ({train_id: {"label": [(id, r), ...], "predicted": [(id, r), ...]}}, None), or (None, a
        note) when the index cannot be read.
    """
    from distributed_influence.engine.lookup import score_rows_against_index
    from distributed_influence.store import index

    ids = suspects["train_id"]
    if len(ids) == 0:
        return {}, None
    try:
        files = index.shard_files(storage.join(out_dir, index.INDEX_DIR))
        x, shards = _index_rows(files, ids, INDEX_CACHE_BYTES)
        both = np.concatenate([suspects["label"], suspects["predicted_class"]]).astype(np.int64)
        values, found = score_rows_against_index(shards, np.concatenate([x, x]), both, k + 1)
    except Exception as exc:  # supporters are an aid: a moved index must not stop the report
        return None, f"The train index cannot be read ({storage.reason(exc)}); supporters are not shown."
    n = len(ids)
    out = {}
    for row, tid in enumerate(ids):
        lists = {}
        for name, r in (("label", row), ("predicted", n + row)):
            keep = found[r] != tid
            lists[name] = list(zip(found[r][keep][:k].tolist(), values[r][keep][:k].tolist()))
        out[int(tid)] = lists
    return out, None


def _index_rows(files: List[str], ids: np.ndarray, keep_bytes: int):
    """The augmented features of the given training ids, from the index's shard files.

    Returns:
        (features (len(ids), d+1) float32, the shards for scoring: each shard as read, while
        they fit in ``keep_bytes``, else its path, read again when scored).
    """
    from distributed_influence.store import index

    x = None
    seen = np.zeros(len(ids), dtype=bool)
    kept, size = [], 0
    for path in files:
        shard = index.read_shard(path)
        rows = np.flatnonzero(np.isin(shard["ids"], ids))
        if len(rows):
            if x is None:
                x = np.zeros((len(ids), shard["x"].shape[1]), dtype=np.float32)
            where = gallery.positions(ids, shard["ids"][rows])
            x[where] = shard["x"][rows]
            seen[where] = True
        size += shard["x"].nbytes + shard["alpha"].nbytes
        kept.append(shard if size <= keep_bytes else path)
    if x is None or not seen.all():
        raise ValueError(f"training id {int(ids[np.argmin(seen)])} is not in the index")
    return x, kept


# ------------------------------------------------------------------------------------- HTML


def _pct(count: int, total: int) -> str:
    return f"{count / total:.0%}" if total else "n/a"


def _class_tables_html(train: Dict[str, np.ndarray]) -> str:
    """The per-class and pair tables; each row carries its class or pair, so that a click on it
    shows its suspects in the review (review.js)."""
    n = len(train["label"])
    heads = "".join(f"<th>in the top {p:.0%} ({top_count(n, p)})</th>" for p in TOP_FRACTIONS)
    hint = 'title="show these suspects in the review above"'
    rows = "".join(
        f'<tr class="rv-link" data-given="{c}" {hint}><td>{c}</td><td>{total}</td>'
        + "".join(f"<td>{k} ({_pct(k, total)} of the class)</td>" for k in counts) + "</tr>"
        for c, total, counts in class_counts(train))
    per_class = f"<table><tr><th>given label</th><th>training examples</th>{heads}</tr>{rows}</table>"
    pair_rows = "".join(
        f'<tr class="rv-link" data-pair="{a}:{b}" {hint}><td>{a} → {b}{"" if a != b else " (agrees)"}</td>'
        + "".join(f"<td>{k}</td>" for k in counts) + "</tr>"
        for a, b, counts in pair_counts(train))
    pairs = (f"<table><tr><th>given → predicted</th>{heads}</tr>{pair_rows}</table>")
    return ("<h3>Suspicious labels per class</h3>\n<p>Click a row to review its suspects.</p>\n" + per_class
            + "\n<h3>Most common given → predicted pairs among them</h3>\n" + pairs)


def review_section(out_dir: str, report_dir: str, manifest: dict, train: Dict[str, np.ndarray], train_table,
                   n_review: int = DEFAULT_REVIEW, bad_ids: Optional[np.ndarray] = None) -> str:
    """The label-review section's HTML; writes ``suspects.csv``, the thumbnails, the review's
    data and its script beside the page.

    Args:
        out_dir: the audit's output directory (for its train index).
        report_dir: where the page is written.
        manifest: the audit's manifest (sources, input shape, run key).
        train: ``train_scores`` columns as NumPy arrays.
        train_table: the same table (pyarrow), for the CSV and the keys.
        n_review: suspects offered for review.
        bad_ids: training ids known to be mislabelled, marked on the page.
    """
    parts = ["<h2>Label review: the most suspicious training labels</h2>"]
    if "predicted_class" not in train or "label_probability" not in train:
        return parts[0] + ('<p class="note">These results have no predicted_class/label_probability columns '
                           "(written by an older version): run the audit again for the label review.</p>")
    n = len(train["train_id"])
    n_csv = write_suspects_csv(os.path.join(report_dir, SUSPECTS_CSV), train_table,
                               max(n_review, top_count(n, max(TOP_FRACTIONS))))
    rows = top_rows(train["audit_rank"], n_review)
    is_bad = np.zeros(n, dtype=bool) if bad_ids is None else np.isin(train["train_id"], bad_ids)
    parts.append(
        f"<p>The {len(rows)} training examples with the largest audit score |α<sub>i,y<sub>i</sub></sub>| "
        f"(rank 1 = most suspicious), with the model's class for each and its probability of the given "
        f"label. Beside each: the training examples that support its given label and its predicted class "
        f"most strongly (largest representer value r = α<sub>j,c</sub>(x<sub>j</sub>·x<sub>i</sub>), the "
        f"audit's own scoring with the suspect in the place of a test example); each supporter shows "
        f"its label and its own audit rank: a label supported mostly by other suspects is all the "
        f"more likely wrong. Decide on each suspect with the buttons or the keys below, then export "
        f"the decisions. "
        f'<a href="{SUSPECTS_CSV}">{SUSPECTS_CSV}</a> lists the first {n_csv} of the ranking '
        f"({', '.join(CSV_COLUMNS)}).</p>")
    if bad_ids is not None and rows.size:
        k = int(is_bad[rows].sum())
        parts.append(f"<p>{k} of these {len(rows)} are known-bad labels (marked), against "
                     f"{_pct(int(is_bad.sum()), n)} of the whole training set.</p>")
    supporters, note = find_supporters(out_dir, {
        "train_id": train["train_id"][rows], "label": train["label"][rows],
        "predicted_class": train["predicted_class"][rows]})
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    shown = train["train_id"][rows].tolist()
    if supporters:
        shown += [tid for sup in supporters.values() for items in sup.values() for tid, _r in items]
    shown_ids = np.unique(np.array(shown, dtype=np.int64))
    config = dict(manifest.get("config", {}))
    config["input_shape"] = manifest.get("input_shape") or config.get("input_shape")
    pictures, pic_note = load_role_pictures(config, "train", shown_ids) if len(shown_ids) else (None, None)
    if pictures is not None:
        _write_thumbnails(os.path.join(report_dir, THUMB_DIR), pictures)
    elif pic_note:
        parts.append(f'<p class="note">{html.escape(pic_note)}</p>')
    data = gallery.review_data(manifest, train, train_table, rows, is_bad, supporters, bad_ids is not None,
                               pictures is not None, THUMB_DIR)
    gallery.write_review_files(report_dir, data)
    parts.append(gallery.gallery_html(data))
    parts.append(_class_tables_html(train))
    return "\n".join(parts)


def _write_thumbnails(folder: str, pictures: Dict[int, np.ndarray]) -> Dict[int, str]:
    """One PNG per training id, in a fresh folder (a rerun leaves no stale files)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return {tid: write_thumbnail(os.path.join(folder, f"train_{tid}.png"), pic) for tid, pic in pictures.items()}


#: The review's style, inlined in the page (the page's other styles are in report/page.py).
REVIEW_STYLE = gallery.static_text("review.css")
