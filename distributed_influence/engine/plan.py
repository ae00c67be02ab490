"""The plan of a run, in plain Python: shards of the training rows and what a worker is told.

Kept apart from the workers' math (:mod:`distributed_influence.engine.shard`, which loads TensorFlow) so that the driver can
plan the run and start the workers without loading TensorFlow itself.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from distributed_influence.config import AuditConfig, fields


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


#: The settings a worker takes from the audit's: the :class:`AuditConfig` fields marked
#: ``worker=True``, with their types and defaults, so that a new one needs no edit here.
WorkerConfig = fields.subset(AuditConfig, "WorkerConfig", __name__,
                             "The settings of an audit that its workers need.", worker=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerSettings(WorkerConfig):
    """What a worker needs to know of the job (picklable, small).

    The settings come from the configuration (:class:`WorkerConfig`, see :meth:`from_config`);
    the fields below are what the run itself found out or decided.
    """

    model_name: str
    n_train: int
    index_dir: Optional[str] = None  # where score() writes the shard's train index
    source_options: Optional[dict] = None  # open_source options besides scale (resize, features)
    layouts: Optional[dict] = None  # {"train"|"test": Source.layout()} found once by the driver

    @classmethod
    def from_config(cls, config: AuditConfig, **run) -> "WorkerSettings":
        """The worker settings of ``config``, with the run's values ``run``.

        Args:
            config: the audit's validated settings; every field marked for workers is copied.
            **run: the fields of this class, and any setting the run replaces (e.g. the
                sources as absolute paths, for workers in another working directory).
        """
        return cls(**{**fields.values(config, WorkerConfig), **run})
