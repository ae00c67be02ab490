"""The report's label-review section: the training labels a person should check first.

An audit ends with someone reviewing suspicious training labels. This section gives them:

1. the N most suspicious training examples (``audit_rank`` order) as a gallery of thumbnails
   for image data, or as a table otherwise: id, given label, the model's class and its
   probability of the given label, audit score and rank;
2. for each of them, the training examples that support its given label and its predicted
   class most strongly: the suspect is scored against the audit's train index (``OUT/index``)
   exactly as the audit scores a test example, r_j = α_{j,c} (x_j · x_suspect), for c the
   given label and the predicted class;
3. a per-class table (how many of the top 5% / 10% fall in each given class) and the most
   common given → predicted pairs among them;
4. ``suspects.csv`` beside the page, for a relabelling tool or a spreadsheet.

Everything is capped (N suspects, a few supporters each, PNG thumbnails at the examples' own
size), so the page stays small and fast however large the audit.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np

from distributed_influence.report.pictures import load_role_pictures, write_thumbnail
from distributed_influence.store import storage

#: Suspects shown by default (``--review``).
DEFAULT_REVIEW = 100
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
            where = _positions(ids, shard["ids"][rows])
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
    n = len(train["label"])
    heads = "".join(f"<th>in the top {p:.0%} ({top_count(n, p)})</th>" for p in TOP_FRACTIONS)
    rows = "".join(
        f"<tr><td>{c}</td><td>{total}</td>"
        + "".join(f"<td>{k} ({_pct(k, total)} of the class)</td>" for k in counts) + "</tr>"
        for c, total, counts in class_counts(train))
    per_class = f"<table><tr><th>given label</th><th>training examples</th>{heads}</tr>{rows}</table>"
    pair_rows = "".join(
        f"<tr><td>{a} → {b}{'' if a != b else ' (agrees)'}</td>" + "".join(f"<td>{k}</td>" for k in counts) + "</tr>"
        for a, b, counts in pair_counts(train))
    pairs = (f"<table><tr><th>given → predicted</th>{heads}</tr>{pair_rows}</table>")
    return ("<h3>Suspicious labels per class</h3>\n" + per_class
            + "\n<h3>Most common given → predicted pairs among them</h3>\n" + pairs)


def _supporters_text(items: List[Tuple[int, float]], info: Dict[int, tuple]) -> str:
    return ", ".join(f"{tid} (label {info[tid][0]}, #{info[tid][1]}, r = {r:.3g})" for tid, r in items) or "none"


def _thumb(name: str, alt: str, cls: str = "thumb") -> str:
    return f'<img class="{cls}" src="{THUMB_DIR}/{html.escape(name)}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


def _support_html(kind: str, title: str, items, info: Dict[int, tuple], thumbs: Dict[int, str]) -> str:
    """One row of supporters; each captioned with its id, label and own audit rank (a
    supporter that is itself near the top of the ranking is a suspect too), known-bad ones
    outlined."""
    figs = []
    for tid, r in items:
        label, rank, bad = info.get(tid, ("?", "?", False))
        alt = f"train {tid}, label {label}, audit rank {rank}, r = {r:.3g}"
        figs.append(f'<figure class="{"bad" if bad else ""}" data-train-id="{tid}">'
                    f'{_thumb(thumbs[tid], alt, "mini") if tid in thumbs else ""}'
                    f"<figcaption>{tid}<br>label {label} · #{rank}</figcaption></figure>")
    return (f'<div class="support" data-kind="{kind}"><div class="why">{html.escape(title)}</div>'
            f'{"".join(figs) or "none"}</div>')


def _card_html(s: dict, supporters: Optional[dict], info: Dict[int, tuple], thumbs: Dict[int, str]) -> str:
    bad = ' <span class="badge">known bad</span>' if s["known_bad"] else ""
    meta = (f'<div class="meta"><b>#{s["rank"]}</b> · id {s["train_id"]}{bad}<br>'
            f'label <b>{s["label"]}</b>, model says <b>{s["predicted"]}</b><br>'
            f'p(label) = {s["probability"]:.3f}<br>audit score {s["score"]:.3g}</div>')
    parts = [f'<div class="card{" bad" if s["known_bad"] else ""}" data-train-id="{s["train_id"]}" '
             f'data-rank="{s["rank"]}">',
             _thumb(thumbs[s["train_id"]], f'train {s["train_id"]}, label {s["label"]}, predicted {s["predicted"]}'),
             meta]
    if supporters is not None:
        sup = supporters[s["train_id"]]
        parts.append(_support_html("label", f"supports label {s['label']}:", sup["label"], info, thumbs))
        if s["predicted"] != s["label"]:
            parts.append(_support_html("predicted", f"supports class {s['predicted']}:", sup["predicted"],
                                       info, thumbs))
    parts.append("</div>")
    return "".join(parts)


def _row_html(s: dict, supporters: Optional[dict], info: Dict[int, tuple]) -> str:
    cells = [str(s["rank"]), str(s["train_id"]) + (" (known bad)" if s["known_bad"] else ""), str(s["label"]),
             str(s["predicted"]), f"{s['probability']:.3f}", f"{s['score']:.4g}"]
    if supporters is not None:
        sup = supporters[s["train_id"]]
        cells += [_supporters_text(sup["label"], info),
                  _supporters_text(sup["predicted"], info) if s["predicted"] != s["label"] else "(same class)"]
    return f'<tr data-train-id="{s["train_id"]}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def review_section(out_dir: str, report_dir: str, manifest: dict, train: Dict[str, np.ndarray], train_table,
                   n_review: int = DEFAULT_REVIEW, bad_ids: Optional[np.ndarray] = None) -> str:
    """The label-review section's HTML; writes ``suspects.csv`` and the thumbnails beside the page.

    Args:
        out_dir: the audit's output directory (for its train index).
        report_dir: where the page is written.
        manifest: the audit's manifest (sources, input shape).
        train: ``train_scores`` columns as NumPy arrays.
        train_table: the same table (pyarrow), for the CSV.
        n_review: suspects shown.
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
    suspects = [{"train_id": int(train["train_id"][r]), "label": int(train["label"][r]),
                 "predicted": int(train["predicted_class"][r]), "probability": float(train["label_probability"][r]),
                 "score": float(train["audit_score"][r]), "rank": int(train["audit_rank"][r]),
                 "known_bad": bool(is_bad[r])} for r in rows]
    parts.append(
        f"<p>The {len(rows)} training examples with the largest audit score |α<sub>i,y<sub>i</sub></sub>| "
        f"(rank 1 = most suspicious), with the model's class for each and its probability of the given "
        f"label. Beside each: the training examples that support its given label and its predicted class "
        f"most strongly (largest representer value r = α<sub>j,c</sub>(x<sub>j</sub>·x<sub>i</sub>), the "
        f"audit's own scoring with the suspect in the place of a test example); each supporter shows "
        f"its label and its own audit rank: a label supported mostly by other suspects is all the "
        f"more likely wrong. "
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
    shown = [s["train_id"] for s in suspects]
    if supporters:
        shown += [tid for sup in supporters.values() for items in sup.values() for tid, _r in items]
    shown_ids = np.unique(np.array(shown, dtype=np.int64))
    pos = _positions(train["train_id"], shown_ids)
    info = {tid: (int(lab), int(rank), bool(bad)) for tid, lab, rank, bad in
            zip(shown_ids.tolist(), train["label"][pos], train["audit_rank"][pos], is_bad[pos])}
    config = dict(manifest.get("config", {}))
    config["input_shape"] = manifest.get("input_shape") or config.get("input_shape")
    pictures, pic_note = load_role_pictures(config, "train", shown_ids) if len(shown_ids) else (None, None)
    if pictures is not None:
        thumbs = _write_thumbnails(os.path.join(report_dir, THUMB_DIR), pictures)
        parts.append('<div class="gallery">' + "".join(_card_html(s, supporters, info, thumbs) for s in suspects)
                     + "</div>")
    else:
        if pic_note:
            parts.append(f'<p class="note">{html.escape(pic_note)}</p>')
        heads = ["rank", "train id", "label", "predicted", "p(label)", "audit score"]
        if supporters is not None:
            heads += ["supports the label (id, label, audit rank, r)", "supports the predicted class"]
        parts.append('<table class="suspects"><tr>' + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"
                     + "".join(_row_html(s, supporters, info) for s in suspects) + "</table>")
    parts.append(_class_tables_html(train))
    return "\n".join(parts)


def _positions(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each query id in ``keys`` (all present)."""
    order = np.argsort(keys, kind="stable")
    return order[np.searchsorted(keys, query, sorter=order)]


def _write_thumbnails(folder: str, pictures: Dict[int, np.ndarray]) -> Dict[int, str]:
    """One PNG per training id, in a fresh folder (a rerun leaves no stale files)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return {tid: write_thumbnail(os.path.join(folder, f"train_{tid}.png"), pic) for tid, pic in pictures.items()}


REVIEW_STYLE = (
    ".gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(15em,1fr));gap:.6em}"
    ".card{border:1px solid #ccc;padding:.4em;font-size:.85em}.card.bad{border:2px solid #c00;background:#fff3f3}"
    ".badge{background:#c00;color:#fff;padding:0 .3em;border-radius:.2em;font-size:.85em}"
    "img.thumb{width:64px;height:64px;float:left;margin-right:.5em;image-rendering:pixelated}"
    "img.mini{width:36px;height:36px;image-rendering:pixelated}.meta{min-height:64px}"
    ".support{clear:both;margin-top:.3em}.why{font-size:.85em;color:#555}"
    "figure{display:inline-block;margin:0 .3em 0 0;text-align:center;font-size:.7em;border:1px solid transparent}"
    "figure.bad{border-color:#c00}"
)
