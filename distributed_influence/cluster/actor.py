"""The Ray actor that runs a shard worker, and what its process sets up first.

:class:`WorkerActor` wraps a :class:`~distributed_influence.engine.shard.ShardWorker` for Ray:
before the worker runs any op, TensorFlow's devices and threads follow what Ray granted the
actor, and the C allocator is told to give large freed blocks back to the system, so that a
long-lived worker's resident memory follows what it uses. The pools that drive these actors are
in :mod:`distributed_influence.cluster.pool`.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from distributed_influence.engine.plan import ShardSpec, WorkerSettings

log = logging.getLogger(__name__)


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
    from distributed_influence.tfimport import import_tensorflow

    tf = import_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    threads = max(1, int(num_cpus))
    try:
        if not num_gpus:
            tf.config.set_visible_devices([], "GPU")
        else:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError as exc:  # TensorFlow already initialised in this process
        log.warning("device configuration skipped: %s", exc)
    # NumPy's BLAS runs the fit's passes on CPU workers (cpu_sums): as many threads as CPUs.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")
    _map_large_allocations()
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


class WorkerActor:
    """The Ray actor: a :class:`~distributed_influence.engine.shard.ShardWorker` with its devices set
    up first.

    It holds the worker rather than subclassing it, so that the driver, which must have this
    class to create actors, never imports the workers' math (and TensorFlow with it).
    """

    def __init__(self, model_bytes: bytes, settings: WorkerSettings, num_gpus: float, num_cpus: float):
        # The model itself is loaded later, by the first call that needs it.
        self.devices = configure_devices(num_gpus, num_cpus)
        from distributed_influence.engine.shard import ShardWorker

        self.worker = ShardWorker(model_bytes, settings)

    def device_info(self) -> dict:
        """What the worker was given, and its node now: the manifest shows where shards ran."""
        from distributed_influence.engine.shard import _node_id

        return {**self.devices, "node": _node_id()}

    def ping(self) -> str:
        """Answers once the actor is up: its node (a restarted actor may be on another one)."""
        from distributed_influence.engine.shard import _node_id

        return _node_id() or ""

    def describe(self, check: bool) -> dict:
        return self.worker.describe(check)

    def featurize_test(self, start: int, stop: int):
        return self.worker.featurize_test(start, stop)

    def prepare(self, spec: ShardSpec) -> dict:
        return self.worker.prepare(spec)

    def objective(self, spec: ShardSpec, *args):
        return self.worker.objective(spec, *args)

    def hvp(self, spec: ShardSpec, *args):
        return self.worker.hvp(spec, *args)

    def summed(self, method: str, specs: list, *args):
        return self.worker.summed(method, specs, *args)

    def fidelity(self, spec: ShardSpec, *args):
        return self.worker.fidelity(spec, *args)

    def score(self, spec: ShardSpec, *args) -> dict:
        return self.worker.score(spec, *args)

    def score_partial(self, spec: ShardSpec, *args) -> dict:
        try:
            return self.worker.score_partial(spec, *args)
        finally:
            _release_free_memory()

    def release(self) -> None:
        """Drops the shards' data; the heap's free pages go back too, as the actor lives on to
        run the reduce."""
        self.worker.release()
        _release_free_memory()

    def reduce(self, fn: Callable, *args):
        """A function of the reduce stage (``reduce.reduce_test_range``/``reduce_train_range``)."""
        try:
            return fn(*args)
        finally:
            _release_free_memory()


#: Allocations at least this large get their own pages from the system, given back when freed.
MMAP_THRESHOLD = 4 << 20


def _map_large_allocations() -> None:
    """Fixes the C allocator's mmap threshold for this worker process (glibc; else nothing).

    glibc raises the threshold each time a mapped block is freed, after which the large
    per-shard arrays (α, logits, the fit's softmax) come from the heap and stay resident when
    freed: a worker of a large run then holds more memory than its shards need. A fixed
    threshold keeps those arrays mapped, so freeing them gives their pages back.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def _release_free_memory() -> None:
    """Returns the C heap's free pages to the system after a shard's scoring.

    A shard's scoring allocates large temporaries (α, per-class orders, top-k lists) that the
    C allocator keeps for reuse; across a worker's shards they would stay resident, memory the
    worker no longer uses. Linux (glibc) only; elsewhere nothing is done.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The C library when it is glibc (with mallopt and malloc_trim), else None."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
