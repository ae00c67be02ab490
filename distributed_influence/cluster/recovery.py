"""What a Ray pool does when the cluster loses a worker, a node, or an object: the decisions.

:class:`~distributed_influence.cluster.pool.RayPool` submits the calls, waits for them and hands
each failure, ping answer and tick to a :class:`Recovery`, which decides what happens next
(the split xgboost_ray makes with its ``elastic`` module):

* a worker whose call failed becomes *suspect*: it is pinged until Ray has restarted it, and
  its calls are then re-run there; a restart that does not come within :data:`RESTART_WAIT`,
  an actor Ray reports dead for good, or a dead node with no room elsewhere make the worker
  *given up*: its shards move to the survivors and its calls are re-run on them;
* a call that could not read a test-feature part lost with its node has that part's producer
  re-run on a live worker, then is re-run itself with the new part;
* a unit of work whose worker died :data:`MAX_SHARD_LOSSES` times, a part lost as often, or the
  loss of the last worker stop the job with :class:`~distributed_influence.errors.ClusterError`.

It reaches the cluster only through :class:`Submitter`, so every transition can be tested with a
fake cluster, without Ray. What was lost and redone is kept for the manifest
(:meth:`Recovery.summary`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Tuple

import numpy as np

from distributed_influence.engine.pool import empty_recovery
from distributed_influence.errors import ClusterError

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

#: Kinds of :class:`Failure`: the call's worker went away (its process or its node), ...
WORKER_LOST = "worker lost"
#: ... an object the call read (or its own result) was lost with its node, ...
OBJECT_LOST = "object lost"
#: ... or anything else (a bad row, a bug, a worker that could not start): the job fails.
FATAL = "fatal"

#: Answers to a ping (:meth:`Submitter.ping_result`): the worker is up again, ...
BACK = "back"
#: ... it is gone for good (Ray will not restart it), ...
DEAD = "dead"
#: ... or it is restarting or not reachable yet.
DOWN = "down"


@dataclasses.dataclass(frozen=True)
class Failure:
    """A failed call's error in the terms recovery decides on (see :meth:`Submitter.classify`)."""

    kind: str  # WORKER_LOST, OBJECT_LOST or FATAL
    lost_object: Optional[str] = None  # OBJECT_LOST: the id of the object whose loss caused it


class Submitter(Protocol):
    """The cluster as :class:`Recovery` sees it; ``RayPool`` implements it with Ray.

    Calls and pings are identified by the references :meth:`send` and :meth:`ping` return;
    recovery only stores them and hands them back.
    """

    def send(self, worker: int, method: str, args: tuple, num_returns: int):
        """Submits ``method(*args)`` to worker ``worker``'s actor.

        Returns:
            The call's reference, or a list of ``num_returns`` references when it is above 1.
        """

    def object_id(self, value) -> Optional[str]:
        """The id of ``value`` if it is a reference to a stored object, else None."""

    def classify(self, exc: BaseException) -> Failure:
        """What a call's error means for recovery."""

    def ping(self, worker: int):
        """Asks worker ``worker`` for its node; the reference is waited for with the calls."""

    def ping_result(self, ref) -> Tuple[str, str]:
        """(:data:`BACK`, node), (:data:`DEAD`, "") or (:data:`DOWN`, "") for an answered ping.

        Raises:
            Any error other than the worker's absence, as the ping raised it.
        """

    def node_of(self, worker: int) -> str:
        """The node worker ``worker`` reported when it first came up; "" if unknown."""

    def node_alive(self, node: str) -> bool:
        """Whether the cluster still counts ``node`` as alive (True when unknown)."""

    def has_room(self) -> bool:
        """Whether some node has the free resources a restarted worker needs (True when unknown)."""

    def kill(self, worker: int) -> None:
        """Ends worker ``worker``'s actor with no restart; an actor already gone is no error."""


@dataclasses.dataclass(eq=False)
class Call:
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
    replaces: Optional[str] = None  # a recomputed test part: the id of the lost reference

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
    def running(self) -> Call:
        """The call the worker was on: an actor runs its calls in the order they were sent, and
        those queued behind it fail with it, in any order."""
        return min(self.parked, key=lambda call: call.seq)

    @property
    def method(self) -> str:
        return public_name(self.running)[0]


