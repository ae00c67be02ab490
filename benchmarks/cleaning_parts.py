"""The pieces of ``benchmarks/cleaning.py``: label noise between look-alike classes, training with a
per-epoch test curve, the ``apply-review`` step, and the figures that judge a cleaning.

Why a separate module: the benchmark's script keeps the order of the experiment and its report;
what is here is each step on its own, small enough to check by reading.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from common import build_cnn

#: Rows per batch of the per-epoch test evaluation (inference only, so larger than training's).
EVAL_BATCH = 1024

# ------------------------------------------------------------------------------ the noise


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class), rows the true class."""
    conf = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(conf, (y_true, y_pred), 1)
    return conf


def most_confusable(conf: np.ndarray) -> np.ndarray:
    """For each class, the class a model trained on true labels mistakes it for most often.

    Real label errors are between look-alike classes; a model's errors on held-out data say
    which classes look alike without a hand-written list. A class the model never gets wrong
    takes the class most often mistaken for it (the column), else the next class number.

    Returns:
        (C,) int64: the flip target of every class, never the class itself.
    """
    off = conf.astype(np.float64).copy()
    np.fill_diagonal(off, -1.0)
    target = off.argmax(axis=1)
    for c in range(len(conf)):
        if off[c].max() <= 0:
            col = off[:, c].copy()
            target[c] = int(col.argmax()) if col.max() > 0 else (c + 1) % len(conf)
    return target.astype(np.int64)


def confusable_pairs(conf: np.ndarray) -> np.ndarray:
    """Classes paired by how often a true-label model mistakes one for the other, each pair
    flipped into each other: the "pair flip" noise of the label-noise literature.

    The most confusable class of :func:`most_confusable` is many-to-one on Fashion-MNIST (T-shirt,
    pullover, coat and bag all go to shirt, which then holds more wrong labels than right ones).
    Pairs keep every class's labels mostly right. Greedy on the symmetric counts conf + confᵀ:
    the most confused pair first, then the most confused pair of the classes left.

    Returns:
        (C,) int64: the flip target of every class (its partner; with an odd C, the last class
        left goes to its most confusable class).
    """
    both = (conf + conf.T).astype(np.float64)
    np.fill_diagonal(both, -1.0)
    target = np.full(len(conf), -1, np.int64)
    left = set(range(len(conf)))
    while len(left) > 1:
        a, b = max(((i, j) for i in left for j in left if i < j), key=lambda p: (both[p], -p[0], -p[1]))
        target[a], target[b] = b, a
        left -= {a, b}
    for c in left:
        target[c] = most_confusable(conf)[c]
    return target


