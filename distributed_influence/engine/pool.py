"""What the stages run shards on: the :class:`Pool` interface, and the in-process pool.

A *pool* runs one method of :class:`~distributed_influence.engine.shard.ShardWorker` for every
shard and returns the results in shard order. The stages (:mod:`distributed_influence.engine.job`)
are written against :class:`Pool` only, so the same code drives :class:`InProcessPool` (the
single-process engine, and the oracle of the tests) and
:class:`~distributed_influence.cluster.pool.RayPool` (Ray actors). This module imports nothing
of ``cluster/``: the single-process engine needs no Ray.
"""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Protocol, Sequence

from distributed_influence.engine.plan import ShardSpec, WorkerSettings


class Pool(Protocol):
    """The calls the stages make on a pool, whichever runs the shards.

    Attributes:
        backend: ``"in-process"`` or ``"ray"``, for the manifest.
        n_workers: workers the shards are spread over; the test features are cut in as many
            parts, one per worker.
    """

    backend: str
    n_workers: int

    def put(self, value):
        """``value`` as the workers will receive it: a reference to one shared copy, or itself."""

    def map(self, method: str, specs: Sequence[ShardSpec], *shared, desc: Optional[str] = None,
            on_result: Optional[Callable] = None) -> list:
        """``method(spec, *shared)`` for every shard, results in shard order;
        ``on_result(spec, result)`` as each finishes, so the caller can persist it at once."""

    def call_all(self, method: str, args_per_worker: List[tuple]) -> list:
        """``method(*args)`` for every entry, entry ``p`` on worker ``p``; results in order."""

    def map_summed(self, method: str, specs: Sequence[ShardSpec], *shared) -> list:
        """Sums of ``method`` over the shards, one or more partial sums: their total is the sum
        over every shard (see ``ShardWorker.summed``)."""

    def featurize(self, specs: Sequence[ShardSpec], test_ranges: List[tuple], desc: Optional[str] = None):
        """``prepare`` of every shard and ``featurize_test`` of every test range.

        Returns:
            (``prepare``'s results in shard order, the test parts ({x, logits}: values or references),
            the small values of ``featurize_test``), ranges in the order given.
        """

    def release(self) -> None:
        """Every worker drops its shards' data before the reduce."""

    def run_functions(self, calls: List[tuple], on_result: Optional[Callable] = None) -> list:
        """``fn(*args)`` for every (fn, args), results in call order; ``on_result(i, result)``
        as each finishes."""

    def devices(self) -> list:
        """What each worker was given (GPUs, node), for the manifest; empty in process."""

    def recovery(self) -> dict:
        """What was lost and redone so far: the manifest's ``recovery`` section, with the keys
        of :func:`empty_recovery`."""

    def shutdown(self) -> None:
        """Ends the workers; the pool is not used afterwards."""


def empty_recovery() -> dict:
    """The manifest's ``recovery`` section of a run that lost nothing.

    One definition for both pools, so a run's manifest has the same keys whichever ran it.
    """
    return {"lost_workers": [], "lost_nodes": [], "restarted_workers": [], "moved_shards": [],
            "redone_calls": {}, "recomputed_test_parts": [], "wait_seconds": 0.0, "seconds": 0.0}


def progress_bar(total: Optional[int], desc: Optional[str], unit: str):
    """A progress bar on an interactive terminal; silent otherwise (logs carry the stages).

    ``desc=None`` disables it, for calls too frequent to show (one per fit evaluation).
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=desc is None or not sys.stderr.isatty(), leave=True)


class InProcessPool:
    """Runs every shard in this process, one after the other (a :class:`Pool`)."""

    backend = "in-process"

    def __init__(self, model_bytes: bytes, settings: WorkerSettings):
        from distributed_influence.engine.shard import ShardWorker

        self.worker = ShardWorker(model_bytes, settings)
        self.n_workers = 1

    def put(self, value):
        """The value itself: the worker shares this process's memory."""
        return value

    def map(self, method: str, specs: Sequence[ShardSpec], *shared, desc: Optional[str] = None,
            on_result: Optional[Callable] = None) -> list:
        """Calls ``method(spec, *shared)`` for every shard; results in shard order.

        ``on_result(spec, result)`` runs as each shard finishes (to persist it at once).
        """
        with progress_bar(sum(s.rows for s in specs), desc, "rows") as bar:
            out = []
            for spec in specs:
                out.append(getattr(self.worker, method)(spec, *shared))
                if on_result is not None:
                    on_result(spec, out[-1])
                bar.update(spec.rows)
        return out

    def call_all(self, method: str, args_per_worker: List[tuple]) -> list:
        """``method(*args)`` for every entry, on the one worker."""
        return [getattr(self.worker, method)(*args) for args in args_per_worker]

    def map_summed(self, method: str, specs: Sequence[ShardSpec], *shared) -> list:
        """The per-worker sums of ``method`` over the shards (see ``ShardWorker.summed``)."""
        return [self.worker.summed(method, list(specs), *shared)]

    def featurize(self, specs: Sequence[ShardSpec], test_ranges: List[tuple], desc: Optional[str] = None):
        """``prepare`` of every shard, then ``featurize_test`` of every test range (see
        :meth:`Pool.featurize`); the test features are the arrays themselves."""
        prepared = self.map("prepare", specs, desc=desc)
        out = [self.worker.featurize_test(a, b) for a, b in test_ranges]
        return prepared, [o[0] for o in out], [o[1] for o in out]

    def release(self) -> None:
        """The worker drops its shards' data."""
        self.worker.release()

    def run_functions(self, calls: List[tuple], on_result: Optional[Callable] = None) -> list:
        """``fn(*args)`` for every (fn, args), one after the other; ``on_result(i, result)`` as
        each finishes."""
        out = []
        for i, (fn, args) in enumerate(calls):
            out.append(fn(*args))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def devices(self) -> list:
        """No workers of their own: nothing to report."""
        return []

    def recovery(self) -> dict:
        """Nothing to recover in one process: the empty section."""
        return empty_recovery()

    def shutdown(self) -> None:
        """Nothing to end."""
