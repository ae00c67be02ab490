"""The plan of a run, in plain Python: shards of the training rows and what a worker is told.

Kept apart from the workers' math (:mod:`shard`, which loads TensorFlow) so that the driver can
plan the run and start the workers without loading TensorFlow itself.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from distributed_influence.faults import Fault


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Rows [start, stop) of the training source."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(n_rows: int, n_shards: int) -> list:
    """Splits n_rows into at most n_shards contiguous, near-equal row ranges (none empty)."""
    n_shards = max(1, min(int(n_shards), int(n_rows)))
    bounds = np.linspace(0, n_rows, n_shards + 1).round().astype(int)
    return [ShardSpec(i, int(a), int(b)) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs to know of the job (picklable, small)."""

    model_name: str
    train: str
    test: str
    target: str
    lam: float
    k: int
    n_train: int
    batch_size: Optional[int]  # None: by input size
    test_block: int
    scoring: str = "pruned"  # pruned | dense (same tables; see scoring.py)
    feature_layer: Optional[str] = None
    logit_layer: Optional[str] = None
    input_shape: Optional[tuple] = None  # None: the model's own
    scale: Optional[float] = None
    index_dir: Optional[str] = None  # where score() writes the shard's train index
    source_options: Optional[dict] = None  # open_source options besides scale (resize, features)
    layouts: Optional[dict] = None  # {"train"|"test": Source.layout()} found once by the driver
    fault: Optional[Fault] = None  # test hook, see faults.py