def flip_labels(y: np.ndarray, target: np.ndarray, rate: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Flips ``rate`` of each class's labels to that class's most confusable class.

    Per class rather than over the whole set, so that every class loses the same share and the
    flip count is exact.

    Returns:
        (noisy labels, boolean mask of the flipped rows).
    """
    rng = np.random.default_rng(seed)
    noisy, flipped = y.copy(), np.zeros(len(y), bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        pick = rng.choice(rows, size=int(round(rate * len(rows))), replace=False)
        noisy[pick], flipped[pick] = target[c], True
    return noisy, flipped


# --------------------------------------------------------------------------- the training


@dataclasses.dataclass
class Curve:
    """One training run: test accuracy and training seconds after each epoch."""

    accuracy: List[float]
    seconds: List[float]  # fit time of each epoch (the test evaluation not included)
    confusion: List[List[List[int]]]  # per epoch: test counts of (true class, predicted class)

    def fit_seconds(self, epochs: int) -> float:
        """Training time of the first ``epochs`` epochs."""
        return float(sum(self.seconds[:epochs]))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def fit_with_curve(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, epochs: int,
                   seed: int, batch_size: int, save_at: Optional[Dict[int, str]] = None,
                   every_epoch: bool = True) -> Curve:
    """Trains the seed's CNN (``common.build_cnn``) with Keras's seeding, evaluating on the test
    set after every epoch.

    One run of E epochs gives the accuracy after every e <= E: with the same seed, a run of e
    epochs is this run stopped at e (Keras draws the initial weights and each epoch's shuffle from
    the seeded generators in the same order), so the curve costs one training, not one per epoch.

    Args:
        save_at: epoch -> path; the [features, logits, softmax] model is saved there after that
            epoch, for the audit.
        every_epoch: evaluate after every epoch (the curve); False: after the last one only (an
            arm needs its final accuracy, and each evaluation costs about a third of an epoch).
    """
    from distributed_influence.tfimport import import_keras

    keras = import_keras()
    trainable, model = build_cnn(10, 0, seed)
    save_at = save_at or {}
    curve = Curve([], [], [])
    n_classes = int(max(y.max(), test_y.max())) + 1

    class _Each(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            curve.seconds.append(time.perf_counter() - self.t0)
            if epoch + 1 in save_at:
                model.save(save_at[epoch + 1])
            if not every_epoch and epoch + 1 < epochs:
                return
            pred = np.argmax(trainable.predict(test_x, batch_size=EVAL_BATCH, verbose=0), axis=1)
            curve.accuracy.append(float(np.mean(pred == test_y)))
            curve.confusion.append(confusion_matrix(test_y, pred, n_classes).tolist())

    trainable.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[_Each()])
    return curve


def predict_probs(model_path: str, x: np.ndarray) -> np.ndarray:
    """The saved model's softmax over ``x`` (for a peer detector that ranks by probabilities)."""
    from distributed_influence.tfimport import import_keras

    model = import_keras().models.load_model(model_path, safe_mode=True, compile=False)
    return np.asarray(model.predict(x, batch_size=EVAL_BATCH, verbose=0)[2], np.float64)


def choose_epochs(true_acc: np.ndarray, noisy_acc: np.ndarray, grid: Sequence[int],
                  min_gap: float) -> Tuple[int, bool]:
    """The smallest epoch count of ``grid`` where the mean (over seeds) test accuracy of the
    true-label model is at least ``min_gap`` above the noisy-label one.

    Uniform or early-stopped label noise barely hurts a CNN; cleaning can only show what it buys
    where the noise costs accuracy, so the measurement is made where it does.

    Args:
        true_acc, noisy_acc: (seeds, epochs) test accuracy after each epoch.

    Returns:
        (epochs, whether the gap was reached); when no epoch count reaches it, the one with the
        largest gap.
    """
    gap = true_acc.mean(axis=0) - noisy_acc.mean(axis=0)
    for e in sorted(grid):
        if gap[e - 1] >= min_gap:
            return e, True
    return max(grid, key=lambda e: gap[e - 1]), False


def print_confusion(conf: np.ndarray, target: np.ndarray, seed: int, epochs: int, names) -> None:
    """The true-label model's confusion matrix and the flip each class gets from it."""
    print(f"\nconfusion matrix on the test set of the true-label model (seed {seed}, {epochs} epochs; rows: "
          "true class, columns: predicted)")
    print("  " + " ".join(f"{c:>5}" for c in range(len(conf))))
    for c, row in enumerate(conf):
        print(f"{c:>2}" + " ".join(f"{v:>5}" for v in row) + f"   {names[c]}")
    print("flips: " + ", ".join(f"{names[c]} -> {names[t]}" for c, t in enumerate(target)))


# ----------------------------------------------------------------------------- the review


def parse_top(top: str, n: int) -> int:
    """Rows a TOP takes: a count, or a percentage of ``n`` such as ``10%``, rounded up to at least
    one row as ``apply-review`` rounds it, so that "flips in the top TOP" counts the rows it read."""
    top = top.strip()
    if top.endswith("%"):
        return max(1, int(math.ceil(float(top[:-1]) * n / 100.0 - 1e-9)))
    return int(top)


def top_label(top: str) -> str:
    """A TOP as a file-name-safe tag (``10%`` -> ``10pct``)."""
    return file_tag(top.strip().replace("%", "pct"))


def arm_head(policy: str, gate: Optional[float]) -> str:
    """An arm's name before its TOP: the policy, and the gate when there is one
    (``relabel p>=0.6``)."""
    return policy if gate is None else f"{policy} p>={gate:g}"


def file_tag(text: str) -> str:
    """``text`` safe in a file name: dots, spaces and ``>=`` become underscores or go
    (``relabel p>=0.6`` -> ``relabel_p0_6``)."""
    return text.replace(">=", "").replace(".", "_").replace(" ", "_")


def cli_exe() -> str:
    """The project's command line in the running interpreter's environment."""
    return os.path.join(os.path.dirname(sys.executable), "distributed-influence")


def apply_review(train_npz: str, audit_out: str, out_dir: str, top: str, policy: str, log_path: str,
                 min_confidence: Optional[float] = None) -> float:
    """Runs ``distributed-influence apply-review --auto`` as a user would, and times it.

    Through the command line, not its Python API: the benchmark measures what a user runs.

    Returns:
        Wall seconds of the command.

    Raises:
        SystemExit: the command failed (the end of its output is printed).
    """
    gate = [] if min_confidence is None else ["--min-confidence", f"{min_confidence:g}"]
    return _run_cli(["--train", train_npz, "--out", out_dir, "--audit", audit_out, "--auto", top,
                     "--policy", policy] + gate, log_path)


#: The arm name of a reviewer who always decides right.
REVIEWER = "perfect review"


def apply_perfect_review(train_npz: str, true_y: np.ndarray, audit_out: str, out_dir: str, top: str,
                         log_path: str) -> float:
    """``apply-review --decisions`` from a reviewer who goes through the top TOP of ``audit_rank``
    on the review page and always decides right: each flipped row relabelled to its true label,
    the others kept. What reviewing the top TOP can buy at best, beside what ``--auto`` buys.

    Returns:
        Wall seconds of the command.
    """
    _, noisy_y, ids = read_npz(train_npz)
    scores = read_train_scores(audit_out)  # in train-id order, as ids are row numbers here
    chosen = scores["audit_rank"] <= parse_top(top, len(noisy_y))
    csv_path = os.path.join(os.path.dirname(out_dir), os.path.basename(out_dir) + ".decisions.csv")
    with open(csv_path, "w") as fh:
        fh.write("train_id,label,action,new_label\n")
        for i in np.flatnonzero(chosen):
            fix = true_y[i] != noisy_y[i]
            fh.write(f"{ids[i]},{noisy_y[i]},{'relabel' if fix else 'keep'},{true_y[i] if fix else ''}\n")
    return _run_cli(["--train", train_npz, "--out", out_dir, "--decisions", csv_path, "--audit", audit_out], log_path)


def _run_cli(argv: List[str], log_path: str) -> float:
    """Runs ``distributed-influence apply-review ARGV``, its output to ``log_path``; wall seconds.

    Raises:
        SystemExit: the command failed (the end of its output is printed).
    """
    cmd = [cli_exe(), "apply-review"] + argv
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log_path) as fh:
            sys.stderr.write(fh.read()[-3000:])
        raise SystemExit(f"apply-review failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return seconds


def read_npz(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, id) of a training file; ``id`` is the row number where the file has none."""
    with np.load(path) as z:
        ids = z["id"].astype(np.int64) if "id" in z.files else np.arange(len(z["y"]), dtype=np.int64)
        return z["x"], z["y"].astype(np.int64), ids


def _train_scores_path(out: str) -> str:
    """An audit's ``train_scores``: a dataset directory, or one file."""
    path = os.path.join(out, "train_scores")
    return path if os.path.isdir(path) else path + ".parquet"


def has_confidence(out: str) -> bool:
    """Whether an audit's ``train_scores`` has ``predicted_probability`` (``--min-confidence``
    needs it; audits of earlier versions lack it)."""
    import pyarrow.dataset as ds

    return "predicted_probability" in ds.dataset(_train_scores_path(out), format="parquet").schema.names


def read_train_scores(out: str) -> Dict[str, np.ndarray]:
    """The audit's ``train_scores`` columns used here, in train-id order."""
    import pyarrow.parquet as pq

    t = pq.read_table(_train_scores_path(out),
                      columns=["train_id", "label", "audit_rank", "predicted_class", "label_probability"])
    cols = {name: t.column(name).to_numpy() for name in t.column_names}
    order = np.argsort(cols["train_id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


# ------------------------------------------------------------------------------ the figures


def detection(score: np.ndarray, flipped: np.ndarray) -> Tuple[float, float]:
    """(average precision, AUROC) of a suspicion score (larger = checked first) against the flips."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    return float(average_precision_score(flipped, score)), float(roc_auc_score(flipped, score))


def cleaning_effect(ids: np.ndarray, y_clean: np.ndarray, y_noisy: np.ndarray, y_true: np.ndarray,
                    flipped: np.ndarray) -> Dict[str, float]:
    """What a cleaned training file did to the noisy labels, row by row (ids are row numbers).

    Returns:
        relabelled: rows whose label changed; restored: of them, those given back their true
        label; broken: of them, rows whose label had been right; removed: rows dropped;
        removed_flipped: of them, rows whose label had been flipped; flips_left: flipped rows
        still present with a wrong label, as a share of all flips.
    """
    changed = y_clean != y_noisy[ids]
    kept = np.zeros(len(y_noisy), bool)
    kept[ids] = True
    wrong = np.zeros(len(y_noisy), bool)
    wrong[ids] = y_clean != y_true[ids]
    return {"relabelled": int(changed.sum()),
            "restored": int((changed & (y_clean == y_true[ids])).sum()),
            "broken": int((changed & ~flipped[ids]).sum()),
            "removed": int((~kept).sum()),
            "removed_flipped": int((~kept & flipped).sum()),
            "flips_left": float(wrong.sum() / max(1, flipped.sum()))}


def recovered(cleaned: float, noisy: float, true: float) -> float:
    """Share of the noisy-to-true accuracy gap a cleaning won back (nan without a gap)."""
    return (cleaned - noisy) / (true - noisy) if true != noisy else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``mean [min-max]`` of one figure over the seeds (just the value for one seed)."""
    v = np.asarray([x for x in values if x == x], np.float64)
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} [{fmt.format(v.min())}-{fmt.format(v.max())}]"


# -------------------------------------------------------------------------- a peer detector


def cleanlab_installed() -> bool:
    """Whether the peer detector can run (cleanlab is not a dependency of the project)."""
    try:
        import cleanlab.filter  # noqa: F401
    except ImportError:
        return False
    return True


def cleanlab_ranking(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's label issues (``find_label_issues``), most likely first.

    The probabilities are the noisy model's on its own training rows (in-sample): cleanlab
    recommends out-of-sample ones from cross-validation, which would cost one training per fold;
    the report says which were used.
    """
    from cleanlab.filter import find_label_issues

    return np.asarray(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"), np.int64)


def relabel_ranked(ranked: np.ndarray, labels: np.ndarray, probs: np.ndarray, count: int) -> np.ndarray:
    """Labels with the first ``count`` ranked rows relabelled to the model's class where it
    differs (the same rule as ``apply-review --auto --policy relabel``)."""
    out = labels.copy()
    rows = ranked[:count]
    out[rows] = probs[rows].argmax(axis=1)
    return out


# --------------------------------------------------------------------------------- caching


#: How many results :func:`load_json` reused in this run (the report says so: their times are
#: those of the run that made them).
REUSED = {"count": 0}


def load_json(path: str) -> Optional[dict]:
    """A cached result, or None when absent."""
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        value = json.load(fh)
    REUSED["count"] += 1
    return value


def save_json(path: str, value: dict) -> None:
    """Writes a result so that a later run with the same ``--work-dir`` reuses it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(value, fh)
    os.replace(tmp, path)
