"""The report's section "test examples, their proponents and opponents".

A person asking why the model got a test example wrong wants to see the training examples that
pushed it there: for each selected test example (misclassified first), its strongest proponents
and opponents from ``influence_topk``, drawn beside it when the sources hold images, or listed
with their ids and representer values otherwise.

Only the selected test examples' rows of ``influence_topk`` are read, and only the pictures of
the examples drawn, so the section costs the same for any size of audit.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Dict, List, Optional

import numpy as np

from distributed_influence.report.gallery import positions
from distributed_influence.report.pictures import load_pictures, new_figure, save_figure

#: Proponents (and opponents) drawn per test example; the Parquet table holds all k of them.
MAX_SHOWN = 8


@dataclasses.dataclass
class Neighbour:
    """One proponent or opponent of a test example, as shown on the page."""

    kind: str
    rank: int
    train_id: int
    label: Optional[int]
    value: float


@dataclasses.dataclass
class Example:
    """A test example with its strongest proponents and opponents."""

    test_id: int
    label: Optional[int]
    predicted: int
    neighbours: List[Neighbour]

    @property
    def misclassified(self) -> bool:
        """Whether the label is known and the model predicted another class."""
        return self.label is not None and self.label != self.predicted


def misclassified(test: Dict[str, np.ndarray]) -> np.ndarray:
    """Per test row, whether its label is known and differs from the model's prediction.

    The one definition of a wrong test prediction on the page: the examples shown first here
    and the count in the section on the training examples behind the test errors.
    """
    return test["label_known"] & (test["label"] != test["predicted_class"])


def select_examples(test: Dict[str, np.ndarray], n: int) -> np.ndarray:
    """Rows of the test table to show: misclassified ones first (what a person wants explained).

    Within each group the table's order is kept.
    """
    wrong = misclassified(test)
    return np.concatenate([np.flatnonzero(wrong), np.flatnonzero(~wrong)])[:n]


def _label_text(label: Optional[int]) -> str:
    """A label for display; '?' for a test example whose label is unknown."""
    return "?" if label is None else str(label)


def _show(ax, picture: Optional[np.ndarray], title: str, color: str = "black") -> None:
    """One panel; a picture missing from the source leaves the panel blank but keeps its title."""
    if picture is not None:
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
    ax.set_title(title, fontsize=7, color=color)


def draw_example(path: str, ex: Example, train_pics: Dict[int, np.ndarray],
                 test_pic: Optional[np.ndarray]) -> str:
    """Draws the test image (left) beside its proponents (top row) and opponents (bottom row)."""
    rows = [[n for n in ex.neighbours if n.kind == kind] for kind in ("proponent", "opponent")]
    ncols = 1 + max(1, max(len(r) for r in rows))
    fig = new_figure(1.5 * ncols, 4.2)
    axes = fig.subplots(2, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    _show(axes[0, 0], test_pic, f"test {ex.test_id}\nlabel {_label_text(ex.label)}, pred {ex.predicted}",
          "tab:red" if ex.misclassified else "black")
    axes[1, 0].text(0.5, 0.5, "top: proponents\nbottom: opponents", ha="center", va="center", fontsize=8)
    for r, neighbours in enumerate(rows):
        for c, n in enumerate(neighbours, start=1):
            _show(axes[r, c], train_pics.get(n.train_id),
                  f"{n.kind} {n.rank}\nid {n.train_id}, label {_label_text(n.label)}\nr = {n.value:.3g}")
    return save_figure(fig, path)


def _examples(test: Dict[str, np.ndarray], train: Dict[str, np.ndarray], topk_table,
              rows: np.ndarray) -> List[Example]:
    """The selected test examples with their neighbours, reading only their top-k rows."""
    test_ids = [int(t) for t in test["test_id"][rows]]
    if not test_ids:
        return []
    import pyarrow as pa
    import pyarrow.compute as pc

    table = topk_table.filter(pc.is_in(topk_table.column("test_id"), value_set=pa.array(test_ids, pa.int64())))
    topk = {name: table.column(name).to_numpy() for name in ("test_id", "kind", "rank", "train_id",
                                                             "representer_value")}
    # A training id missing from train_scores (not in an audit's own output) gets no label.
    at = positions(train["train_id"], topk["train_id"]).tolist()
    train_labels = [int(train["label"][p]) if p >= 0 else None for p in at]
    examples = []
    for row, t in zip(rows, test_ids):
        mine = np.flatnonzero((topk["test_id"] == t) & (topk["rank"] <= MAX_SHOWN))
        mine = mine[np.lexsort((topk["rank"][mine], topk["kind"][mine] != "proponent"))]
        neighbours = [Neighbour(str(topk["kind"][r]), int(topk["rank"][r]), int(topk["train_id"][r]),
                                train_labels[r], float(topk["representer_value"][r])) for r in mine]
        label = int(test["label"][row]) if test["label_known"][row] else None
        examples.append(Example(t, label, int(test["predicted_class"][row]), neighbours))
    return examples


def _neighbour_table(ex: Example) -> str:
    """The neighbours of a test example as text, for sources that are not pictures."""
    rows = "".join(
        f"<tr><td>{html.escape(n.kind)}</td><td>{n.rank}</td><td>{n.train_id}</td>"
        f"<td>{html.escape(_label_text(n.label))}</td><td>{n.value:.6g}</td></tr>"
        for n in ex.neighbours)
    return ("<table><tr><th>kind</th><th>rank</th><th>train id</th><th>label</th>"
            f"<th>representer value</th></tr>{rows}</table>")


def _example_html(ex: Example, figure: Optional[str]) -> str:
    """A heading saying whether the model was right, then the figure or the table."""
    state = "misclassified" if ex.misclassified else "correct" if ex.label is not None else "label unknown"
    head = (f"<h3>test {ex.test_id}: label {html.escape(_label_text(ex.label))}, "
            f"predicted {ex.predicted} ({state})</h3>")
    if figure is not None:
        alt = f"test {ex.test_id} with its proponents and opponents"
        return head + f'<img src="{html.escape(figure)}" alt="{html.escape(alt)}">'
    return head + _neighbour_table(ex)


def examples_section(manifest: dict, train: Dict[str, np.ndarray], test: Dict[str, np.ndarray], topk_table,
                     report_dir: str, n_examples: int) -> str:
    """Each selected test example as a figure, or as a table when there are no pictures.

    Args:
        manifest: the audit's manifest (its sources and the model's input shape).
        train: ``train_scores`` columns as NumPy arrays (ids and labels of the neighbours).
        test: ``test_scores`` columns as NumPy arrays, with ``label_known``.
        topk_table: the ``influence_topk`` table (pyarrow).
        report_dir: where the page and its figures are written.
        n_examples: test examples shown.
    """
    examples = _examples(test, train, topk_table, select_examples(test, n_examples))
    config = dict(manifest.get("config", {}))
    # The resolved model input shape (flat Parquet rows need it to become pictures again).
    config["input_shape"] = manifest.get("input_shape") or config.get("input_shape")
    pictures, note = load_pictures(config,
                                   np.array([n.train_id for e in examples for n in e.neighbours], dtype=np.int64),
                                   np.array([e.test_id for e in examples], dtype=np.int64))
    parts = ["<h2>Test examples, their proponents and opponents</h2>",
             "<p>Misclassified test examples first; r is the representer value of a training "
             "example for the predicted class.</p>"]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for ex in examples:
        figure = None
        if pictures is not None:
            figure = draw_example(os.path.join(report_dir, f"example_{ex.test_id}.png"), ex,
                                  pictures["train"], pictures["test"].get(ex.test_id))
        parts.append(_example_html(ex, figure))
    return "\n".join(parts)
