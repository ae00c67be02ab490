"""``distributed-influence apply-review``: apply review decisions to a copy of the training data.

::

    distributed-influence apply-review --train SOURCE --out DIR --decisions decisions.csv
    distributed-influence apply-review --train SOURCE --out DIR --audit OUT --auto 10% [--policy remove]
    distributed-influence apply-review --train SOURCE --out DIR --audit OUT --auto 20% --min-confidence 0.7

Everything is checked before anything is written: the settings, the audit against the source,
every line of the decisions file. The outputs are then written into a temporary directory
beside ``DIR`` and renamed into place, so a failure at any point leaves no ``DIR`` (or the
earlier one, with ``--overwrite``), never half of one. The source is only read.

The command is a thin wrapper of :func:`apply_review`, which scripts and the cleaning benchmark
call directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import uuid
from typing import Optional, Union

from distributed_influence.cleaning.decisions import POLICIES
from distributed_influence.config import AuditConfig, fields
from distributed_influence.config.fields import BOOLEAN, Check, check_all, documented, setting
from distributed_influence.errors import ConfigError, InputError

#: Endings of the copy an earlier apply-review left in DIR (it has the source's file name).
COPY_SUFFIXES = (".npz", ".parquet", ".pq")
COMMAND = "apply-review"
AT_LEAST_2 = Check("must be an integer >= 2 (a binary model has 2 classes)", lambda v: isinstance(v, int) and v >= 2)
A_PROBABILITY = Check("must be a probability in (0, 1]", lambda v: 0 < v <= 1)  # NaN fails it


def _shared(name: str):
    """A setting declared by :class:`AuditConfig` (flag, default, help, check), taken as it is:
    how a TFRecord source is read means here what it means for the audit."""
    f = next(f for f in dataclasses.fields(AuditConfig) if f.name == name)
    return dataclasses.field(default=f.default, metadata=f.metadata)


@documented
@dataclasses.dataclass(frozen=True)
class ReviewSettings:
    """Settings of one ``apply-review``; the fields keep the order of ``--help``."""

    train: str = setting(help="the training source the decisions are about (the audit's --train): .npz, "
                              ".parquet, TFRecord file(s), an image folder, an IDX file or 'digits'")
    out: str = setting(help="new (or empty) local directory for the corrected copy (.npz and Parquet "
                            "sources, under the source's file name), label_map.parquet and summary.json")
    decisions: Optional[str] = setting(None, help="decisions.csv exported by the review page: train_id, label, "
                                                  "action (keep, relabel, remove, unsure), new_label[, "
                                                  "train_key, decided_at]")
    audit: Optional[str] = setting(None, help="the --out of the audit of --train: its ranking for --auto; with "
                                              "--decisions, it gives the number of classes")
    auto: Optional[str] = setting(None, help="decide without a person on the top TOP rows of the audit's "
                                             "audit_rank: a count (500) or a percentage (10%); needs --audit")
    policy: Optional[str] = setting(None, choices=POLICIES,
                                    help="what --auto does with the top rows: relabel (default) gives those "
                                         "whose model's class differs from their label that class; remove "
                                         "drops them all")
    min_confidence: Optional[float] = setting(None, check=A_PROBABILITY,
                                              help="with --auto and --policy relabel: relabel only where the model "
                                                   "gives its class at least this probability, and keep the other "
                                                   "labels (default: relabel wherever the model's class differs)")
    classes: Optional[int] = setting(None, check=AT_LEAST_2,
                                     help="number of classes C, so new labels must be in 0..C-1 (default: "
                                          "the audit's model, else the class folders, else the largest label + 1)")
    overwrite: bool = setting(False, check=BOOLEAN,
                              help="replace an earlier apply-review output in --out (nothing else is ever replaced)")
    image_feature: Optional[str] = _shared("image_feature")
    label_feature: Optional[str] = _shared("label_feature")
    id_feature: Optional[str] = _shared("id_feature")
    compression: Optional[str] = _shared("compression")

    def __post_init__(self) -> None:
        if self.auto is not None and not isinstance(self.auto, str) and not isinstance(self.auto, bool):
            object.__setattr__(self, "auto", str(self.auto))  # apply_review(auto=500) from Python
        check_all(self)
        if self.decisions is not None and self.auto is not None:
            raise ConfigError("give --decisions or --auto, not both")
        if self.decisions is None and self.auto is None:
            raise ConfigError("give --decisions CSV, or --audit OUT --auto TOP")
        if self.auto is not None and self.audit is None:
            raise ConfigError(f"--auto {self.auto} needs --audit OUT: the audit whose audit_rank it takes")
        if self.policy is not None and self.auto is None:
            raise ConfigError("--policy is what --auto does; with --decisions the file says it")
        if self.min_confidence is not None and (self.auto is None or (self.policy or POLICIES[0]) != "relabel"):
            raise ConfigError("--min-confidence gates the relabelling of --auto with --policy relabel")

    @property
    def source_options(self) -> dict:
        return {name: getattr(self, name) for name in fields.names(type(self), source_option=True)}


# ------------------------------------------------------------------------------ the output


def _over_source(out: str, rows) -> bool:
    """Whether ``out`` is the directory of a local source file, or inside a local image folder:
    the copy would replace the source, or become a class folder of it."""
    from distributed_influence.data.sources import ImageFolderSource, TFRecordSource
    from distributed_influence.store import storage

    real = os.path.realpath(out)
    if rows.spec.startswith("digits"):
        return False
    if isinstance(rows.source, ImageFolderSource):
        fs, path = storage.resolve(rows.spec)
        root = os.path.realpath(path)
        return storage.is_local(fs) and (real == root or real.startswith(root + os.sep))
    for spec in (rows.source.files if isinstance(rows.source, TFRecordSource) else [rows.spec]):
        fs, path = storage.resolve(spec)
        if storage.is_local(fs) and real == os.path.realpath(os.path.dirname(path)):
            return True
    return False


def check_out(out: str, rows, overwrite: bool) -> None:
    """Refuses an ``--out`` that would put the copy over the source, or replace anything but an
    earlier output of this command.

    Raises:
        ConfigError: one line naming the directory and why.
    """
    from distributed_influence.store import storage

    if storage.is_uri(out):
        raise ConfigError(f"--out {storage.redact(out)} must be a local directory (the outputs are written "
                          f"beside it and renamed into place); copy them to remote storage afterwards")
    if _over_source(out, rows):
        raise ConfigError(f"--out {out} is where the training source {rows.spec} is: write the corrected "
                          f"data to a new directory")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file, not a directory")
    names = sorted(os.listdir(out))
    if not names:
        return
    if not overwrite:
        raise ConfigError(f"--out {out} is not empty (pass --overwrite to replace an earlier apply-review "
                          f"output there)")
    own = _own_files()
    foreign = [n for n in names if n not in own and not n.endswith(COPY_SUFFIXES)]
    if foreign or not _is_own_output(out):
        what = f"holds {foreign[0]!r}, which" if foreign else "has no summary.json of apply-review: it"
        raise ConfigError(f"--out {out} {what} apply-review did not write; refusing to replace it even with "
                          f"--overwrite")


def _own_files() -> tuple:
    """Files an earlier apply-review may have left in DIR besides its copy: the names
    :mod:`.copies` writes (imported here, not at the top, so the command line starts without
    the data layer)."""
    from distributed_influence.cleaning import copies

    return copies.LABEL_MAP, copies.SUMMARY


def _is_own_output(out: str) -> bool:
    """Whether ``out`` holds the ``summary.json`` of an earlier apply-review.

    The names of the files alone do not tell: a user's own ``train.npz`` or ``summary.json``
    must never be replaced, even with ``--overwrite``, so only a summary that this command
    wrote (its ``command`` field) marks the directory as ours.
    """
    from distributed_influence.cleaning.copies import SUMMARY

    try:
        with open(os.path.join(out, SUMMARY), encoding="utf-8") as fh:
            return json.load(fh).get("command") == COMMAND
    except (OSError, ValueError, AttributeError):
        return False


def _publish(staged: str, out: str) -> None:
    """Moves the staged directory to ``out``; an earlier output there is replaced only once the
    new one is whole, and comes back if the move fails."""
    old = None
    if os.path.isdir(out):
        if os.listdir(out):
            old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{uuid.uuid4().hex[:8]}.old")
            os.rename(out, old)
        else:
            os.rmdir(out)
    try:
        os.rename(staged, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _unwritable(out: str, exc: OSError) -> InputError:
    """The one-line refusal of an ``--out`` the system will not let us write (a parent that is a
    file or read-only, a full disk): the user's to fix, so no traceback."""
    from distributed_influence.store import storage

    return InputError(f"--out {out}: cannot be written ({storage.reason(exc)})")


