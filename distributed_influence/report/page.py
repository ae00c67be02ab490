"""``distributed-influence report OUT``: a self-contained HTML page that shows what an audit found.

The Parquet tables are the contract; this page is for a person who wants to look at them.
Below a summary of the audit (sizes, head fit, fidelity, decomposition error) it shows:

1. the label audit: what checking the training labels in ``audit_rank`` order finds;
2. the label review (:mod:`distributed_influence.report.review`): the most suspicious training
   examples with the examples that support their label and their predicted class, per-class
   counts, and ``suspects.csv``;
3. the training examples behind the test errors (:mod:`distributed_influence.report.errors`):
   the largest ``error_influence`` values;
4. selected test examples (misclassified first) beside their strongest proponents and opponents
   (:mod:`distributed_influence.report.neighbours`);
5. histograms of ``alpha_label`` (train) and ``decomposition_error`` (test).

The tables are read with :func:`distributed_influence.store.results.load_results`, like any user would.

Pictures come from the audit's own sources (named in ``manifest.json``) when their examples are
images; otherwise, or when a source can no longer be opened, the page lists ids and values, so a
report never fails just because the data moved. Figures are drawn with Matplotlib's object API
on the Agg canvas (:func:`~distributed_influence.report.pictures.new_figure`): nothing needs a
display and no global pyplot state is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from distributed_influence.errors import ConfigError, InputError
from distributed_influence.report.errors import errors_section
from distributed_influence.report.neighbours import examples_section, misclassified
from distributed_influence.report.pictures import new_figure, save_figure
from distributed_influence.report.review import DEFAULT_REVIEW, REVIEW_STYLE, review_section
from distributed_influence.report.summary import flagged_fractions
from distributed_influence.store import storage
from distributed_influence.store.tables import TRAIN_SCORES

REPORT_DIR = "report"
INDEX = "index.html"


# ------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass
class AuditOutput:
    """The parts of an audit's output directory that the report reads."""

    manifest: dict
    train: Dict[str, np.ndarray]
    test: Dict[str, np.ndarray]
    topk: object  # the influence_topk table (pyarrow)
    train_table: object  # the train_scores table (pyarrow)


