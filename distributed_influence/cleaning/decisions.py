"""Decisions per training row: read from a reviewer's ``decisions.csv``, or made from an audit.

A decisions file is checked whole before anything is written, and the first problem is
refused in one line naming the file, the line and the value: a file from another data set, a
typo in an action or a class out of range must not produce a half-corrected copy that a
retrain would then trust.

The file (exported by the review page) has the columns ``train_id``, ``label`` (the given
label), ``action`` (``keep``, ``relabel``, ``remove`` or ``unsure``) and ``new_label`` (empty
unless relabelled), then optionally ``train_key`` and ``decided_at``; other columns are
ignored, so a later page may add some. A file holding only its header is valid: no decision,
an unchanged copy. An empty file (no header) is refused: it is not a decisions file, and most
likely a failed export.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

import numpy as np

from distributed_influence.errors import ConfigError, InputError

if TYPE_CHECKING:  # annotations only: the command line reads POLICIES without loading the data layer
    from distributed_influence.cleaning.sources import AuditRows, TrainRows

#: The actions a decisions file may hold.
ACTIONS = ("keep", "relabel", "remove", "unsure")
#: The codes of :attr:`Decisions.action`: a row the decisions do not name is ``undecided``.
CODES = ("undecided",) + ACTIONS
UNDECIDED, KEEP, RELABEL, REMOVE, UNSURE = range(len(CODES))
#: Columns a decisions file must have.
REQUIRED = ("train_id", "label", "action", "new_label")
KEY_COLUMN = "train_key"
#: What ``--auto`` does with the top rows (``--policy``, the benchmark's ``--policies``); the first
#: is the default.
POLICIES = ("relabel", "remove")
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "1_000" and "٣"
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


@dataclasses.dataclass
class Decisions:
    """One decision per row of the training source, in source order.

    Attributes:
        action: int8 code per row (:data:`CODES`).
        new_label: int64 per row: the label the row carries after cleaning (its given label
            unless relabelled), -1 for a removed row.
        origin: how the decisions were made, for the summary.
    """

    action: np.ndarray
    new_label: np.ndarray
    origin: dict

    @property
    def kept(self) -> np.ndarray:
        """Rows that stay in the corrected copy."""
        return self.action != REMOVE


def none_decided(rows: TrainRows, origin: dict) -> Decisions:
    """Every row undecided, carrying its given label."""
    return Decisions(np.zeros(rows.n_rows, dtype=np.int8), rows.labels.copy(), origin)


# ------------------------------------------------------------------------------ the CSV file


def _refuse(path: str, line: int, what: str) -> InputError:
    """The one-line refusal of a decisions file, ``FILE: line N: what``: the reviewer opens the
    file at that line, so every check words its problem through here."""
    return InputError(f"{path}: line {line}: {what}")


def _integer(text: str, column: str, path: str, line: int) -> int:
    """An integer field as the int64 it must be stored as.

    Stricter than ``int()``: ASCII digits only, so ``1_000``, ``3.0`` and other scripts' digits
    are refused by name rather than read as some other row; and within int64, so an id too long
    for the tables is refused here, not by NumPy later.

    Raises:
        InputError: the field is not such an integer (the file, line, column and text named).
    """
    if not _INTEGER.fullmatch(text):
        raise _refuse(path, line, f"{column} {text!r} is not an integer")
    value = int(text)
    if not _INT64[0] <= value <= _INT64[1]:
        raise _refuse(path, line, f"{column} {text} is out of the 64-bit integer range")
    return value


def _read_text(path: str) -> str:
    """The whole file as text, refusing what is not a decisions file before it is parsed.

    Read whole (a decisions file holds one line per reviewed row: small), from a path or any
    URI the package reads. A file that is not UTF-8 or holds NUL bytes is most likely the wrong
    file (a binary one, or the training data): it is named as such instead of reported as bad
    CSV on some line.

    Raises:
        InputError: missing, unreadable, not UTF-8, or binary.
    """
    from distributed_influence.store import storage

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise InputError(f"{path}: decisions file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: decisions file cannot be read ({storage.reason(exc)})") from None
    try:
        text = data.decode("utf-8-sig")  # a spreadsheet may have added a byte-order mark
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}): not a decisions.csv") from None
    if "\x00" in text:
        raise InputError(f"{path}: holds NUL bytes (a binary file, not a decisions.csv)")
    return text


def _header(path: str, reader) -> List[str]:
    """The column names of the header line (trimmed), once they are known to be usable.

    Checked before any decision line, so a file from another tool (a missing or repeated
    column) is refused by its header rather than by a confusing problem on line 2.

    Raises:
        InputError: no header line, a column named twice, or a required column missing.
    """
    header = next(reader, None)
    if header is None or not any(h.strip() for h in header):
        raise InputError(f"{path}: empty file, no header line (expected the columns {','.join(REQUIRED)}; "
                         f"a file with only the header means no decisions)")
    names = [h.strip() for h in header]
    for name in names:
        if name and names.count(name) > 1:
            raise _refuse(path, reader.line_num, f"column {name!r} appears twice in the header")
    for name in REQUIRED:
        if name not in names:
            raise _refuse(path, reader.line_num, f"no column {name!r} in the header (found: {','.join(names)}; "
                                                 f"needed: {','.join(REQUIRED)})")
    return names


@dataclasses.dataclass
class _Lines:
    """The parsed lines of a decisions file, before they are looked up in the source."""

    line: List[int] = dataclasses.field(default_factory=list)
    train_id: List[int] = dataclasses.field(default_factory=list)
    label: List[int] = dataclasses.field(default_factory=list)
    action: List[int] = dataclasses.field(default_factory=list)
    new_label: List[int] = dataclasses.field(default_factory=list)
    key: List[str] = dataclasses.field(default_factory=list)


def _parse_line(path: str, line: int, rec: dict, n_classes: int, classes_note: str, seen: dict,
                parsed: _Lines) -> None:
    """Checks what one line says on its own (formats, action, new_label) and appends it."""
    train_id = _integer(rec["train_id"], "train_id", path, line)
    if train_id in seen:
        raise _refuse(path, line, f"train_id {train_id} appears again (first on line {seen[train_id]}): "
                                  f"one decision per row")
    seen[train_id] = line
    label = _integer(rec["label"], "label", path, line)
    action = rec["action"]
    if action not in ACTIONS:
        raise _refuse(path, line, f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})")
    text = rec["new_label"]
    new_label = label
    if action == "relabel":
        if not text:
            raise _refuse(path, line, f"action relabel of train_id {train_id} has no new_label")
        new_label = _integer(text, "new_label", path, line)
        if not 0 <= new_label < n_classes:
            raise _refuse(path, line, f"new_label {new_label} is outside 0..{n_classes - 1} ({classes_note})")
        if new_label == label:
            raise _refuse(path, line, f"relabel of train_id {train_id} to its own label {label} "
                                      f"(write keep for a label that stays)")
    elif text:
        raise _refuse(path, line, f"new_label {text!r} given for action {action} (only relabel takes one)")
    parsed.line.append(line)
    parsed.train_id.append(train_id)
    parsed.label.append(label)
    parsed.action.append(CODES.index(action))
    parsed.new_label.append(-1 if action == "remove" else new_label)
    parsed.key.append(rec.get(KEY_COLUMN, ""))


def _against_source(path: str, parsed: _Lines, rows: TrainRows) -> np.ndarray:
    """Looks every line up in the source and refuses the first (by line) that does not fit it.

    Returns:
        The row position of each line.
    """
    lines = np.asarray(parsed.line)
    ids = np.asarray(parsed.train_id, dtype=np.int64)
    pos = rows.positions(ids)
    problems: List[Tuple[int, str]] = []
    unknown = pos < 0
    if unknown.any():
        i = int(np.argmax(unknown))
        problems.append((lines[i], f"train_id {ids[i]} is not an id of {rows.spec} "
                                   f"(its ids: {_id_range(rows)})"))
    known = np.flatnonzero(~unknown)
    given = np.asarray(parsed.label, dtype=np.int64)[known]
    differ = given != rows.labels[pos[known]]
    if differ.any():
        i = int(known[np.argmax(differ)])
        problems.append((lines[i], f"label {given[np.argmax(differ)]} of train_id {ids[i]} differs from its label "
                                   f"{rows.labels[pos[i]]} in {rows.spec} (a decisions file of another data set?)"))
    keys = np.asarray(parsed.key, dtype=object)
    named = np.flatnonzero((keys != "") & ~unknown)
    if len(named) and rows.keys is None:
        i = int(named[0])
        problems.append((lines[i], f"train_key {keys[i]!r} given, but {rows.spec} has no keys "
                                   f"(a decisions file of another data set?)"))
    elif len(named):
        differ = keys[named].astype(str) != rows.keys[pos[named]].astype(str)
        if differ.any():
            i = int(named[np.argmax(differ)])
            problems.append((lines[i], f"train_key {keys[i]!r} of train_id {ids[i]} is not its key "
                                       f"{rows.keys[pos[i]]!r} in {rows.spec}"))
    if problems:
        line, what = min(problems)
        raise _refuse(path, int(line), what)
    return pos


def _id_range(rows: TrainRows) -> str:
    lo, hi = int(rows.ids.min()), int(rows.ids.max())
    if hi - lo + 1 == rows.n_rows:
        return f"{lo}..{hi}"
    return f"{rows.n_rows} ids between {lo} and {hi}"


def read_decisions(path: str, rows: TrainRows, classes_note: str) -> Decisions:
    """Reads and checks a decisions file against the training source.

    Args:
        path: the CSV file (path or URI).
        rows: the training source's ids, labels, keys and class count.
        classes_note: where C comes from, to end the range message (e.g. "the audit's model has
            10 classes").

    Raises:
        InputError: the first problem of the file, as ``FILE: line N: what``.
    """
    from distributed_influence.store import storage

    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error, not a field
    parsed = _Lines()
    seen: dict = {}
    try:
        names = _header(path, reader)
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue  # a blank line, e.g. at the end of a file edited by hand
            if len(fields) != len(names):
                raise _refuse(path, line, f"{len(fields)} fields, but the header has {len(names)}")
            # Numbers and actions are trimmed (a hand edit's stray space means nothing there);
            # a key is taken as written: the review page quotes one with edge spaces so that
            # they survive, and the key must equal the source's exactly.
            rec = {name: value.strip() if name in REQUIRED else value for name, value in zip(names, fields)}
            _parse_line(path, line, rec, rows.n_classes, classes_note, seen, parsed)
    except csv.Error as exc:
        raise _refuse(path, reader.line_num, f"not valid CSV ({exc})") from None
    decisions = none_decided(rows, {"decisions": storage.redact(path)})
    if not parsed.line:
        return decisions
    pos = _against_source(path, parsed, rows)
    decisions.action[pos] = np.asarray(parsed.action, dtype=np.int8)
    decisions.new_label[pos] = np.asarray(parsed.new_label, dtype=np.int64)
    return decisions


# ------------------------------------------------------------------------------------- --auto


@dataclasses.dataclass(frozen=True)
class Top:
    """``--auto``'s TOP: a number of rows, or a percentage of the training rows."""

    text: str
    count: Optional[int] = None
    percent: Optional[float] = None

    def rows(self, n_rows: int) -> int:
        """How many rows of the ranking TOP takes, of ``n_rows``.

        A percentage is rounded up (at least one row), as the report counts its top 5 % and
        10 %, so ``--auto 10%`` cleans exactly the rows the report's per-class table counts.

        Raises:
            ConfigError: a count larger than the training set.
        """
        if self.count is not None:
            if self.count > n_rows:
                raise ConfigError(f"--auto {self.text} is more than the {n_rows} training rows of the audit")
            return self.count
        return max(1, int(math.ceil(self.percent * n_rows / 100.0 - 1e-9)))


def parse_top(value: Union[str, int]) -> Top:
    """Parses TOP: a count (``500``) or a percentage (``10%``, ``2.5%``).

    Raises:
        ConfigError: not a number, zero, negative, or above 100 %.
    """
    text = str(value).strip()
    usage = "must be a number of rows (e.g. 500) or a percentage (e.g. 10%)"
    if isinstance(value, bool):
        raise ConfigError(f"--auto {usage}, got {value!r}")
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ConfigError(f"--auto {usage}, got {text!r}") from None
        if not 0 < percent <= 100:  # NaN fails both comparisons
            raise ConfigError(f"--auto percentage must be > 0% and at most 100%, got {text!r}")
        return Top(text, percent=percent)
    if not _INTEGER.fullmatch(text):
        raise ConfigError(f"--auto {usage}, got {text!r}")
    count = int(text)
    if count < 1:
        raise ConfigError(f"--auto must take at least 1 row, got {text!r}")
    return Top(text, count=count)


def auto_decisions(audit: AuditRows, rows: TrainRows, top: Top, policy: str,
                   min_confidence: Optional[float] = None) -> Decisions:
    """Decisions without a person: the top TOP rows of ``audit_rank``.

    With ``relabel``, those whose model's class differs from their label get the model's class
    and the others are kept (a suspect the model agrees with has no better label to offer);
    with ``remove``, all of them are dropped.

    ``min_confidence`` gates the relabelling: a suspect whose model's class has a lower
    probability keeps its label. Why: the audit ranks by how badly the label fits, not by how
    sure the model is of its own class, and among the suspects the model's unsure classes are
    often wrong where the label was right (hard examples between look-alike classes). Turning a
    right label into a wrong one costs as much as the fix it was meant to be.

    Args:
        audit: the audit's ``train_scores`` (already checked to belong to ``rows``).
        rows: the training source.
        top: TOP.
        policy: one of :data:`POLICIES`.
        min_confidence: with ``relabel``, the least ``predicted_probability`` that is relabelled.

    Raises:
        InputError: ``min_confidence`` with an audit that has no ``predicted_probability``.
    """
    from distributed_influence.store import storage

    n_top = top.rows(len(audit.audit_rank))
    chosen = audit.audit_rank <= n_top
    pos = rows.positions(audit.train_id[chosen])
    if min_confidence is not None and audit.predicted_probability is None:
        raise InputError(f"--audit {storage.redact(audit.out)}: train_scores has no predicted_probability column "
                         f"(an audit of an earlier version): rerun the audit to use --min-confidence")
    how = {"audit": storage.redact(audit.out), "auto": top.text, "top_rows": n_top, "policy": policy}
    decisions = none_decided(rows, how if min_confidence is None else {**how, "min_confidence": float(min_confidence)})
    if policy == "remove":
        decisions.action[pos] = REMOVE
        decisions.new_label[pos] = -1
        return decisions
    predicted = audit.predicted_class[chosen]
    differ = predicted != audit.label[chosen]
    if min_confidence is not None:
        # In the column's float32, so that a probability stored as 0.7 passes a gate of 0.7.
        differ &= audit.predicted_probability[chosen] >= np.float32(min_confidence)
    decisions.action[pos] = np.where(differ, RELABEL, KEEP).astype(np.int8)
    decisions.new_label[pos[differ]] = predicted[differ]
    return decisions
