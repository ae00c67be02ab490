"""The report's section "training examples behind the test errors".

``train_scores.error_influence`` is each training example's total push toward the classes the
model wrongly predicts on the test set (see docs/outputs.md). The section lists the largest
values: the training examples a user would fix or remove first to win test accuracy back, with
their given label, the model's class and their place in the label audit, so that a wrong label
behind many errors stands out next to an example that is simply typical of a confused class.
"""

from __future__ import annotations

import html

import numpy as np

#: Rows listed: the head of the distribution is what a person acts on.
ERROR_ROWS = 20
COLUMN = "error_influence"


def top_error_rows(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest positive values, largest first, ties to the earlier row;
    NaN (null) rows never count."""
    values = np.where(np.isnan(values), -np.inf, values)
    order = np.argsort(-values, kind="stable")
    return order[:max(0, min(n, int(np.sum(values > 0))))]


def errors_section(train_table, wrong_test_rows=None, n_rows: int = ERROR_ROWS) -> str:
    """The section's HTML from the ``train_scores`` table (pyarrow).

    Args:
        train_table: the audit's ``train_scores``.
        wrong_test_rows: how many test predictions are wrong, when known (for the heading).
        n_rows: rows listed.

    Returns:
        HTML: a table of the largest ``error_influence`` values, or a note saying why there is
        none (an output written before the column existed, a test set without labels, or no
        wrong prediction).
    """
    head = "<h2>Training examples behind the test errors</h2>\n"
    if COLUMN not in train_table.column_names:
        return head + "<p>This audit has no <code>error_influence</code> column (written by an earlier version).</p>"
    col = train_table.column(COLUMN)
    if col.null_count == train_table.num_rows:
        return head + ("<p><code>error_influence</code> is null: the test set has no labels, so no test "
                       "prediction is known to be wrong.</p>")
    values = col.to_numpy(zero_copy_only=False).astype(np.float64)
    rows = top_error_rows(values, n_rows)
    if len(rows) == 0:
        return head + "<p>No training example pushes toward a wrong test prediction.</p>"
    cols = {name: train_table.column(name).to_numpy(zero_copy_only=False)
            for name in ("train_id", "label", "predicted_class", "audit_rank")}
    total = float(np.sum(values[values > 0]))
    body = "".join(
        f"<tr><td>{int(cols['train_id'][i])}</td><td>{int(cols['label'][i])}</td>"
        f"<td>{int(cols['predicted_class'][i])}</td><td>{values[i]:.6g}</td>"
        f"<td>{100 * values[i] / total:.2f}%</td><td>{int(cols['audit_rank'][i])}</td></tr>"
        for i in rows)
    errors = "" if wrong_test_rows is None else f" over the {int(wrong_test_rows)} wrongly predicted test examples"
    intro = (f"<p>The training examples whose representer values push hardest toward the wrong test "
             f"predictions (Σ of r over the test examples the model gets wrong{html.escape(errors)}, "
             f"each at its predicted class). A high audit rank beside a large value marks a likely "
             f"wrong label that costs test accuracy.</p>")
    return (head + intro + "<table><tr><th>train id</th><th>given label</th><th>model's class</th>"
            "<th>error_influence</th><th>share of the positive total</th><th>audit rank</th></tr>"
            + body + "</table>")