def _columns(table, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Named columns as NumPy arrays (those the table has); a nullable ``label`` gets a
    ``label_known`` mask.

    Unknown test labels are null in the contract, so they are kept apart instead of letting
    NumPy turn them into NaN floats that compare unequal to every class.
    """
    out = {}
    for name in names:
        if name not in table.column_names:
            continue
        col = table.column(name)
        if name == "label":
            out["label_known"] = col.is_valid().to_numpy(zero_copy_only=False)
            col = col.fill_null(-1)
        out[name] = col.to_numpy()
    return out


def load_output(out_dir: str) -> AuditOutput:
    """Opens an audit's output directory through :func:`load_results`.

    Raises:
        InputError: the directory, a table or the manifest is missing or unreadable.
    """
    from distributed_influence.store.results import load_results

    if not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: output directory not found")
    try:
        res = load_results(out_dir)
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError, json ValueError on bad files
        raise InputError(f"{out_dir}: unreadable results ({storage.reason(exc)})") from None
    if res.train_scores is None:
        raise InputError(f"{os.path.join(out_dir, TRAIN_SCORES)}: not found (is this the --out of an audit, "
                         f"not of explain?)")
    train = _columns(res.train_scores, ("train_id", "label", "alpha_label", "audit_score", "audit_rank",
                                        "predicted_class", "label_probability", "predicted_probability"))
    test = _columns(res.test_scores, ("test_id", "label", "predicted_class", "decomposition_error"))
    return AuditOutput(res.manifest, train, test, res.influence_topk, res.train_scores)


def read_known_bad(path: str) -> np.ndarray:
    """Reads the ids of labels known to be wrong: integers separated by whitespace.

    Raises:
        InputError: the file is missing, holds something that is not an integer, or no id.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            tokens = fh.read().split()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the known-bad ids ({exc})") from None
    try:
        ids = np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as exc:
        raise InputError(f"{path}: known-bad ids must be integers ({exc})") from None
    if len(ids) == 0:
        raise InputError(f"{path}: no known-bad ids in the file")
    return ids


# --------------------------------------------------------------------------------- figures


def audit_curve(audit_rank: np.ndarray, weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Cumulative share of ``weights`` found when the training set is checked by ``audit_rank``.

    Args:
        audit_rank: rank of every training example (1 = checked first).
        weights: what checking an example finds (1 for a known-bad label, or its audit score).

    Returns:
        (fraction of the training set checked, share of the total weight found), both
        starting at 0 so the curve begins at the origin.
    """
    order = np.argsort(audit_rank, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64)[order])])
    total = found[-1]
    checked = np.arange(len(order) + 1) / max(1, len(order))
    return checked, found / total if total > 0 else found


def draw_audit_curve(path: str, train: Dict[str, np.ndarray], is_bad: Optional[np.ndarray]) -> str:
    """Draws what checking labels in ``audit_rank`` order finds.

    Without known-bad ids the curve is the share of the total audit score |α_{i,y_i}| covered,
    which shows how concentrated the suspicion is; with them, the share of known-bad labels
    found, against the diagonal that checking in random order would give.
    """
    fig = new_figure(5.0, 4.0)
    ax = fig.subplots()
    ax.plot(*audit_curve(train["audit_rank"], train["audit_score"]),
            label="share of total audit score")
    if is_bad is not None:
        ax.plot(*audit_curve(train["audit_rank"], is_bad), label="known-bad labels found")
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="random checking")
    ax.set_xlabel("fraction of training set checked (audit_rank order)")
    ax.set_ylabel("fraction found")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Label audit")
    return save_figure(fig, path)


def draw_histogram(path: str, values: np.ndarray, title: str, xlabel: str) -> str:
    """Histogram of the finite values (non-finite ones are counted in the title)."""
    finite = values[np.isfinite(values)]
    dropped = len(values) - len(finite)
    fig = new_figure(5.0, 3.5)
    ax = fig.subplots()
    ax.hist(finite, bins=40)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title + (f" ({dropped} non-finite left out)" if dropped else ""))
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------- pages


def _get(d: dict, *keys):
    """d[k1][k2]..., or None: a manifest from another version may lack a field."""
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _fmt(value, spec: str = "") -> str:
    """Formats a manifest value, showing 'n/a' or the raw value rather than failing."""
    if value is None:
        return "n/a"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _summary_html(manifest: dict) -> str:
    """The numbers that say whether the audit can be trusted, from the manifest."""
    rows = [
        ("training examples", _fmt(manifest.get("n_train"))),
        ("test examples", _fmt(manifest.get("n_test"))),
        ("classes", _fmt(manifest.get("n_classes"))),
        ("λ, head target", f"{_fmt(manifest.get('lambda'), 'g')}, {_fmt(manifest.get('target'))}"),
        ("head fit max |∇J|", _fmt(_get(manifest, "head_fit", "max_abs_grad"), ".2e")),
        ("head fit iterations", _fmt(_get(manifest, "head_fit", "iterations"))),
        ("fidelity (Pearson, surrogate vs model logits)",
         f"train {_fmt(_get(manifest, 'fidelity', 'train', 'pearson'), '.4f')}, "
         f"test {_fmt(_get(manifest, 'fidelity', 'test', 'pearson'), '.4f')}"),
        ("max decomposition error |Σ r − z|", _fmt(_get(manifest, "decomposition", "max_error"), ".2e")),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _known_bad_html(path: str, train: Dict[str, np.ndarray], bad_ids: np.ndarray, is_bad: np.ndarray) -> str:
    """How many known-bad labels the first 5, 10 and 20 % of ``audit_rank`` hold (as the demo says)."""
    found = flagged_fractions(train["audit_rank"], train["train_id"], bad_ids)
    items = "".join(f"<li>{p:.0%} checked: {v:.0%} of them found</li>" for p, v in found.items())
    missing = len(np.unique(bad_ids)) - int(is_bad.sum())
    note = f" ({missing} of the ids are not training ids and are left out)" if missing else ""
    return (f"<p>Known-bad labels from {html.escape(path)}: {int(is_bad.sum())} in the training set"
            f"{html.escape(note)}.</p><ul>{items}</ul>")


_STYLE = ("body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .5em;"
          "text-align:left}img{max-width:100%}.note{background:#fff4d6;padding:.5em}" + REVIEW_STYLE)


def _page(title: str, sections: List[str]) -> str:
    """A self-contained page: inline style, figures linked relative to the page."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _audit_section(output: AuditOutput, report_dir: str, known_bad: Optional[str],
                   bad_ids: Optional[np.ndarray]) -> str:
    """The audit curve, and with known-bad ids how many of them the top of the ranking holds."""
    train = output.train
    is_bad = None if bad_ids is None else np.isin(train["train_id"], bad_ids)
    figure = draw_audit_curve(os.path.join(report_dir, "audit_curve.png"), train, is_bad)
    parts = ["<h2>Label audit</h2>",
             "<p>Training labels checked in <code>audit_rank</code> order (most suspicious first).</p>",
             f'<img src="{html.escape(figure)}" alt="label audit curve">']
    if bad_ids is not None:
        parts.append(_known_bad_html(known_bad, train, bad_ids, is_bad))
    return "\n".join(parts)


def _distributions_section(output: AuditOutput, report_dir: str) -> str:
    """Histograms that show outlying α values and whether the decomposition held everywhere."""
    alpha = draw_histogram(os.path.join(report_dir, "alpha_label.png"), output.train["alpha_label"],
                           "alpha_label (training examples)", r"$\alpha_{i,y_i}$")
    error = draw_histogram(os.path.join(report_dir, "decomposition_error.png"),
                           output.test["decomposition_error"], "decomposition_error (test examples)",
                           r"$|\sum_i r_i(t) - z_t|$")
    return ("<h2>Distributions</h2>\n"
            f'<img src="{html.escape(alpha)}" alt="histogram of alpha_label">\n'
            f'<img src="{html.escape(error)}" alt="histogram of decomposition_error">')


def write_report(out_dir: str, known_bad: Optional[str] = None, n_examples: int = 8,
                 n_review: int = DEFAULT_REVIEW) -> str:
    """Writes ``out_dir/report/index.html``, its PNG figures and thumbnails, and ``suspects.csv``.

    The sections: the audit's summary, the label-audit curve, the label review (the interactive
    gallery), the training examples behind the test errors, test examples with their
    proponents and opponents, and the distributions.

    Args:
        out_dir: the ``--out`` directory of an audit.
        known_bad: optional file of training ids whose labels are known to be wrong.
        n_examples: test examples shown with their proponents and opponents.
        n_review: most suspicious training examples shown in the label review.

    Returns:
        The path of ``index.html``.

    Raises:
        InputError: a missing or unreadable output directory, table, manifest or known-bad file.
    """
    if n_examples < 0:
        raise ConfigError(f"--examples must be >= 0, got {n_examples}")
    if n_review < 0:
        raise ConfigError(f"--review must be >= 0, got {n_review}")
    output = load_output(out_dir)
    bad_ids = None if known_bad is None else read_known_bad(known_bad)
    report_dir = os.path.join(out_dir, REPORT_DIR)
    os.makedirs(report_dir, exist_ok=True)
    sections = [_summary_html(output.manifest)]
    sections.append(_audit_section(output, report_dir, known_bad, bad_ids))
    sections.append(review_section(out_dir, report_dir, output.manifest, output.train, output.train_table,
                                   n_review, bad_ids))
    sections.append(errors_section(output.train_table, int(np.sum(misclassified(output.test)))))
    sections.append(examples_section(output.manifest, output.train, output.test, output.topk, report_dir,
                                     n_examples))
    sections.append(_distributions_section(output, report_dir))
    path = os.path.join(report_dir, INDEX)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_page("Influence report", sections))
    return path


