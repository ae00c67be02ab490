"""Ray at the edge: the worker actor, device setup, and the pools that drive shards.

A *pool* runs one method of :class:`~distributed_influence.shard.ShardWorker` for every
shard and returns the results in shard order. :class:`InProcessPool` calls a worker in this
process (the single-process engine, and the oracle of the tests); :class:`RayPool` calls Ray
actors, one per GPU or CPU slot, each owning the shards ``i ≡ w (mod workers)``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, List, Optional, Sequence

from .errors import InfluenceError
from .shard import ShardSpec, ShardWorker, WorkerSettings

log = logging.getLogger(__name__)

#: Times Ray restarts a dead worker actor (and re-runs its call) before the job fails.
MAX_RESTARTS = 3
#: Shared call arguments larger than this are put in the object store once, not sent per call.
INLINE_BYTES = 1 << 20


def configure_devices(num_gpus: float, num_cpus: float) -> dict:
    """Sets TensorFlow's devices for a worker before it runs any op.

    Ray gives an actor with ``num_gpus`` its own GPUs through ``CUDA_VISIBLE_DEVICES``. On such
    workers TensorFlow must grow memory on demand (several stages share the GPU); CPU-only
    workers must not see any GPU at all, or TensorFlow would grab memory on GPUs that Ray gave
    to other workers. Threads follow the CPUs Ray granted, so workers do not oversubscribe cores.

    Returns:
        What the worker sees: Ray's GPU ids, ``CUDA_VISIBLE_DEVICES`` and TensorFlow's GPUs.
    """
    if not num_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from .tfimport import import_tensorflow

    tf = import_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    try:
        if not num_gpus:
            tf.config.set_visible_devices([], "GPU")
        else:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
        threads = max(1, int(num_cpus))
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError as exc:  # TensorFlow already initialised in this process
        log.warning("device configuration skipped: %s", exc)
    gpu_ids: list = []
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - outside a Ray worker there are no Ray GPU ids
        gpu_ids = []
    return {
        "ray_gpu_ids": gpu_ids,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "tf_gpus": [g.name for g in tf.config.get_visible_devices("GPU")],
        "pid": os.getpid(),
    }


class WorkerActor(ShardWorker):
    """The Ray actor: a :class:`ShardWorker` with its devices set up first."""

    def __init__(self, model_bytes: bytes, settings: WorkerSettings, num_gpus: float, num_cpus: float):
        self.devices = configure_devices(num_gpus, num_cpus)
        super().__init__(model_bytes, settings)

    def device_info(self) -> dict:
        from .shard import _node_id

        return {**self.devices, "node": _node_id()}


def progress_bar(total: Optional[int], desc: Optional[str], unit: str):
    """A progress bar on an interactive terminal; silent otherwise (logs carry the stages).

    ``desc=None`` disables it, for calls too frequent to show (one per fit evaluation).
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=desc is None or not sys.stderr.isatty(), leave=True)


class InProcessPool:
    """Runs every shard in this process, one after the other."""

    backend = "in-process"

    def __init__(self, model_bytes: bytes, settings: WorkerSettings):
        self.worker = ShardWorker(model_bytes, settings)
        self.n_workers = 1

    def put(self, value):
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
        return [getattr(self.worker, method)(*args) for args in args_per_worker]

    def map_summed(self, method: str, specs: Sequence[ShardSpec], *shared) -> list:
        """The per-worker sums of ``method`` over the shards (see ``ShardWorker.summed``)."""
        return [self.worker.summed(method, list(specs), *shared)]

    def call_split(self, method: str, args_per_worker: List[tuple]):
        """Like :meth:`call_all` for methods returning (big, small): two lists."""
        out = self.call_all(method, args_per_worker)
        return [o[0] for o in out], [o[1] for o in out]

    def devices(self) -> list:
        return []

    def shutdown(self) -> None:
        pass


