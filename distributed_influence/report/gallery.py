"""The label review's interactive gallery: its data file, its script and its place on the page.

The review page must work from ``file://``, with no server and no network, for any number of
suspects. Hence three choices:

* The suspects, their supporters and the class list are written beside the page as
  ``review-data.js``, one JSON document assigned to ``window.REVIEW_DATA``. Chromium refuses
  ``fetch()`` and XHR of ``file://`` URLs but runs a ``<script src>`` from the same folder, so
  the JSON travels as a script and not as a bare ``.json`` file. The JSON is the second of the
  file's three lines, so a tool can read it without a JavaScript parser
  (:func:`read_review_data`).
* The scripts (:data:`SCRIPTS`) and ``review.css`` ship in this package's ``static/`` folder.
  The scripts are copied beside the page and draw one page of suspects at a time, so only that
  page's thumbnails are in the DOM, each ``loading="lazy"``. The style is inlined in the page.
* Decisions stay in the browser's ``localStorage``, under the audit's run key so that the
  reports of two audits never mix, and leave it only as ``decisions.csv``, a download the
  script builds itself. Nothing is sent anywhere.

Ids are written as strings of their decimal digits: they are int64 (hashed ids fill all 64
bits), and a JavaScript number holds integers exactly only up to 2^53, so a JSON number would
come back as another id in the browser, and in ``decisions.csv``. The script never turns an id
into a number. Labels are integers, but keys are strings chosen by whoever made the data set
(file names, a string ``id`` column). They reach the page only through the JSON file. There ``<``, ``>`` and
``&`` are escaped as well, so the file stays inert even if someone pastes it into a page. The
script then inserts every value with ``textContent`` or ``setAttribute``, never as HTML.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from importlib import resources
from typing import Dict, List, Optional

import numpy as np

DATA_JS = "review-data.js"
SCRIPT_JS = "review.js"
#: The review's scripts, in the order the page loads them: ``review-store.js`` (the decisions:
#: storage, checks, CSV) defines what ``review.js`` (the gallery and its controls) uses.
SCRIPTS = ("review-store.js", SCRIPT_JS)
DATA_GLOBAL = "REVIEW_DATA"
#: Version of the data file's layout, for the script and for tools that read it. 2: ids are
#: strings (1 wrote them as JSON numbers, which lose ids beyond 2^53 in a browser).
DATA_FORMAT = 2
#: Significant digits kept for probabilities, scores and representer values: enough to sort
#: and show them, without tripling the data file with float64 noise.
DIGITS = 4
#: Keys of the page, as documented on it: (keys, what they do).
KEYS = (
    ("k", "keep the given label"),
    ("r", "relabel to the model's class"),
    ("o", "relabel to another class: pick it (type its number or use the arrows), then Enter; Esc cancels"),
    ("x", "remove the example"),
    ("u", "not sure"),
    ("Backspace", "forget the decision"),
    ("→ or l / ← or j", "next / previous suspect"),
    ("n / p", "next / previous page"),
)
_JS_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}


def static_text(name: str) -> str:
    """A file of the package's ``static/`` folder (the review's script and style)."""
    return resources.files("distributed_influence.report").joinpath("static", name).read_text(encoding="utf-8")


def _num(value) -> Optional[float]:
    """A float rounded to :data:`DIGITS` significant digits; None for NaN or infinity (JSON has
    neither, and the script sorts None last)."""
    value = float(value)
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else None


def _keys(train_table, rows: np.ndarray) -> Optional[List[Optional[str]]]:
    """The ``train_key`` of the given table rows, or None when the source has no keys."""
    if train_table is None or "train_key" not in train_table.column_names:
        return None
    import pyarrow as pa

    return train_table.column("train_key").take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()


def positions(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each query id in ``keys``, or -1 for an id that is not there.

    A sorted lookup rather than a dict: ``keys`` may be every training id of a large audit,
    and two arrays cost far less than a dict of Python ints. The report's modules share it.
    """
    keys, query = np.asarray(keys), np.asarray(query)
    if len(keys) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    at = order[np.minimum(np.searchsorted(keys, query, sorter=order), len(keys) - 1)]
    return np.where(keys[at] == query, at, -1)


