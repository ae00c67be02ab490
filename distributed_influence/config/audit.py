"""The one configuration object of an audit, validated once.

Everything that changes the numbers of a result lives here, so the manifest can record it
and a resumed run can check that it is continuing the same job. Each setting is declared once,
as a field below: its flag, help, default, check, and whether it enters the digest or reaches
the workers are derived from it (:mod:`distributed_influence.config.fields`; see
``docs/design.md``, section "Settings").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from typing import Optional

from distributed_influence.config.fields import (
    BOOLEAN,
    FINITE_POSITIVE,
    INTEGER_AT_LEAST_1,
    NAME,
    NOT_NEGATIVE,
    POSITIVE,
    POSITIVE_INTEGERS,
    UNLESS_DEFAULT,
    check_all,
    documented,
    names,
    select,
    setting,
)
from distributed_influence.errors import ConfigError
from distributed_influence.method.records import METHODS

TARGETS = ("labels", "predictions")
#: Scoring paths (see method/scoring.py): the same tables, pruned skips most (test, train) pairs.
SCORING = METHODS
#: Compressions of TFRecord files (see data/sources/records.py, which reads them). Declared here:
#: the sources' package imports this one, so it cannot be imported from there.
COMPRESSIONS = ("gzip", "none")


def parse_shape(text: str) -> tuple:
    """``--input-shape``'s text, ``28,28,1`` or ``28x28x1``, as a tuple of ints."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not dims:
        raise argparse.ArgumentTypeError("expected at least one dimension")
    return dims


