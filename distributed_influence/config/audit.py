"""The one configuration object of an audit, validated once.

Everything that changes the numbers of a result lives here, so the manifest can record it
and a resumed run can check that it is continuing the same job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

from distributed_influence.errors import ConfigError

TARGETS = ("labels", "predictions")
#: Scoring paths (see scoring.py): the same tables, pruned skips most (test, train) pairs.
SCORING = ("pruned", "dense")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """Settings of one audit.

    Attributes:
        model: path of the `.keras` model file.
        train: training source (path or URI; see :mod:`distributed_influence.data.sources`).
        test: test source whose predictions are explained.
        out: output directory for the Parquet tables and manifest.
        k: number of proponents and of opponents kept per test example.
        lam: L2 strength λ of the surrogate head fit; α scales as 1/λ.
        target: ``labels`` (one-hot training labels: what a label audit needs) or
            ``predictions`` (the model's softmax: highest fidelity to the model).
        shards: number of row-range shards of the training set; None derives it from the
            available workers.
        address: Ray address to join; None joins ``$RAY_ADDRESS`` when set, else starts Ray
            in-process on this machine.
        feature_layer: name of the layer whose output is the penultimate feature vector.
        logit_layer: name of the Dense layer producing the logits.
        batch_size: rows per forward pass; None picks it from the input size.
        test_block: test examples scored at once; a worker's scoring memory is
            O(test_block × shard rows) whatever the size of the test set.
        gpus_per_worker: GPUs per Ray worker; None means 1 when the cluster has GPUs, else 0.
        workers: number of Ray workers; None means one per GPU (or per CPU slot).
        grad_tol: the head fit stops when max |∇J| falls to this value.
        max_iter: iteration cap of the head fit's L-BFGS fallback and of one Newton step's CG.
        input_shape: shape of one example for sources that store flat rows; None takes the
            model's input shape.
        scale: factor applied to input values: Parquet `image` bytes and IDX pixels (default
            1/255), Parquet `x` lists (default 1).
        overwrite: replace results or partials of a different job found in ``out``.
        resize: resize decoded images (encoded Parquet, TFRecord, image folders) to the model's
            input size; off by default, and then a size mismatch is an error naming both sizes.
        image_feature: TFRecord feature of the image (default ``image/encoded`` or ``image``).
        label_feature: TFRecord feature of the label (default ``label`` or ``image/class/label``).
        id_feature: TFRecord feature of a string key per record (default ``id`` when present).
        scoring: ``pruned`` (default: exact top-k from a few percent of the pairs, by a
            Cauchy–Schwarz bound) or ``dense`` (every pair, the reference). The tables are the
            same, so it is not part of :meth:`digest`.
    """

    model: str
    train: str
    test: str
    out: str
    k: int = 10
    lam: float = 0.003
    target: str = "labels"
    shards: Optional[int] = None
    address: Optional[str] = None
    feature_layer: Optional[str] = None
    logit_layer: Optional[str] = None
    batch_size: Optional[int] = None  # None: by input size (model.auto_batch_size)
    test_block: int = 1024
    gpus_per_worker: Optional[float] = None
    workers: Optional[int] = None
    grad_tol: float = 1e-10
    max_iter: int = 1000
    input_shape: Optional[tuple] = None
    scale: Optional[float] = None
    overwrite: bool = False
    resize: bool = False
    image_feature: Optional[str] = None
    label_feature: Optional[str] = None
    id_feature: Optional[str] = None
    scoring: str = "pruned"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuses values that cannot give a meaningful result, with one clear line."""
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"--k must be an integer >= 1, got {self.k!r}")
        if not (self.lam > 0) or self.lam != self.lam or self.lam == float("inf"):
            raise ConfigError(f"--lam must be a finite number > 0, got {self.lam!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.shards is not None and (not isinstance(self.shards, int) or self.shards < 1):
            raise ConfigError(f"--shards must be an integer >= 1, got {self.shards!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"--workers must be an integer >= 1, got {self.workers!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.test_block, int) or self.test_block < 1:
            raise ConfigError(f"--test-block must be an integer >= 1, got {self.test_block!r}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker!r}")
        if not (self.grad_tol > 0):
            raise ConfigError(f"--grad-tol must be > 0, got {self.grad_tol!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"--max-iter must be an integer >= 1, got {self.max_iter!r}")
        if self.scoring not in SCORING:
            raise ConfigError(f"--scoring must be one of {', '.join(SCORING)}, got {self.scoring!r}")
        if self.scale is not None and not (self.scale > 0):
            raise ConfigError(f"--scale must be > 0, got {self.scale!r}")
        if self.input_shape is not None and (
            len(self.input_shape) == 0 or any(int(s) < 1 for s in self.input_shape)
        ):
            raise ConfigError(f"--input-shape must be positive integers, got {self.input_shape!r}")
        if not isinstance(self.resize, bool):
            raise ConfigError(f"--resize must be true or false, got {self.resize!r}")
        for flag, name in (("--image-feature", self.image_feature), ("--label-feature", self.label_feature),
                           ("--id-feature", self.id_feature)):
            if name is not None and (not isinstance(name, str) or not name.strip()):
                raise ConfigError(f"{flag} must be a non-empty feature name, got {name!r}")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (for the manifest and for shipping to workers)."""
        d = dataclasses.asdict(self)
        if d["input_shape"] is not None:
            d["input_shape"] = list(d["input_shape"])
        return d

    def digest(self) -> str:
        """Hash of the settings that change the numbers (not where they are written)."""
        d = self.to_dict()
        for key in ("out", "address", "workers", "gpus_per_worker", "overwrite", "batch_size", "test_block",
                    "scoring"):
            d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