# --------------------------------------------------------------------------- command line


def cmd_report(args: argparse.Namespace) -> int:
    """Writes the report and prints where it is."""
    print(write_report(args.out, known_bad=args.known_bad, n_examples=args.examples, n_review=args.review))
    return 0


def add_parser(sub) -> None:
    """Registers ``report`` on the subparsers of the main command."""
    p = sub.add_parser("report", help="write an HTML report with figures of an audit's results",
                       description="Write OUT/report/index.html with PNG figures: the label-audit curve, "
                                   "the most suspicious training labels (gallery or table, with the "
                                   "examples that support their label and their predicted class, "
                                   "per-class counts, suspects.csv), the training examples behind the "
                                   "test errors, test examples beside their proponents and opponents, "
                                   "and histograms of alpha_label and decomposition_error.")
    p.add_argument("out", help="the --out directory of an audit")
    p.add_argument("--known-bad", metavar="FILE", default=None,
                   help="file of training ids whose labels are known to be wrong (integers separated "
                        "by whitespace); the audit curve then shows how many of them are found")
    p.add_argument("--examples", metavar="N", type=int, default=8,
                   help="test examples shown with their proponents and opponents (default 8)")
    p.add_argument("--review", metavar="N", type=int, default=DEFAULT_REVIEW,
                   help=f"most suspicious training examples shown for label review (default {DEFAULT_REVIEW})")
    p.set_defaults(func=cmd_report)