class Recovery:
    """Where each unit of work runs, and what happens to a call whose worker or input was lost.

    Unit ``(kind, i)`` starts on worker ``i mod n_workers`` and stays there until that worker is
    given up. The state spans the pool's runs (given-up workers, moved units, recomputed parts);
    what waits within a run (suspects, calls waiting for a part) is dropped by :meth:`forget`
    when a run fails.

    Args:
        cluster: how calls are sent and workers and nodes checked.
        n_workers: the pool's workers, numbered from 0.
        clock: seconds, for the waits; the tests pass a fake one.
    """

    def __init__(self, cluster: Submitter, n_workers: int, clock: Callable[[], float] = time.perf_counter):
        self._cluster = cluster
        self.n_workers = n_workers
        self._clock = clock
        self.dead: set = set()
        self._suspects: Dict[int, _Suspect] = {}
        self._home: Dict[tuple, int] = {}  # units of work moved off their first worker
        self._shard_keys: set = set()
        self._restarted_on: Dict[int, str] = {}  # a restarted worker's node, once it answered
        self._parts: Dict[str, Call] = {}  # id of a (big) test-feature part → the call making it
        self._subst: Dict[str, object] = {}  # id of a lost part → its recomputed reference
        self._part_waiters: Dict[str, list] = {}
        self._record = empty_recovery()
        self._seq = 0

    # ------------------------------------------------------------------ placement and submission
    def alive(self) -> List[int]:
        """The workers not given up, in order."""
        return [w for w in range(self.n_workers) if w not in self.dead]

    def add_shards(self, keys: Iterable[tuple]) -> None:
        """Makes shard units known: a given-up worker's known shards move with it."""
        self._shard_keys.update(keys)

    def worker_for(self, key: tuple) -> int:
        """The worker that owns a unit of work: its first one, or where it moved."""
        w = self._home.get(key, key[1] % self.n_workers)
        if w in self.dead:
            w = self._move(key, w)
        return w

    def _move(self, key: tuple, lost: int) -> int:
        """Moves a unit of work off a lost worker, to the survivor with the fewest shards."""
        alive = self.alive()
        load = {w: 0 for w in alive}
        for k in self._shard_keys:
            home = self._home.get(k, k[1] % self.n_workers)
            if home in load:
                load[home] += 1
        to = min(alive, key=lambda w: (load[w], w))
        self._home[key] = to
        if key[0] == "shard":
            self._record["moved_shards"].append({"shard": key[1], "from": lost, "to": to})
        return to

    def _fresh(self, arg):
        """An argument with every lost test-feature part replaced by its recomputed one."""
        if not self._subst:
            return arg
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._fresh(a) for a in arg)
        oid = self._cluster.object_id(arg)
        while oid is not None and oid in self._subst:
            arg = self._subst[oid]
            oid = self._cluster.object_id(arg)
        return arg

    def submit(self, c: Call, pending: Optional[dict] = None) -> None:
        """Sends a call to its worker (where its unit lives now, if it can move), with lost
        parts replaced; ``pending`` (reference → call) gets it when given."""
        if c.movable:
            c.worker = self.worker_for(c.key)
        c.refs = self._cluster.send(c.worker, c.method, tuple(self._fresh(a) for a in c.args), c.num_returns)
        self._seq += 1
        c.seq = self._seq
        if c.num_returns > 1:  # a test-feature part: how to make it again, should it be lost
            self._parts[self._cluster.object_id(c.refs[0])] = c
        if pending is not None:
            pending[c.ref] = c

    def _redo(self, c: Call, pending: dict) -> None:
        """Issues a call again (on its worker, or where its work moved) and records it."""
        method, units = public_name(c)
        self.redone(method, units)
        self.submit(c, pending)

    # ------------------------------------------------------------------ the state the run loop reads
    @property
    def waiting(self) -> bool:
        """Whether a suspect worker or a call waiting for a recomputed part keeps the run going."""
        return bool(self._suspects or self._part_waiters)

    @property
    def poll_timeout(self) -> Optional[float]:
        """How long the run loop may wait for a result: a suspect's ping may be due sooner."""
        return PING_INTERVAL / 2 if self._suspects else None

    def probes(self) -> dict:
        """The pings in flight: reference → worker."""
        return {s.ping: w for w, s in self._suspects.items() if s.ping is not None}

    def forget(self) -> None:
        """The run failed: its suspects and waiting calls are never submitted again."""
        self._suspects.clear()
        self._part_waiters.clear()

    # ------------------------------------------------------------------ the record
    def redone(self, method: str, units: Iterable[int]) -> None:
        """Records units of work whose ``method`` was (or is being) run again."""
        self._record["redone_calls"].setdefault(method, []).extend(units)

    def took(self, seconds: float) -> None:
        """Adds a run's time from its first loss to its end."""
        self._record["seconds"] += seconds

    def summary(self) -> dict:
        """What was lost and redone so far (the manifest's ``recovery`` section), a copy."""
        rec = {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
               for k, v in self._record.items()}
        rec["wait_seconds"] = round(rec["wait_seconds"], 3)
        rec["seconds"] = round(rec["seconds"], 3)
        return rec

    # ------------------------------------------------------------------ failures
    def recoverable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a loss the pool recovers from, rather than the job's failure."""
        return self._recoverable(self._cluster.classify(exc))

    @staticmethod
    def _recoverable(failure: Failure) -> bool:
        if failure.kind == WORKER_LOST:
            return True
        return failure.kind == OBJECT_LOST

    def on_failure(self, c: Call, exc: BaseException, pending: dict) -> None:
        """A call failed: its worker is suspect, or a test-feature part it reads was lost;
        anything else (a bad row, a bug) is raised at once."""
        failure = self._cluster.classify(exc)
        if not self._recoverable(failure):
            raise exc
        if failure.kind == OBJECT_LOST and failure.lost_object not in self._ids(c.refs):
            self._on_lost_object(c, failure.lost_object, exc, pending)
            return
        # The worker went away while on this call or before it (or the call's result was on
        # its node): re-run where it moved, or once the worker's fate is known.
        if c.worker in self.dead:
            if c.movable:
                self._redo(c, pending)
            return  # a question only that worker could answer: no answer
        s = self._suspects.get(c.worker)
        if s is None:
            now = self._clock()
            s = self._suspects[c.worker] = _Suspect(now, now + RESTART_WAIT, exc, [], now)
            log.info("worker %d: %s during %s; waiting up to %g s for Ray to bring it back",
                     c.worker, type(exc).__name__, c.method, RESTART_WAIT)
        s.parked.append(c)

    def _ids(self, refs) -> set:
        return {self._cluster.object_id(r) for r in (refs if isinstance(refs, list) else [refs])}

    def _on_lost_object(self, c: Call, lost: str, exc: BaseException, pending: dict) -> None:
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
        redone = [p for p in self._record["recomputed_test_parts"] if p["part"] == source.key[1]]
        if len(redone) + 1 >= MAX_SHARD_LOSSES:
            raise ClusterError(f"{source.what}: its results were lost {len(redone) + 1} times; stopping. "
                               "Finished work is kept: run the same command again to resume")
        again = Call(source.method, source.args, source.key, None, what=source.what,
                     num_returns=source.num_returns, replaces=lost)
        self.submit(again, pending)
        log.warning("%s: its output was lost with its node; computing it again on worker %d",
                    source.what, again.worker)

    def on_recomputed(self, c: Call, pending: dict) -> None:
        """A lost part was made again: the calls that needed it are re-run with the new one."""
        self._subst[c.replaces] = c.refs[0]
        self._record["recomputed_test_parts"].append(
            {"part": c.key[1], "args": [int(a) if isinstance(a, (int, np.integer)) else str(a) for a in c.args],
             "worker": c.worker})
        for waiter in self._part_waiters.pop(c.replaces, []):
            self._redo(waiter, pending)

    # ------------------------------------------------------------------ suspect workers
    def tick(self, pending: dict) -> None:
        """Pings suspect workers that are due; gives up those whose wait ran out."""
        now = self._clock()
        for w, s in list(self._suspects.items()):
            if now >= s.deadline:
                self._give_up(w, pending, f"not back within {RESTART_WAIT:g} s")
            elif s.ping is None and now >= s.next_ping:
                s.ping = self._cluster.ping(w)

    def on_ping(self, w: int, ref, pending: dict) -> None:
        """A suspect worker's ping was answered: it is back (its calls are re-run there), gone
        (given up), or still away (pinged again later)."""
        s = self._suspects[w]
        s.ping = None
        state, node = self._cluster.ping_result(ref)
        if state == DEAD:  # dead for good: no restart will come
            self._give_up(w, pending, "dead for good")
            return
        if state == DOWN:
            if self._nowhere_to_restart(w):
                self._give_up(w, pending, "its node is gone and no other node has room")
            else:  # restarting, or not reachable yet
                s.next_ping = self._clock() + PING_INTERVAL
            return
        del self._suspects[w]
        waited = self._clock() - s.since
        old = self._node_of(w)
        self._blame(s, node_gone=bool(old) and old != node and not self._cluster.node_alive(old))
        self._restarted_on[w] = node
        self._record["restarted_workers"].append({"worker": w, "node": node, "seconds": round(waited, 3)})
        self._record["wait_seconds"] += waited
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
        """Whether worker ``w``'s node is reported dead and no node has room for it now.

        Then no restart can come unless a node is added, and the job does not wait for one.
        Otherwise (a process restarting on a live node, or room elsewhere) the wait goes on.
        """
        node = self._node_of(w)
        if not node or self._cluster.node_alive(node):
            return False
        return not self._cluster.has_room()

    def _give_up(self, w: int, pending: dict, why: str) -> None:
        """Worker ``w`` is gone: its shards move to the survivors and its calls are re-run there."""
        s = self._suspects.pop(w)
        waited = self._clock() - s.since
        node = self._node_of(w)
        node_gone = bool(node) and not self._cluster.node_alive(node)
        self._blame(s, node_gone)
        self.dead.add(w)
        self._cluster.kill(w)  # no restart later, on a freed slot
        self._record["wait_seconds"] += waited
        if not self.alive():
            raise ClusterError(
                f"every worker was lost (the last, worker {w} on node {_short(node)}, with "
                f"{type(s.error).__name__} during {s.method}); finished work is kept: run the same "
                "command again, on a cluster with room, to resume")
        moved_before = len(self._record["moved_shards"])
        for key in sorted(k for k in self._shard_keys if self._home.get(k, k[1] % self.n_workers) == w):
            self._move(key, w)
        moves = self._record["moved_shards"][moved_before:]
        self._record["lost_workers"].append({
            "worker": w, "node": node, "during": s.method, "error": type(s.error).__name__, "why": why,
            "seconds_to_give_up": round(waited, 3), "shards_moved": [m["shard"] for m in moves]})
        if node_gone and node not in self._record["lost_nodes"]:
            self._record["lost_nodes"].append(node)
        log.warning("worker %d on node %s lost during %s (%s; %s; gave up after %.1f s): shards %s moved to "
                    "workers %s; %d calls re-run there", w, _short(node), s.method, type(s.error).__name__,
                    why, waited, [m["shard"] for m in moves], [m["to"] for m in moves],
                    sum(c.movable for c in s.parked))
        for c in s.parked:
            if c.movable:
                self._redo(c, pending)

    def _node_of(self, w: int) -> str:
        """The node worker ``w`` is on as far as known: where it came back after a restart, else
        where it first came up."""
        if w in self._restarted_on:
            return self._restarted_on[w]
        return self._cluster.node_of(w)


#: Calls recorded under the name of the work they do (the scoring stage's call writes partials).
_PUBLIC_NAMES = {"score_partial": "score"}


def public_name(c: Call) -> tuple:
    """The method and shard indices a call stands for in the recovery record and the log: a
    worker's summed fit call is its shards' ``objective``/``hvp``."""
    if c.method == "summed":
        return c.args[0], [s.index for s in c.args[1]]
    return _PUBLIC_NAMES.get(c.method, c.method), [c.key[1]]


def _short(node: Optional[str]) -> str:
    return node[:12] if node else "?"
