"""The Ray pool: worker actors that keep the model and their shards across stages.

:class:`RayPool` is the :class:`~distributed_influence.engine.pool.Pool` of a Ray run. It
submits the calls, waits for them and collects their results in order; what happens when a
worker, a node or an object is lost is decided by
:class:`~distributed_influence.cluster.recovery.Recovery`, to which the pool is the cluster
(it implements :class:`~distributed_influence.cluster.recovery.Submitter` with Ray's public API).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional, Sequence, Tuple

from distributed_influence.cluster.actor import WorkerActor
from distributed_influence.cluster.recovery import (
    BACK,
    DEAD,
    DOWN,
    FATAL,
    MAX_RESTARTS,
    OBJECT_LOST,
    PING_INTERVAL,
    WORKER_LOST,
    Call,
    Failure,
    Recovery,
)
from distributed_influence.engine.plan import ShardSpec, WorkerSettings
from distributed_influence.engine.pool import progress_bar
from distributed_influence.errors import InfluenceError
from distributed_influence.quiet import native_stderr_off

log = logging.getLogger(__name__)

#: Shared call arguments larger than this are put in the object store once, not sent per call.
INLINE_BYTES = 1 << 20


class RayPool:
    """Ray actors that keep the model and their shards' features across stages.

    Shard ``i`` starts on worker ``i mod workers``. A call that fails because its worker went
    away (the process died, or its node) makes that worker *suspect*: it is pinged for up to
    :data:`~distributed_influence.cluster.recovery.RESTART_WAIT` seconds, and if Ray restarts it
    meanwhile (in place, or on a node with room) the call is re-run there. Otherwise, or as soon
    as Ray reports its node dead while no node has room for it, the worker is given up: its
    shards move to the surviving workers, which featurize those rows from storage on demand, and
    every call it owed is re-run on them. Test features that lived in the lost node's object
    store are recomputed where they are needed. Results already received are kept; a stage
    returns only when every shard has answered, so a sum never lacks a shard.
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
        self._nodes: list = [a.ping.remote() for a in self.actors]  # answered once each is up
        self._recovery = Recovery(self, n_workers)

    # ------------------------------------------------------------------ the Pool interface
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
        calls = self._shard_calls(method, specs, self._shared(shared))
        report = None if on_result is None else (lambda c, value: on_result(specs[c.pos], value))
        return self._run(calls, desc, report)

    def _shared(self, shared: tuple) -> tuple:
        """Big shared arguments go to the object store once; small ones (Θ, a precision name)
        travel inline with each call, which is cheaper than a put per fit evaluation."""
        return tuple(self._ray.put(a) if getattr(a, "nbytes", 0) > INLINE_BYTES else a for a in shared)

    def _shard_calls(self, method: str, specs: Sequence[ShardSpec], shared: tuple) -> List[Call]:
        """``method(spec, *shared)`` for each shard, at positions 0.., its key known to recovery
        (a lost worker's shards move)."""
        calls = [Call(method, (s, *shared), ("shard", s.index), i, rows=s.rows,
                      what=f"shard {s.index} (training rows {s.start}-{s.stop})")
                 for i, s in enumerate(specs)]
        self._recovery.add_shards(c.key for c in calls)
        return calls

    def call_all(self, method: str, args_per_worker: List[tuple]) -> list:
        """``method(*args)`` once for each entry, entry ``p`` on worker ``p`` while it lives."""
        calls = [Call(method, tuple(args), ("call", p), p, what=f"{method} {p}")
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
        shared_refs = self._shared(shared)
        groups: dict = {}
        for s in specs:
            self._recovery.add_shards([("shard", s.index)])
            groups.setdefault(self._recovery.worker_for(("shard", s.index)), []).append(s)
        order = sorted(groups.items())
        calls = [Call("summed", (method, group, *shared_refs), ("worker", w), i, movable=False, worker=w,
                      what=f"{method} of shards {[s.index for s in group]}")
                 for i, (w, group) in enumerate(order)]
        out = self._run(calls)
        lost = [s for (_, group), r in zip(order, out) if r is None for s in group]
        summed = [r for r in out if r is not None]
        if not lost:
            return summed
        self._recovery.redone(method, [s.index for s in lost])
        return summed + self.map(method, lost, *shared)

    def featurize(self, specs: Sequence[ShardSpec], test_ranges: List[tuple], desc: Optional[str] = None):
        """``prepare`` of every shard and ``featurize_test`` of every test range, as one run.

        Range ``p`` goes to worker ``p`` (while it lives). A worker goes on to its test range as
        soon as its own shards are done, rather than every worker waiting for the slowest shard
        first: shards of equal rows do not take equal time.

        The test features stay in the object store (references are returned), only the small
        values are fetched. Should their node be lost later, a call that cannot read one has it
        recomputed by a surviving worker (see :class:`~distributed_influence.cluster.recovery.Recovery`).

        Returns:
            (``prepare``'s results in shard order, the test parts' ({x, logits}) references, the small
            values of ``featurize_test``), ranges in the order given.
        """
        calls = self._shard_calls("prepare", specs, ())
        parts = [Call("featurize_test", (a, b), ("part", p), len(calls) + p, rows=b - a, num_returns=2,
                      what=f"featurize_test({a}, {b})") for p, (a, b) in enumerate(test_ranges)]
        out = self._run(calls + parts, desc)
        return out[:len(calls)], [c.refs[0] for c in parts], out[len(calls):]

    def _on_each_worker(self, method: str) -> list:
        """``method()`` once on every surviving worker (only that worker can answer)."""
        calls = [Call(method, (), ("worker", w), i, movable=False, worker=w)
                 for i, w in enumerate(self._recovery.alive())]
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
        jobs = [Call("reduce", (fn, *args), ("call", i), i, what=f"{fn.__name__} {i}")
                for i, (fn, args) in enumerate(calls)]
        report = None if on_result is None else (lambda c, value: on_result(c.pos, value))
        return self._run(jobs, None, report)

    def recovery(self) -> dict:
        """What was lost and redone so far (the manifest's ``recovery`` section)."""
        return self._recovery.summary()

    def shutdown(self) -> None:
        """Ends every actor; one already gone is no error."""
        for a in self.actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass

    # ------------------------------------------------------------------ running
    def _run(self, calls: List[Call], desc: Optional[str] = None,
             on_result: Optional[Callable] = None) -> list:
        """Runs the calls to completion, recovering lost workers; results in call order."""
        ray = self._ray
        rec = self._recovery
        for c in calls:
            rec.submit(c)
        if desc is None and on_result is None:
            # The fit's many small calls: one round trip when nothing goes wrong.
            try:
                return ray.get([c.ref for c in calls])
            except Exception as exc:  # noqa: BLE001 - sorted out call by call below
                if not rec.recoverable(exc):
                    self._abandon({c.ref: c for c in calls})
                    raise
        results: list = [None] * len(calls)
        pending = {c.ref: c for c in calls}
        t_first: list = []  # when the first loss of this run was seen
        try:
            with progress_bar(sum(c.rows for c in calls), desc, "rows") as bar:
                while pending or rec.waiting:
                    probes = rec.probes()
                    waiting = list(pending) + list(probes)
                    if waiting:
                        ready, _ = ray.wait(waiting, num_returns=1, timeout=rec.poll_timeout)
                    else:  # only a suspect worker's next ping to wait for
                        ready = []
                        time.sleep(PING_INTERVAL / 2)
                    for ref in ready:
                        if ref in probes:
                            rec.on_ping(probes[ref], ref, pending)
                            continue
                        c = pending.pop(ref)
                        try:
                            value = ray.get(ref)
                        except Exception as exc:  # noqa: BLE001 - raised again unless recoverable
                            if not t_first:
                                t_first.append(time.perf_counter())
                            rec.on_failure(c, exc, pending)
                            continue
                        if c.replaces is not None:
                            rec.on_recomputed(c, pending)
                            continue
                        results[c.pos] = value
                        if on_result is not None:
                            on_result(c, value)
                        bar.update(c.rows)
                    rec.tick(pending)
        except BaseException:
            self._abandon(pending)
            rec.forget()
            raise
        if t_first:
            rec.took(time.perf_counter() - t_first[0])
        return results

    def _abandon(self, pending: dict) -> None:
        """The job fails with the first error: the other calls are cancelled and their
        outcome collected, so Ray does not print their errors as unhandled."""
        for ref in pending:
            self._ray.cancel(ref)
        for ref in pending:
            try:
                self._ray.get(ref)
            except Exception:  # noqa: BLE001 - already failing with the first error
                pass

    # ------------------------------------------------------------------ the Submitter interface
    def send(self, worker: int, method: str, args: tuple, num_returns: int):
        """Submits ``method(*args)`` to the worker's actor (see ``Submitter.send``)."""
        bound = getattr(self.actors[worker], method)
        if num_returns != 1:
            bound = bound.options(num_returns=num_returns)
        return bound.remote(*args)

    def object_id(self, value) -> Optional[str]:
        """The hex id of an object reference; None for any other value."""
        return value.hex() if isinstance(value, self._ray.ObjectRef) else None

    def classify(self, exc: BaseException) -> Failure:
        """Ray's error in recovery's terms: a lost actor (one whose constructor failed cannot be
        helped by a restart), a lost object, or anything else."""
        from ray.exceptions import RayActorError

        if isinstance(exc, RayActorError):
            return Failure(FATAL) if exc.actor_init_failed else Failure(WORKER_LOST)
        lost = _lost_object(exc)
        return Failure(FATAL) if lost is None else Failure(OBJECT_LOST, lost)

    def ping(self, worker: int):
        """Asks the worker's actor for its node (the actor answers once it is up)."""
        return self.actors[worker].ping.remote()

    def ping_result(self, ref) -> Tuple[str, str]:
        """The ping's answer: back on a node, dead for good (``ActorDiedError``), or still away
        (any other actor error: restarting, or not reachable yet)."""
        from ray.exceptions import ActorDiedError, RayActorError

        try:
            return BACK, self._ray.get(ref)
        except RayActorError as exc:
            return (DEAD if isinstance(exc, ActorDiedError) else DOWN), ""

    def node_of(self, worker: int) -> str:
        """The node id the worker reported when it came up, if it did by the first time this is
        asked (then kept)."""
        node = self._nodes[worker]
        if isinstance(node, self._ray.ObjectRef):
            ready, _ = self._ray.wait([node], timeout=0)
            try:
                node = self._ray.get(ready[0]) if ready else ""
            except Exception:  # noqa: BLE001 - died before it ever answered
                node = ""
            self._nodes[worker] = node
        return node

    def node_alive(self, node: str) -> bool:
        """Whether Ray's control store still counts ``node`` as alive (it notices a lost node late)."""
        try:
            return any(n["NodeID"] == node and n["Alive"] for n in self._ray.nodes())
        except Exception:  # noqa: BLE001 - unknown: say alive, claim no node loss
            return True

    def has_room(self) -> bool:
        """Whether the cluster has the CPUs and GPUs of one more worker free now."""
        try:
            free = self._ray.available_resources()
        except Exception:  # noqa: BLE001 - unknown: keep waiting, the wait is bounded anyway
            return True
        return not (free.get("CPU", 0.0) < self._demand[0] or free.get("GPU", 0.0) < self._demand[1])

    def kill(self, worker: int) -> None:
        """Ends the worker's actor for good, so Ray does not restart it later on a freed slot."""
        try:
            self._ray.kill(self.actors[worker], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _lost_object(exc: BaseException) -> Optional[str]:
    """The hex id of the object whose loss caused ``exc`` (raised by Ray, or inside a call)."""
    from ray.exceptions import ObjectLostError

    for e in (getattr(exc, "cause", None), exc):
        if isinstance(e, ObjectLostError) and getattr(e, "object_ref_hex", None):
            return e.object_ref_hex
    return None


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error (e.g. a bad row found by a worker).

    Ray wraps a worker's exception in its own; the command line must still show the input
    error the worker raised, as the single-process engine would.
    """
    seen = exc
    for _ in range(5):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if cause is None or cause is seen:
            break
        seen = cause
        if isinstance(seen, InfluenceError):
            return seen
    return exc