def review_data(manifest: dict, train: Dict[str, np.ndarray], train_table, rows: np.ndarray, is_bad: np.ndarray,
                supporters: Optional[dict], known_bad: bool, images: bool, thumb_dir: str) -> dict:
    """What the review script needs, as one JSON-ready dict.

    Args:
        manifest: the audit's manifest (run key, number of classes).
        train: ``train_scores`` columns as NumPy arrays.
        train_table: the same table (pyarrow), for ``train_key``.
        rows: table rows of the suspects, most suspicious first.
        is_bad: per table row, whether the label is known to be wrong.
        supporters: ``{train_id: {"label": [(id, r), ...], "predicted": [...]}}`` from
            :func:`~distributed_influence.report.review.find_supporters`, or None when the
            index could not be read.
        known_bad: whether known-bad ids were given (the page then offers the filter).
        images: whether thumbnails were written (``thumb_dir/train_<id>.png`` for every suspect
            and supporter); otherwise the page shows a table.
        thumb_dir: the thumbnails' folder, relative to the page.

    Returns:
        ``{"format", "run_key", "n_classes", "n_train", "has_keys", "known_bad", "thumbs",
        "suspects": [{"id", "rank", "label", "pred", "p", ["pp"], "score", "bad", ["key"], ["sup"]}],
        "examples": {id: [label, audit rank, known bad, key]}}``; ``examples`` describes every
        supporter, so that the page can caption it. Every id, in ``suspects``, ``sup`` and
        ``examples``, is the string of its decimal digits (see the module's docstring).
    """
    rows = np.asarray(rows, dtype=np.int64)
    keys = _keys(train_table, rows)
    suspects, sup_ids = [], set()
    for i, r in enumerate(rows.tolist()):
        tid = int(train["train_id"][r])
        rec = {"id": str(tid), "rank": int(train["audit_rank"][r]), "label": int(train["label"][r]),
               "pred": int(train["predicted_class"][r]), "p": _num(train["label_probability"][r]),
               "score": _num(train["audit_score"][r]), "bad": bool(is_bad[r])}
        if "predicted_probability" in train:  # absent from the results of earlier versions
            rec["pp"] = _num(train["predicted_probability"][r])
        if keys is not None:
            rec["key"] = keys[i]
        if supporters is not None:
            sup = supporters[tid]
            rec["sup"] = {"label": [[str(int(j)), _num(v)] for j, v in sup["label"]],
                          "pred": [[str(int(j)), _num(v)] for j, v in sup["predicted"]]}
            sup_ids.update(int(j) for kind in sup.values() for j, _v in kind)
        suspects.append(rec)
    ids = sorted(sup_ids)
    pos = positions(train["train_id"], np.array(ids, dtype=np.int64))
    sup_keys = _keys(train_table, pos) or [None] * len(ids)
    examples = {str(j): [int(train["label"][p]), int(train["audit_rank"][p]), bool(is_bad[p]), k]
                for j, p, k in zip(ids, pos.tolist(), sup_keys)}
    n_classes = manifest.get("n_classes")
    if not n_classes:  # an older manifest: the classes seen are all the picker can offer
        n_classes = int(max(np.max(train["label"], initial=0), np.max(train["predicted_class"], initial=0))) + 1
    return {"format": DATA_FORMAT, "run_key": manifest.get("run_key"), "n_classes": int(n_classes),
            "n_train": int(len(train["train_id"])), "has_keys": keys is not None, "known_bad": bool(known_bad),
            "thumbs": thumb_dir if images else None, "suspects": suspects, "examples": examples}


def data_script(data: dict) -> str:
    """``review-data.js``: the JSON on its own line, between an assignment and a semicolon.

    ``ensure_ascii`` escapes every non-ASCII character, the JavaScript line separators U+2028
    and U+2029 among them, so the JSON stays on one line. ``<``, ``>`` and ``&`` can only
    occur inside JSON strings, so escaping them as ``\\u003c`` etc. changes no value.
    """
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    text = re.sub("[<>&]", lambda m: _JS_ESCAPES[m.group()], text)
    return f"window.{DATA_GLOBAL} =\n{text}\n;\n"


