"""Ray at the edge: the worker actor, device setup, and the pools that drive shards.

A *pool* runs one method of :class:`~distributed_influence.engine.shard.ShardWorker` for every
shard and returns the results in shard order. :class:`InProcessPool` calls a worker in this
process (the single-process engine, and the oracle of the tests); :class:`RayPool` calls Ray
actors, one per GPU or CPU slot, each owning the shards ``i ≡ w (mod workers)`` until a worker
is lost for good: then its shards move to the survivors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from distributed_influence import faults
from distributed_influence.engine.plan import ShardSpec, WorkerSettings
from distributed_influence.errors import ClusterError, InfluenceError
from distributed_influence.quiet import native_stderr_off

log = logging.getLogger(__name__)

#: Times Ray restarts a worker actor whose process died (in place, or on a node with room).
MAX_RESTARTS = 3
#: Seconds a worker whose call failed may take to come back (Ray restarting it, a replacement
#: node) before it is given up and its shards move to the other workers.
RESTART_WAIT = 30.0
#: Seconds between two pings of a worker that is not back yet.
PING_INTERVAL = 0.5
#: A unit of work (a shard, a part of the test features) whose worker was lost this many times
#: while on it stops the job: something in its data takes workers down.
MAX_SHARD_LOSSES = 3
#: Moving a lost worker's shards to the others; False (for tests only) fails the job instead.
REASSIGN_LOST_SHARDS = True
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

        self.settings = settings
        self.worker = ShardWorker(model_bytes, settings)

    def device_info(self) -> dict:
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

    # The shard methods, behind the test hook that holds a call while a test removes its node.
    def prepare(self, spec: ShardSpec) -> dict:
        self._hold("prepare", spec)
        return self.worker.prepare(spec)

    def objective(self, spec: ShardSpec, *args):
        self._hold("objective", spec)
        return self.worker.objective(spec, *args)

    def hvp(self, spec: ShardSpec, *args):
        self._hold("hvp", spec)
        return self.worker.hvp(spec, *args)

    def summed(self, method: str, specs: list, *args):
        return self.worker.summed(method, specs, *args, before=self._hold)

    def fidelity(self, spec: ShardSpec, *args):
        return self.worker.fidelity(spec, *args)

    def score(self, spec: ShardSpec, *args) -> dict:
        self._hold("score", spec)
        return self.worker.score(spec, *args)

    def score_partial(self, spec: ShardSpec, *args) -> dict:
        self._hold("score", spec)
        try:
            return self.worker.score_partial(spec, *args)
        finally:
            _release_free_memory()

    def release(self) -> None:
        self.worker.release()
        _release_free_memory()

    def reduce(self, fn: Callable, *args):
        """A function of the reduce stage (``reduce.reduce_test_range``/``reduce_train_range``)."""
        try:
            return fn(*args)
        finally:
            _release_free_memory()

    def _hold(self, method: str, spec: ShardSpec) -> None:
        if self.settings.fault is not None:
            faults.maybe_hold(self.settings.fault, method, spec.index, self.ping())


#: Allocations at least this large get their own pages from the system, given back when freed.
MMAP_THRESHOLD = 4 << 20


def _map_large_allocations() -> None:
    """Fixes the C allocator's mmap threshold for this worker process (glibc; else nothing).

    glibc raises the threshold each time a mapped block is freed, after which the per-shard
    arrays of tens of MB (α, logits, the fit's softmax) come from the heap and stay resident
    when freed: measured, a worker of the million-row scale run peaked above its budget.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def _release_free_memory() -> None:
    """Returns the C heap's free pages to the system after a shard's scoring.

    A shard's scoring allocates a few hundred MB of temporaries (α, per-class orders, top-k
    lists) that the C allocator keeps for reuse; across a worker's shards that showed as resident
    memory the worker no longer used. Linux (glibc) only; elsewhere nothing is done.
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
        from distributed_influence.engine.shard import ShardWorker

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

    def featurize(self, specs: Sequence[ShardSpec], test_ranges: List[tuple], desc: Optional[str] = None):
        """``prepare`` of every shard, then ``featurize_test`` of every test range (see
        :meth:`RayPool.featurize`)."""
        prepared = self.map("prepare", specs, desc=desc)
        out = [self.worker.featurize_test(a, b) for a, b in test_ranges]
        return prepared, [o[0] for o in out], [o[1] for o in out]

    def release(self) -> None:
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
        return []

    def recovery(self) -> dict:
        return _empty_recovery()

    def shutdown(self) -> None:
        pass


def _empty_recovery() -> dict:
    return {"lost_workers": [], "lost_nodes": [], "restarted_workers": [], "moved_shards": [],
            "redone_calls": {}, "recomputed_test_parts": [], "wait_seconds": 0.0, "seconds": 0.0}


@dataclasses.dataclass(eq=False)
class _Call:
    """One call of a run on the pool: what to call, for what, and where it stands."""

    method: str
    args: tuple
    key: tuple  # ("shard", i), ("part", p), ("call", p) or ("worker", w): the unit of work
    pos: Optional[int]  # its place in the run's results; None for a recomputed test part
    rows: int = 0
    what: str = ""  # for messages: "shard 4 (training rows 400-500)"
    num_returns: int = 1
    movable: bool = True  # False: only its own worker can answer (device information)
    worker: int = -1
    refs: object = None
    losses: int = 0  # times the worker died while running this very call
    seq: int = 0  # submission order: an actor runs its calls in this order
    replaces: Optional[str] = None  # a recomputed test part: the hex of the lost reference

    @property
    def ref(self):
        """The reference to wait on: the small second value of a (big, small) call."""
        return self.refs[-1] if self.num_returns > 1 else self.refs


@dataclasses.dataclass(eq=False)
class _Suspect:
    """A worker whose call failed: pinged until it answers (restarted) or the wait runs out."""

    since: float
    deadline: float
    error: BaseException
    parked: list
    next_ping: float
    ping: object = None

    @property
    def running(self) -> "_Call":
        """The call the worker was on: an actor runs its calls in the order they were sent, and
        those queued behind it fail with it, in any order."""
        return min(self.parked, key=lambda call: call.seq)

    @property
    def method(self) -> str:
        return _public(self.running)[0]


class RayPool:
    """Ray actors that keep the model and their shards' features across stages.

    Shard ``i`` starts on worker ``i mod workers``. A call that fails because its worker went
    away (the process died, or its node) makes that worker *suspect*: it is pinged for up to
    :data:`RESTART_WAIT` seconds, and if Ray restarts it meanwhile (in place, or on a node
    with room) the call is re-run there. Otherwise, or as soon as Ray reports its node dead
    while no node has room for it, the worker is given up: its shards move to
    the surviving workers, which featurize those rows from storage on demand, and every call
    it owed is re-run on them. Test features that lived in the lost node's object store are
    recomputed where they are needed. Results already received are kept; a stage returns
    only when every shard has answered, so a sum never lacks a shard.
    """

    backend = "ray"

    def __init__(self, model_bytes: bytes, settings: WorkerSettings, n_workers: int,
                 num_cpus: float, num_gpus: float):
        import ray

        self._ray = ray
        # Shipped once through the object store; the pool holds the reference so that Ray can
        # rerun the constructor of an actor it restarts after a worker or node was lost.
        self._model_ref = ray.put(model_bytes)
        actor = ray.remote(WorkerActor)
        # Ray restarts a dead actor, but its calls are re-run here (max_task_retries=0): Ray
        # would otherwise queue them for an actor that no node has room for, without end.
        # Ray's core worker writes a warning line to stderr for an actor with restarts and a
        # constructor argument in the object store (the argument could be gone by a restart;
        # this pool holds the reference as long as the actors live), kept off the command line.
        with native_stderr_off():
            self.actors = [
                actor.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=MAX_RESTARTS,
                              max_task_retries=0).remote(self._model_ref, settings, num_gpus, num_cpus)
                for _ in range(n_workers)
            ]
        self.n_workers = n_workers
        self._demand = (float(num_cpus), float(num_gpus))  # what a restarted worker needs
        self.dead: set = set()
        self._suspects: Dict[int, _Suspect] = {}
        self._home: Dict[tuple, int] = {}  # units of work moved off their first worker
        self._shard_keys: set = set()
        self._nodes: list = [a.ping.remote() for a in self.actors]  # answered once each is up
        self._parts: Dict[str, _Call] = {}  # hex of a (big) test-feature part → the call making it
        self._subst: Dict[str, object] = {}  # hex of a lost part → its recomputed reference
        self._part_waiters: Dict[str, list] = {}
        self._recovery = _empty_recovery()
        self._seq = 0

    def put(self, value):
        """Broadcast: stored once in the object store, read zero-copy by the workers."""
        return self._ray.put(value)

    def map(self, method: str, specs: Sequence[ShardSpec], *shared, desc: Optional[str] = None,
            on_result: Optional[Callable] = None) -> list:
        """Calls ``method(spec, *shared)`` on each shard's actor; results in shard order.

        Shared arguments are put in the object store once and passed by reference. Results
        stream back with ``ray.wait``; ``on_result(spec, result)`` runs as each one arrives.
        A call whose worker is lost is re-run (see the class); one that fails for any other
        reason fails the job at once.
        """
        ray = self._ray
        # Big shared arguments go to the object store once; small ones (Θ, a precision name)
        # travel inline with each call, which is cheaper than a put per fit evaluation.
        shared_refs = tuple(ray.put(a) if getattr(a, "nbytes", 0) > INLINE_BYTES else a for a in shared)
        calls = self._shard_calls(method, specs, shared_refs)
        report = None if on_result is None else (lambda c, value: on_result(specs[c.pos], value))
        return self._run(calls, desc, report)

    def _shard_calls(self, method: str, specs: Sequence[ShardSpec], shared: tuple) -> List["_Call"]:
        """``method(spec, *shared)`` for each shard, at positions 0.., its key known to the pool
        (a lost worker's shards move)."""
        calls = [_Call(method, (s, *shared), ("shard", s.index), i, rows=s.rows,
                       what=f"shard {s.index} (training rows {s.start}-{s.stop})")
                 for i, s in enumerate(specs)]
        self._shard_keys.update(c.key for c in calls)
        return calls

    def call_all(self, method: str, args_per_worker: List[tuple]) -> list:
        """``method(*args)`` once for each entry, entry ``p`` on worker ``p`` while it lives."""
        calls = [_Call(method, tuple(args), ("call", p), p, what=f"{method} {p}")
                 for p, args in enumerate(args_per_worker)]
        return self._run(calls)

    def describe(self) -> dict:
        """The model as worker 0 describes it, the sources checked against it there (see
        ``ShardWorker.describe``); the other workers load the model meanwhile."""
        return self.call_all("describe", [(p == 0,) for p in range(self.n_workers)])[0]

    def map_summed(self, method: str, specs: Sequence[ShardSpec], *shared) -> list:
        """One call per worker, for all its shards: their results summed on the worker
        (``ShardWorker.summed``), so the fit receives one (d+1)×C sum per worker, not per shard.

        A worker's sum is only meaningful whole: if the worker is given up during the call, the
        call has no answer and its shards, moved to the survivors, answer one by one
        (:meth:`map`), so a sum never lacks a shard. A worker that Ray brings back re-runs it.
        """
        ray = self._ray
        shared_refs = tuple(ray.put(a) if getattr(a, "nbytes", 0) > INLINE_BYTES else a for a in shared)
        groups: dict = {}
        for s in specs:
            self._shard_keys.add(("shard", s.index))
            groups.setdefault(self._worker_for(("shard", s.index)), []).append(s)
        order = sorted(groups.items())
        calls = [_Call("summed", (method, group, *shared_refs), ("worker", w), i, movable=False, worker=w,
                       what=f"{method} of shards {[s.index for s in group]}")
                 for i, (w, group) in enumerate(order)]
        out = self._run(calls)
        lost = [s for (_, group), r in zip(order, out) if r is None for s in group]
        summed = [r for r in out if r is not None]
        if not lost:
            return summed
        self._recovery["redone_calls"].setdefault(method, []).extend(s.index for s in lost)
        return summed + self.map(method, lost, *shared)

    def featurize(self, specs: Sequence[ShardSpec], test_ranges: List[tuple], desc: Optional[str] = None):
        """``prepare`` of every shard and ``featurize_test`` of every test range, as one run.

        Range ``p`` goes to worker ``p`` (while it lives). A worker goes on to its test range as
        soon as its own shards are done, rather than every worker waiting for the slowest shard
        first: on the 2-core benchmark two equal shards took 3.4 and 4.1 s.

        The test features stay in the object store (references are returned), only the small
        values are fetched. Should their node be lost later, a call that cannot read one has it
        recomputed by a surviving worker (see :meth:`_on_lost_object`).

        Returns:
            (``prepare``'s results in shard order, the test features' references, the small
            values of ``featurize_test``), ranges in the order given.
        """
        calls = self._shard_calls("prepare", specs, ())
        parts = [_Call("featurize_test", (a, b), ("part", p), len(calls) + p, rows=b - a, num_returns=2,
                       what=f"featurize_test({a}, {b})") for p, (a, b) in enumerate(test_ranges)]
        out = self._run(calls + parts, desc)
        return out[:len(calls)], [c.refs[0] for c in parts], out[len(calls):]

    def _on_each_worker(self, method: str) -> list:
        """``method()`` once on every surviving worker (only that worker can answer)."""
        calls = [_Call(method, (), ("worker", w), i, movable=False, worker=w)
                 for i, w in enumerate(w for w in range(self.n_workers) if w not in self.dead)]
        return self._run(calls)

    def devices(self) -> list:
        """What each surviving worker was given: Ray GPU ids, CUDA_VISIBLE_DEVICES, TensorFlow
        GPUs, node."""
        return [d for d in self._on_each_worker("device_info") if d is not None]

    def release(self) -> None:
        """Every surviving worker drops its shards (their features and the fit's state)."""
        self._on_each_worker("release")

    def run_functions(self, calls: List[tuple], on_result: Optional[Callable] = None) -> list:
        """``fn(*args)`` for every (fn, args) of ``calls`` (module-level functions: the reduce's),
        spread over the workers; a call whose worker is lost is re-run like any other (see the
        class). ``on_result(i, result)`` runs as each finishes; results in call order.

        The workers are one per CPU slot (or GPU): the reduce runs as wide as they are.
        """
        jobs = [_Call("reduce", (fn, *args), ("call", i), i, what=f"{fn.__name__} {i}")
                for i, (fn, args) in enumerate(calls)]
        report = None if on_result is None else (lambda c, value: on_result(c.pos, value))
        return self._run(jobs, None, report)

    def recovery(self) -> dict:
        """What was lost and redone so far (the manifest's ``recovery`` section)."""
        rec = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
               for k, v in self._recovery.items()}
        rec["wait_seconds"] = round(rec["wait_seconds"], 3)
        rec["seconds"] = round(rec["seconds"], 3)
        return rec

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass

    # ------------------------------------------------------------------ running and recovering
    def _worker_for(self, key: tuple) -> int:
        """The worker that owns a unit of work: its first one, or where it moved."""
        w = self._home.get(key, key[1] % self.n_workers)
        if w in self.dead:
            w = self._move(key, w)
        return w

    def _move(self, key: tuple, lost: int) -> int:
        """Moves a unit of work off a lost worker, to the survivor with the fewest shards."""
        alive = [w for w in range(self.n_workers) if w not in self.dead]
        load = {w: 0 for w in alive}
        for k in self._shard_keys:
            home = self._home.get(k, k[1] % self.n_workers)
            if home in load:
                load[home] += 1
        to = min(alive, key=lambda w: (load[w], w))
        self._home[key] = to
        if key[0] == "shard":
            self._recovery["moved_shards"].append({"shard": key[1], "from": lost, "to": to})
        return to

    def _fresh(self, arg):
        """An argument with every lost test-feature part replaced by its recomputed one."""
        ObjectRef = self._ray.ObjectRef
        if not self._subst:
            return arg
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._fresh(a) for a in arg)
        while isinstance(arg, ObjectRef) and arg.hex() in self._subst:
            arg = self._subst[arg.hex()]
        return arg

    def _submit(self, c: _Call, pending: Optional[dict] = None) -> None:
        if c.movable:
            c.worker = self._worker_for(c.key)
        method = getattr(self.actors[c.worker], c.method)
        if c.num_returns != 1:
            method = method.options(num_returns=c.num_returns)
        c.refs = method.remote(*(self._fresh(a) for a in c.args))
        self._seq += 1
        c.seq = self._seq
        if c.num_returns > 1:  # a test-feature part: how to make it again, should it be lost
            self._parts[c.refs[0].hex()] = c
        if pending is not None:
            pending[c.ref] = c

    def _redo(self, c: _Call, pending: dict) -> None:
        """Issues a call again (on its worker, or where its work moved) and records it."""
        method, units = _public(c)
        self._recovery["redone_calls"].setdefault(method, []).extend(units)
        self._submit(c, pending)

    def _run(self, calls: List[_Call], desc: Optional[str] = None,
             on_result: Optional[Callable] = None) -> list:
        """Runs the calls to completion, recovering lost workers; results in call order."""
        ray = self._ray
        for c in calls:
            self._submit(c)
        if desc is None and on_result is None:
            # The fit's many small calls: one round trip when nothing goes wrong.
            try:
                return ray.get([c.ref for c in calls])
            except Exception as exc:  # noqa: BLE001 - sorted out call by call below
                if not self._recoverable(exc):
                    self._abandon({c.ref: c for c in calls}, [])
                    raise
        results: list = [None] * len(calls)
        pending = {c.ref: c for c in calls}
        t_first: list = []  # when the first loss of this run was seen
        try:
            with progress_bar(sum(c.rows for c in calls), desc, "rows") as bar:
                while pending or self._suspects or self._part_waiters:
                    probes = {s.ping: w for w, s in self._suspects.items() if s.ping is not None}
                    timeout = PING_INTERVAL / 2 if self._suspects else None
                    waiting = list(pending) + list(probes)
                    if waiting:
                        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
                    else:  # only a suspect worker's next ping to wait for
                        ready = []
                        time.sleep(PING_INTERVAL / 2)
                    for ref in ready:
                        if ref in probes:
                            self._on_ping(probes[ref], ref, pending)
                            continue
                        c = pending.pop(ref)
                        try:
                            value = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - raised again unless recoverable
                            if not t_first:
                                t_first.append(time.perf_counter())
                            self._on_failure(c, exc, pending)
                            continue
                        if c.replaces is not None:
                            self._part_recomputed(c, pending)
                            continue
                        results[c.pos] = value
                        if on_result is not None:
                            on_result(c, value)
                        bar.update(c.rows)
                    self._tick(pending)
        except BaseException:
            self._abandon(pending, [c for s in self._suspects.values() for c in s.parked])
            self._suspects.clear()
            self._part_waiters.clear()
            raise
        if t_first:
            self._recovery["seconds"] += time.perf_counter() - t_first[0]
        return results

    def _abandon(self, pending: dict, parked: list) -> None:
        """The job fails with the first error: the other calls are cancelled and their
        outcome collected, so Ray does not print their errors as unhandled."""
        del parked  # never submitted again
        for ref in pending:
            self._ray.cancel(ref)
        for ref in pending:
            try:
                self._ray.get(ref)
            except Exception:  # noqa: BLE001 - already failing with the first error
                pass

    @staticmethod
    def _recoverable(exc: BaseException) -> bool:
        from ray.exceptions import RayActorError

        if isinstance(exc, RayActorError):
            return not exc.actor_init_failed
        return REASSIGN_LOST_SHARDS and _lost_object(exc) is not None

    def _on_failure(self, c: _Call, exc: BaseException, pending: dict) -> None:
        """A call failed: its worker is suspect, or a test-feature part it reads was lost;
        anything else (a bad row, a bug) is raised at once."""
        if not self._recoverable(exc):
            raise exc
        lost = _lost_object(exc)
        from ray.exceptions import RayActorError

        if not isinstance(exc, RayActorError) and lost is not None and lost not in _hexes(c.refs):
            self._on_lost_object(c, lost, exc, pending)
            return
        # The worker went away while on this call or before it (or the call's result was on
        # its node): re-run where it moved, or once the worker's fate is known.
        if c.worker in self.dead:
            if c.movable:
                self._redo(c, pending)
            return  # a question only that worker could answer: no answer
        s = self._suspects.get(c.worker)
        if s is None:
            now = time.perf_counter()
            s = self._suspects[c.worker] = _Suspect(now, now + RESTART_WAIT, exc, [], now)
            log.info("worker %d: %s during %s; waiting up to %g s for Ray to bring it back",
                     c.worker, type(exc).__name__, c.method, RESTART_WAIT)
        s.parked.append(c)

    def _on_lost_object(self, c: _Call, lost: str, exc: BaseException, pending: dict) -> None:
        """A call could not read a test-feature part (its node is gone): the part is computed
        again by a live worker, then the call is re-run with it."""
        if lost in self._subst:  # already recomputed since this call was issued
            self._redo(c, pending)
            return
        source = self._parts.get(lost)
        if source is None:
            raise exc  # not an object this pool can make again
        waiters = self._part_waiters.setdefault(lost, [])
        waiters.append(c)
        if len(waiters) > 1:
            return  # already being recomputed
        redone = [p for p in self._recovery["recomputed_test_parts"] if p["part"] == source.key[1]]
        if len(redone) + 1 >= MAX_SHARD_LOSSES:
            raise ClusterError(f"{source.what}: its results were lost {len(redone) + 1} times; stopping. "
                               "Finished work is kept: run the same command again to resume")
        again = _Call(source.method, source.args, source.key, None, what=source.what,
                      num_returns=source.num_returns, replaces=lost)
        self._submit(again, pending)
        log.warning("%s: its output was lost with its node; computing it again on worker %d",
                    source.what, again.worker)

    def _part_recomputed(self, c: _Call, pending: dict) -> None:
        self._subst[c.replaces] = c.refs[0]
        self._recovery["recomputed_test_parts"].append(
            {"part": c.key[1], "args": [int(a) if isinstance(a, (int, np.integer)) else str(a) for a in c.args],
             "worker": c.worker})
        for waiter in self._part_waiters.pop(c.replaces, []):
            self._redo(waiter, pending)

    def _tick(self, pending: dict) -> None:
        """Pings suspect workers that are due; gives up those whose wait ran out."""
        now = time.perf_counter()
        for w, s in list(self._suspects.items()):
            if now >= s.deadline:
                self._give_up(w, pending, f"not back within {RESTART_WAIT:g} s")
            elif s.ping is None and now >= s.next_ping:
                s.ping = self.actors[w].ping.remote()

    def _on_ping(self, w: int, ref, pending: dict) -> None:
        from ray.exceptions import ActorDiedError, RayActorError

        s = self._suspects[w]
        s.ping = None
        try:
            node = self._ray.get(ref)
        except RayActorError as exc:
            if isinstance(exc, ActorDiedError):  # dead for good: no restart will come
                self._give_up(w, pending, "dead for good")
            elif self._nowhere_to_restart(w):
                self._give_up(w, pending, "its node is gone and no other node has room")
            else:  # restarting, or not reachable yet
                s.next_ping = time.perf_counter() + PING_INTERVAL
            return
        del self._suspects[w]
        waited = time.perf_counter() - s.since
        old = self._node_of(w)
        self._blame(s, node_gone=bool(old) and old != node and not _node_alive(self._ray, old))
        self._nodes[w] = node
        self._recovery["restarted_workers"].append({"worker": w, "node": node, "seconds": round(waited, 3)})
        self._recovery["wait_seconds"] += waited
        log.warning("worker %d is back after %.1f s (restarted by Ray, node %s): re-running its %d calls there",
                    w, waited, _short(node), len(s.parked))
        for c in s.parked:
            self._redo(c, pending)

    def _blame(self, s: _Suspect, node_gone: bool) -> None:
        """Counts a worker's death against the call it was running, unless its node was lost.

        The call it was running is :attr:`_Suspect.running`. A unit of work that took its worker
        down :data:`MAX_SHARD_LOSSES` times (on whichever workers) stops the job.
        """
        if node_gone or not s.parked:
            return
        c = s.running
        c.losses += 1
        if c.losses >= MAX_SHARD_LOSSES:
            raise ClusterError(
                f"{c.what or c.method}: the worker running it died {c.losses} times (last: "
                f"{type(s.error).__name__}); stopping, as a reason in its data (a crash, its memory) "
                "is likely. Finished work is kept: run the same command again to resume")

    def _nowhere_to_restart(self, w: int) -> bool:
        """Whether Ray reports worker ``w``'s node dead and no node has a free slot for it now.

        Then no restart can come unless a node is added, and the job does not wait for one.
        Otherwise (a process restarting on a live node, or room elsewhere) the wait goes on.
        """
        node = self._node_of(w)
        if not node or _node_alive(self._ray, node):
            return False
        try:
            free = self._ray.available_resources()
        except Exception:  # noqa: BLE001 - unknown: keep waiting, the wait is bounded anyway
            return False
        return free.get("CPU", 0.0) < self._demand[0] or free.get("GPU", 0.0) < self._demand[1]

    def _give_up(self, w: int, pending: dict, why: str) -> None:
        """Worker ``w`` is gone: its shards move to the survivors and its calls are re-run there."""
        s = self._suspects.pop(w)
        waited = time.perf_counter() - s.since
        if not REASSIGN_LOST_SHARDS:
            raise s.error
        node = self._node_of(w)
        node_gone = bool(node) and not _node_alive(self._ray, node)
        self._blame(s, node_gone)
        self.dead.add(w)
        try:
            self._ray.kill(self.actors[w], no_restart=True)  # no restart later, on a freed slot
        except Exception:  # noqa: BLE001 - already gone
            pass
        alive = [v for v in range(self.n_workers) if v not in self.dead]
        self._recovery["wait_seconds"] += waited
        if not alive:
            raise ClusterError(
                f"every worker was lost (the last, worker {w} on node {_short(node)}, with "
                f"{type(s.error).__name__} during {s.method}); finished work is kept: run the same "
                "command again, on a cluster with room, to resume")
        moved_before = len(self._recovery["moved_shards"])
        for key in sorted(k for k in self._shard_keys if self._home.get(k, k[1] % self.n_workers) == w):
            self._move(key, w)
        moves = self._recovery["moved_shards"][moved_before:]
        self._recovery["lost_workers"].append({
            "worker": w, "node": node, "during": s.method, "error": type(s.error).__name__, "why": why,
            "seconds_to_give_up": round(waited, 3), "shards_moved": [m["shard"] for m in moves]})
        if node_gone and node not in self._recovery["lost_nodes"]:
            self._recovery["lost_nodes"].append(node)
        log.warning("worker %d on node %s lost during %s (%s; %s; gave up after %.1f s): shards %s moved to "
                    "workers %s; %d calls re-run there", w, _short(node), s.method, type(s.error).__name__,
                    why, waited, [m["shard"] for m in moves], [m["to"] for m in moves],
                    sum(c.movable for c in s.parked))
        for c in s.parked:
            if c.movable:
                self._redo(c, pending)

    def _node_of(self, w: int) -> str:
        """The node id worker ``w`` reported when it came up (or after a restart), if it did."""
        node = self._nodes[w]
        if isinstance(node, self._ray.ObjectRef):
            ready, _ = self._ray.wait([node], timeout=0)
            try:
                node = self._ray.get(ready[0]) if ready else ""
            except Exception:  # noqa: BLE001 - died before it ever answered
                node = ""
            self._nodes[w] = node
        return node