@documented
@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """Settings of one audit.

    The fields keep the order of the flags in ``distributed-influence audit --help``.
    """

    model: str = setting(help="trained classifier, a .keras file")
    train: str = setting(
        worker=True,
        help="training source: .npz (x, y[, id]), .parquet (label, x|image[, id]; image may hold PNG/JPEG "
             "bytes), TFRecord file(s) (a file, a glob or a comma list), an image folder DIR/CLASS/*.png|jpg, "
             "an IDX images file, or 'digits'")
    test: str = setting(worker=True, help="test source whose predictions are explained (same kinds)")
    # Where the results go does not change them.
    out: str = setting(digest=False, help="output directory for the Parquet tables and manifest.json")
    k: int = setting(10, check=INTEGER_AT_LEAST_1, worker=True,
                     help="proponents and opponents kept per test example (default 10)")
    # α scales as 1/λ, so λ changes every influence value.
    lam: float = setting(0.003, check=FINITE_POSITIVE, worker=True,
                         help="L2 strength lambda of the head fit (default 0.003)")
    target: str = setting("labels", choices=TARGETS, worker=True,
                          help="fit the head to the training labels (default; for label audits) or to the "
                               "model's own softmax outputs (highest fidelity)")
    shards: Optional[int] = setting(None, check=INTEGER_AT_LEAST_1,
                                    help="row-range shards of the training set (default: one per worker)")
    # Where the job runs, and on how much hardware, is not a setting of the result: not in the
    # digest (the shard plan they lead to is in the run key).
    address: Optional[str] = setting(
        None, digest=False,
        help="Ray cluster to join ('auto' or host:port; default: $RAY_ADDRESS, else start Ray on this machine)")
    feature_layer: Optional[str] = setting(
        None, worker=True, help="name of the layer whose output is the feature vector")
    logit_layer: Optional[str] = setting(
        None, worker=True, help="name of the Dense layer that produces the logits")
    batch_size: Optional[int] = setting(  # None: model.auto_batch_size
        None, check=INTEGER_AT_LEAST_1, digest=False, worker=True,
        help="rows per forward pass (default: by input size, 32 to 1024; halved on out-of-memory)")
    # A worker's scoring memory is O(test_block × shard rows) whatever the size of the test set;
    # the blocks change the memory, not the tables.
    test_block: int = setting(1024, check=INTEGER_AT_LEAST_1, digest=False, worker=True,
                              help="test examples scored at once per shard; bounds worker memory (default 1024)")
    gpus_per_worker: Optional[float] = setting(
        None, check=NOT_NEGATIVE, digest=False,
        help="GPUs per Ray worker (default: 1 if the cluster has GPUs, else 0)")
    workers: Optional[int] = setting(
        None, check=INTEGER_AT_LEAST_1, digest=False,
        help="Ray workers (default: one per GPU, or per CPU when there are no GPUs)")
    grad_tol: float = setting(1e-10, check=POSITIVE,
                              help="the head fit stops when max |grad J| <= this (default 1e-10)")
    max_iter: int = setting(
        1000, check=INTEGER_AT_LEAST_1,
        help="iteration cap of the head fit's L-BFGS fallback and of one Newton step's CG (at least 50; at most "
             "300 in the main Newton phase; default 1000)")
    input_shape: Optional[tuple] = setting(
        None, check=POSITIVE_INTEGERS, parse=parse_shape, worker=True,
        help="shape of one example for flat Parquet rows, e.g. 28,28,1 (default: the model's)")
    scale: Optional[float] = setting(
        None, check=POSITIVE, worker=True, source_option=True,
        help="factor applied to input values: Parquet 'image' bytes and IDX pixels (default 1/255), "
             "Parquet 'x' lists (default 1, unchanged)")
    resize: bool = setting(
        False, check=BOOLEAN, source_option=True,
        help="resize decoded images (PNG/JPEG in Parquet, TFRecord, image folders) to the model's input "
             "size, bilinear (default: a size mismatch is an error)")
    image_feature: Optional[str] = setting(
        None, check=NAME, source_option=True,
        help="TFRecord feature holding the image (default: 'image/encoded', else 'image')")
    label_feature: Optional[str] = setting(
        None, check=NAME, source_option=True,
        help="TFRecord feature holding the label (default: 'label', else 'image/class/label')")
    id_feature: Optional[str] = setting(
        None, check=NAME, source_option=True,
        help="TFRecord feature holding a string key per record (default: 'id' when present)")
    # How the bytes of a file are read, not which rows they hold; hashed only when set, so that
    # the settings digest of a run without it is the one it had before the flag existed.
    compression: Optional[str] = setting(
        None, choices=COMPRESSIONS, source_option=True, digest=UNLESS_DEFAULT,
        help="compression of every TFRecord file: gzip (as written with compression_type='GZIP', e.g. by "
             "TFDS or Beam) or none (default: by the file name, *.gz is gzip)")
    # Both paths give the same tables (pruning is exact, by a Cauchy–Schwarz bound).
    scoring: str = setting(
        "pruned", choices=SCORING, digest=False, worker=True,
        help="pruned (default): exact top-k from the few training rows whose bound |alpha|*|x_i|*|x_t| can "
             "reach it; dense: every (test, train) pair. Same tables")
    # Changes train_scores.influence_abs_sum (null or values) for signed features; hashed only when set,
    # so that the settings digest of a run without it is the one it had before the flag existed.
    abs_sums: bool = setting(
        False, check=BOOLEAN, worker=True, digest=UNLESS_DEFAULT,
        help="compute train_scores.influence_abs_sum even when features take negative values (then it needs "
             "every (test, train) pair: dense scoring). Default: with signed features it is left null and "
             "scoring stays pruned; with non-negative features it is always computed, in closed form")
    # Whether old results may be replaced is not a property of the new ones.
    overwrite: bool = setting(
        False, digest=False,
        help="replace results or partial results of a different job found in --out")
    # What is done with the results afterwards does not change them.
    report: bool = setting(
        False, check=BOOLEAN, digest=False,
        help="when the tables are written, also write the HTML report (OUT/report/index.html, suspects.csv)")

    def __post_init__(self) -> None:
        self.validate()
        if isinstance(self.input_shape, list):  # from Python or JSON: the tuple the flag's parser gives
            object.__setattr__(self, "input_shape", tuple(self.input_shape))

    def validate(self) -> None:
        """Refuses values that cannot give a meaningful result, with one clear line.

        Raises:
            ConfigError: a setting breaks its field's check (the first one, in field order), or
                asks for the report of an output on remote storage, which the report's page
                cannot be written beside.
        """
        check_all(self)
        if self.report:
            self._check_report()

    def _check_report(self) -> None:
        # Imported here: the storage helpers load pyarrow, which `--help` and a bad flag need not wait for.
        from distributed_influence.store import storage

        if storage.is_uri(self.out):
            raise ConfigError(f"--report writes its page beside the tables on this machine, and --out "
                              f"{storage.redact(self.out)} is remote storage: run `distributed-influence "
                              f"report` on a local copy instead")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (for the manifest and for shipping to workers)."""
        d = dataclasses.asdict(self)
        if d["input_shape"] is not None:
            d["input_shape"] = list(d["input_shape"])
        return d

    def digest(self) -> str:
        """Hash of the settings that change the numbers (not where they are written).

        Resumed runs find their work by it (``OUT/_work/<run key>``), so it must not change for
        the same settings: the fields marked ``digest=False`` are left out, those marked
        ``UNLESS_DEFAULT`` kept only when set, and the rest hashed
        as sorted JSON, exactly as before the settings were declared as fields.
        """
        d = self.to_dict()
        kept = {name: d[name] for name in names(type(self), digest=True)}
        kept.update({f.name: d[f.name] for f in select(type(self), digest=UNLESS_DEFAULT)
                     if getattr(self, f.name) != f.default})
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