def read_review_data(path: str) -> dict:
    """Reads a ``review-data.js`` back as the dict :func:`review_data` built.

    Raises:
        ValueError: the file is not laid out as :func:`data_script` writes it.
    """
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if len(lines) < 3 or lines[0] != f"window.{DATA_GLOBAL} =" or lines[2] != ";":
        raise ValueError(f"{path}: not a review data file")
    return json.loads(lines[1])


def write_review_files(report_dir: str, data: dict) -> None:
    """Writes ``review-data.js`` and every review script (:data:`SCRIPTS`) beside the page."""
    with open(os.path.join(report_dir, DATA_JS), "w", encoding="ascii") as fh:
        fh.write(data_script(data))
    for name in SCRIPTS:
        with open(os.path.join(report_dir, name), "w", encoding="utf-8") as fh:
            fh.write(static_text(name))


def _select(ident: str, label: str, options=(("", "all"),)) -> str:
    """A labelled ``<select>`` of the review's bar; the script fills the class lists and reads it.

    Only the first option (``all``) or fixed choices are written here, so the HTML holds no data.
    """
    opts = "".join(f'<option value="{html.escape(v)}">{html.escape(t)}</option>' for v, t in options)
    return f'<label>{html.escape(label)} <select id="{ident}">{opts}</select></label>'


def gallery_html(data: dict) -> str:
    """The review's controls, an empty gallery that the script fills, the keys, and the scripts.

    Nothing from the data is written here: the script fills the class lists and the gallery
    from ``review-data.js``, so this HTML is the same for every audit but for the mode.
    """
    mode = "gallery" if data["thumbs"] else "table"
    known_bad = ('<label><input type="checkbox" id="rv-bad"> known-bad only</label>' if data["known_bad"] else "")
    keys = "".join(f"<tr><td><kbd>{html.escape(k)}</kbd></td><td>{html.escape(v)}</td></tr>" for k, v in KEYS)
    return "\n".join([
        f'<div id="review" class="review" data-mode="{mode}">',
        '<div class="rv-bar">' + _select("rv-given", "given label") + _select("rv-pred", "model's class")
        + _select("rv-pair", "given → model") + known_bad
        + '<label><input type="checkbox" id="rv-undecided"> undecided only</label>'
        + _select("rv-sort", "sort by", (("rank", "audit rank"), ("p", "label probability, lowest first"),
                                         ("-p", "label probability, highest first")))
        + _select("rv-size", "per page", tuple((str(n), str(n)) for n in (24, 48, 96, 192)))
        + '<button type="button" id="rv-clear">clear filters</button></div>',
        '<div class="rv-bar"><span id="rv-progress" aria-live="polite"></span>'
        '<button type="button" id="rv-export">export decisions.csv</button>'
        '<button type="button" id="rv-forget">forget all decisions</button>'
        '<span id="rv-store-note" class="note" hidden></span></div>',
        '<details id="rv-matrix-box" open><summary>Given label × model\'s class among these suspects '
        "(click a cell to show its suspects)</summary><div id=\"rv-matrix\"></div></details>",
        '<div class="rv-bar rv-pager"><button type="button" id="rv-prev">← previous page</button>'
        '<span id="rv-page"></span><button type="button" id="rv-next">next page →</button></div>',
        f'<div id="rv-items" class="{mode}">The suspects are drawn by {" and ".join(SCRIPTS)} from {DATA_JS}, '
        "all beside this page; if this text stays, they did not load or JavaScript is off (suspects.csv lists "
        "the same examples).</div>",
        '<details class="rv-keys" open><summary>Keys</summary><p>Each decision moves on to the next suspect. '
        "Decisions are kept in this browser for this audit (reloading the page loses nothing) until "
        "exported as decisions.csv: train_id, label, action (keep, relabel, remove, unsure), new_label"
        + (", train_key" if data["has_keys"] else "") + f", decided_at.</p><table>{keys}</table></details>",
        "</div>",
        f'<script src="{DATA_JS}"></script>',
    ] + [f'<script src="{name}"></script>' for name in SCRIPTS])