#: Calls recorded under the name of the work they do (the scoring stage's call writes partials).
_PUBLIC_NAMES = {"score_partial": "score"}


def _public(c: _Call) -> tuple:
    """The method and shard indices a call stands for in the recovery record and the log: a
    worker's summed fit call is its shards' ``objective``/``hvp``."""
    if c.method == "summed":
        return c.args[0], [s.index for s in c.args[1]]
    return _PUBLIC_NAMES.get(c.method, c.method), [c.key[1]]


def _lost_object(exc: BaseException) -> Optional[str]:
    """The hex id of the object whose loss caused ``exc`` (raised by Ray, or inside a call)."""
    from ray.exceptions import ObjectLostError

    for e in (getattr(exc, "cause", None), exc):
        if isinstance(e, ObjectLostError) and getattr(e, "object_ref_hex", None):
            return e.object_ref_hex
    return None


def _hexes(refs) -> set:
    return {r.hex() for r in (refs if isinstance(refs, list) else [refs])}


def _node_alive(ray, node: str) -> bool:
    """Whether Ray's control store still counts ``node`` as alive (it notices a lost node late)."""
    try:
        return any(n["NodeID"] == node and n["Alive"] for n in ray.nodes())
    except Exception:  # noqa: BLE001 - unknown: say alive, claim no node loss
        return True


def _short(node: Optional[str]) -> str:
    return node[:12] if node else "?"


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