class RayPool:
    """Ray actors that keep the model and their shards' features across stages."""

    backend = "ray"

    def __init__(self, model_bytes: bytes, settings: WorkerSettings, n_workers: int,
                 num_cpus: float, num_gpus: float):
        import ray

        self._ray = ray
        # Shipped once through the object store; the pool holds the reference so that Ray can
        # rerun the constructor of an actor it restarts after a worker or node was lost.
        self._model_ref = ray.put(model_bytes)
        actor = ray.remote(WorkerActor)
        self.actors = [
            actor.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=MAX_RESTARTS,
                          max_task_retries=MAX_RESTARTS).remote(self._model_ref, settings, num_gpus, num_cpus)
            for _ in range(n_workers)
        ]
        self.n_workers = n_workers

    def put(self, value):
        """Broadcast: stored once in the object store, read zero-copy by the workers."""
        return self._ray.put(value)

    def actor_for(self, spec: ShardSpec):
        return self.actors[spec.index % self.n_workers]

    def map(self, method: str, specs: Sequence[ShardSpec], *shared, desc: Optional[str] = None,
            on_result: Optional[Callable] = None) -> list:
        """Calls ``method(spec, *shared)`` on each shard's actor; results in shard order.

        Shared arguments are put in the object store once and passed by reference. Results
        stream back with ``ray.wait``; ``on_result(spec, result)`` runs as each one arrives.
        A worker that dies is restarted by Ray and its call re-run (``MAX_RESTARTS`` times).
        """
        ray = self._ray
        # Big shared arguments go to the object store once; small ones (Θ, a precision name)
        # travel inline with each call, which is cheaper than a put per fit evaluation.
        shared_refs = [ray.put(a) if getattr(a, "nbytes", 0) > INLINE_BYTES else a for a in shared]
        refs = [getattr(self.actor_for(s), method).remote(s, *shared_refs) for s in specs]
        if desc is None and on_result is None:
            return ray.get(refs)  # the fit's many small calls: one round trip, nothing to show
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        try:
            with progress_bar(sum(s.rows for s in specs), desc, "rows") as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    spec = specs[index[done[0]]]
                    result = ray.get(done[0])  # raises the first failure at once
                    if on_result is not None:
                        on_result(spec, result)
                    bar.update(spec.rows)
        except BaseException:
            # The job fails with the first error; the other calls are cancelled and their
            # outcome collected here, so Ray does not print their errors as unhandled.
            for ref in pending:
                ray.cancel(ref)
            try:
                ray.get(pending)
            except Exception:  # noqa: BLE001 - already failing with the first error
                pass
            raise
        return ray.get(refs)

    def call_all(self, method: str, args_per_worker: List[tuple]) -> list:
        refs = [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_worker)]
        return self._ray.get(refs)

    def map_summed(self, method: str, specs: Sequence[ShardSpec], *shared) -> list:
        """One call per worker, for all its shards: their results summed on the worker
        (``ShardWorker.summed``), so the fit receives one (d+1)×C sum per worker, not per shard."""
        ray = self._ray
        shared_refs = [ray.put(a) if getattr(a, "nbytes", 0) > INLINE_BYTES else a for a in shared]
        groups: dict = {}
        for s in specs:
            groups.setdefault(s.index % self.n_workers, []).append(s)
        refs = [self.actors[w].summed.remote(method, group, *shared_refs) for w, group in sorted(groups.items())]
        return ray.get(refs)

    def call_split(self, method: str, args_per_worker: List[tuple]):
        """Calls a method returning (big, small) on every worker: the big values stay in the
        object store (references are returned), only the small ones are fetched."""
        pairs = [getattr(a, method).options(num_returns=2).remote(*args)
                 for a, args in zip(self.actors, args_per_worker)]
        return [p[0] for p in pairs], self._ray.get([p[1] for p in pairs])

    def devices(self) -> list:
        """What each worker was given: Ray GPU ids, CUDA_VISIBLE_DEVICES, TensorFlow GPUs, node."""
        return self.call_all("device_info", [()] * self.n_workers)

    def shutdown(self) -> None:
        for a in self.actors:
            self._ray.kill(a)


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error (e.g. a bad row found by a worker)."""
    seen = exc
    for _ in range(5):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None or cause is seen:
            break
        seen = cause
        if isinstance(seen, InfluenceError):
            return seen
    return exc