def _write(settings: ReviewSettings, rows, decisions, classes_note: str) -> dict:
    """Writes the copy, the label map and the summary into a staged directory, then publishes it.

    Raises:
        InputError: ``--out`` cannot be written; the staged directory is removed first, and an
            earlier output there is left as it was.
        SourceError: the source cannot be read again.
    """
    out = os.path.abspath(settings.out)
    parent = os.path.dirname(out)
    # A hidden name beside DIR (same filesystem, so publishing is a rename); made by mkdir rather
    # than mkdtemp, so DIR gets the user's usual permissions, not mkdtemp's owner-only ones.
    staged = os.path.join(parent, f".{os.path.basename(out)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(staged)
    except OSError as exc:
        raise _unwritable(settings.out, exc) from None
    try:
        summary = _stage(settings, rows, decisions, classes_note, staged)
        _publish(staged, out)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        raise _unwritable(settings.out, exc) from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return summary


def _stage(settings: ReviewSettings, rows, decisions, classes_note: str, staged: str) -> dict:
    """Writes every output into the directory ``staged``; returns the summary it wrote."""
    from distributed_influence.cleaning import copies, sources
    from distributed_influence.store import storage

    written = []
    if rows.copy_format is not None:
        name = copies.copy_name(rows)
        writer = copies.write_npz if rows.copy_format == "npz" else copies.write_parquet
        writer(rows, decisions, os.path.join(staged, name))
        written.append(name)
    copies.write_label_map(rows, decisions, os.path.join(staged, copies.LABEL_MAP))
    written += [copies.LABEL_MAP, copies.SUMMARY]
    summary = {
        "command": COMMAND,
        "train": storage.redact(rows.spec),
        "out": settings.out,
        "source_kind": sources.kind_of(rows),
        "format": rows.copy_format,
        "files": written,
        "rows": rows.n_rows,
        "rows_written": int(decisions.kept.sum()),
        "n_classes": rows.n_classes,
        "classes": classes_note,
        "from": decisions.origin,
        **copies.counts(rows, decisions),
    }
    with open(os.path.join(staged, copies.SUMMARY), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary


# ------------------------------------------------------------------------------ entry points


def run(settings: ReviewSettings) -> dict:
    """Applies the decisions of ``settings`` (see :func:`apply_review`)."""
    from distributed_influence.cleaning import decisions as dec
    from distributed_influence.cleaning import sources

    top = dec.parse_top(settings.auto) if settings.auto is not None else None
    audit = sources.read_audit(settings.audit) if settings.audit is not None else None
    rows = sources.open_train(settings.train, sources.source_options(settings.source_options, audit))
    check_out(settings.out, rows, settings.overwrite)
    if audit is not None:
        sources.check_audit_belongs(audit, rows)
        if settings.classes is not None and settings.classes != audit.n_classes:
            raise ConfigError(f"--classes {settings.classes}, but the audit's model has {audit.n_classes} classes")
        rows.n_classes, note = audit.n_classes, f"the audit's model has {audit.n_classes} classes"
    elif settings.classes is not None:
        rows.n_classes, note = settings.classes, f"--classes {settings.classes}"
    else:
        rows.n_classes, note = sources.classes_of_source(rows)
    sources.check_labels_in_range(rows, note)
    if top is not None:
        decisions = dec.auto_decisions(audit, rows, top, settings.policy or POLICIES[0], settings.min_confidence)
    else:
        decisions = dec.read_decisions(settings.decisions, rows, note)
    return _write(settings, rows, decisions, note)


def apply_review(train: str, out: str, decisions: Optional[str] = None, audit: Optional[str] = None,
                 auto: Union[str, int, None] = None, policy: Optional[str] = None, classes: Optional[int] = None,
                 overwrite: bool = False, *, min_confidence: Optional[float] = None, **source_options) -> dict:
    """Writes corrected training data into ``out`` from review decisions or an audit's ranking.

    Args:
        train: the training source (path or URI, as for ``audit --train``).
        out: a new or empty local directory (or, with ``overwrite``, an earlier output of this).
        decisions: a ``decisions.csv`` exported by the review page.
        audit: the ``--out`` of an audit of ``train``: its ranking for ``auto``, its class count.
        auto: TOP, a count (``500``) or a percentage (``"10%"``) of ``audit_rank``.
        policy: ``relabel`` (default) or ``remove``, for ``auto``.
        classes: the number of classes, when no audit gives it.
        overwrite: replace an earlier apply-review output in ``out``.
        min_confidence: with ``relabel``, relabel only rows whose model's class has at least this
            probability (``predicted_probability``); the other suspects keep their label.
        **source_options: ``image_feature``, ``label_feature``, ``id_feature``, ``compression``
            (TFRecord; default: the audit's, else as ``audit`` reads them).

    Returns:
        The summary, as written to ``out/summary.json``: counts overall and per given class.

    Raises:
        InputError: bad settings, a source or audit that cannot be used, or a bad decisions
            file; nothing is written then.
    """
    return run(ReviewSettings(train=train, out=out, decisions=decisions, audit=audit, auto=auto, policy=policy,
                              min_confidence=min_confidence, classes=classes, overwrite=overwrite, **source_options))


def cmd_apply_review(args: argparse.Namespace) -> int:
    """The command line's entry: the settings from the flags, the summary printed.

    A refusal is an :class:`InputError`, which the command line prints as one line with exit
    code 2; this returns 0 only once every output is in place.
    """
    from distributed_influence.cleaning.copies import summary_lines

    for line in summary_lines(run(fields.from_args(ReviewSettings, args))):
        print(line)
    return 0


_METAVARS = {"train": "SOURCE", "out": "DIR", "decisions": "CSV", "audit": "OUT", "auto": "TOP", "classes": "C",
             "min_confidence": "P",
             "image_feature": "NAME", "label_feature": "NAME", "id_feature": "NAME"}


def add_parser(sub) -> None:
    """Registers ``apply-review`` on the subparsers of the main command."""
    p = sub.add_parser(COMMAND, help="apply review decisions (or --auto) to a corrected copy of the training data",
                       description="Write a corrected copy of the training data (.npz and Parquet, in the "
                                   "source's format; rows relabelled or removed, ids and keys kept), "
                                   "label_map.parquet for every format and a summary, from a decisions.csv "
                                   "of the review page or from the top of an audit's ranking. The source is "
                                   "never changed; a bad decisions file writes nothing.")
    fields.add_arguments(p, ReviewSettings, overrides={k: {"metavar": v} for k, v in _METAVARS.items()})
    p.set_defaults(func=cmd_apply_review)

