"""A fake cluster for the recovery tests: the Submitter interface without Ray.

:class:`FakeCluster` has actors that behave like Ray's as far as recovery can tell: an actor runs
its calls in order, a crash fails the call it was running and those queued behind it, Ray
restarts a crashed actor (up to ``MAX_RESTARTS`` times) on its node, or elsewhere if its node is
gone and another has room, and the objects a lost node held are lost. :func:`run` waits for the
calls the way ``RayPool._run`` does, with a fake clock. A call's value depends only on what it
was asked, never on the worker that ran it, so a recovered run must return what an undisturbed
run returns.
"""

import itertools

from distributed_influence.cluster.recovery import (
    BACK,
    DEAD,
    DOWN,
    FATAL,
    MAX_RESTARTS,
    OBJECT_LOST,
    PING_INTERVAL,
    WORKER_LOST,
    Failure,
)
from distributed_influence.engine.plan import ShardSpec


class WorkerGone(Exception):
    """What the fake raises for a call whose actor died (Ray: ``RayActorError``)."""


class ObjectGone(Exception):
    """A call read an object lost with its node (Ray: ``ObjectLostError``)."""

    def __init__(self, oid):
        super().__init__(oid)
        self.oid = oid


class BadRow(Exception):
    """A failure no restart helps (a bad row found by a worker)."""


_ids = itertools.count()


class Task:
    """One submitted call on a fake actor; run when first read, after the calls before it."""

    def __init__(self, worker, method, args):
        self.worker, self.method, self.args = worker, method, args
        self.done, self.value, self.error, self.node = False, None, None, None


class Ref:
    """A fake object reference: one value of a task (``index`` for a task of several)."""

    def __init__(self, task, index=None):
        self.task, self.index, self.id = task, index, f"ref-{next(_ids)}"


class Ping:
    def __init__(self, worker):
        self.worker = worker


class FakeCluster:
    """Actors ``0..n-1``, actor ``w`` first on node ``node-w``.

    Args:
        n: workers.
        room: whether a node has room for an actor whose node was lost.
        restart_pings: pings a restarting actor answers "down" before it is back.
    """

    def __init__(self, n, room=False, restart_pings=1):
        self.first_node = {w: f"node-{w}" for w in range(n)}
        self.node = dict(self.first_node)
        self.live_nodes = set(self.node.values())
        self.state = {w: "up" for w in range(n)}
        self.restarts = {w: 0 for w in range(n)}
        self.down_pings = {w: 0 for w in range(n)}
        self.queues = {w: [] for w in range(n)}
        self.room, self.restart_pings = room, restart_pings
        self.rules = []  # what goes wrong, see fail()
        self.lost = set()  # ids of lost objects
        self.fragile_parts = False  # every test-feature part is lost as soon as it is made
        self.sent, self.killed, self.tasks = [], [], []

    def fail(self, method, unit, how="crash", worker=None, times=1):
        """The call ``method`` for ``unit`` (a shard index, or a part's start row) fails
        ``times`` times: its actor crashes, its node is lost, or it raises a bad row."""
        self.rules.append({"method": method, "unit": unit, "how": how, "worker": worker, "times": times})

    def lose_node(self, node):
        """The node goes away with its actors and the objects it held."""
        self.live_nodes.discard(node)
        for t in self.tasks:
            if t.done and t.node == node:
                self.lost.update(r.id for r in t.refs)
        for w, n in self.node.items():
            if n == node and self.state[w] == "up":
                self.state[w], self.down_pings[w] = "restarting", self.restart_pings

    # ------------------------------------------------------------------ the Submitter interface
    def send(self, worker, method, args, num_returns):
        task = Task(worker, method, args)
        task.refs = [Ref(task)] if num_returns == 1 else [Ref(task, i) for i in range(num_returns)]
        self.queues[worker].append(task)
        self.tasks.append(task)
        self.sent.append((worker, method, args))
        return task.refs[0] if num_returns == 1 else task.refs

    def object_id(self, value):
        return value.id if isinstance(value, Ref) else None

    def classify(self, exc):
        if isinstance(exc, WorkerGone):
            return Failure(WORKER_LOST)
        if isinstance(exc, ObjectGone):
            return Failure(OBJECT_LOST, exc.oid)
        return Failure(FATAL)

    def ping(self, worker):
        return Ping(worker)

    def ping_result(self, ref):
        w = ref.worker
        if self.state[w] == "dead":
            return DEAD, ""
        if self.state[w] == "restarting":
            if self.node[w] not in self.live_nodes:
                if not self.room:
                    return DOWN, ""
                self.node[w] = f"node-{w}-{self.restarts[w] + 1}"  # Ray restarts it on a node with room
                self.restarts[w] += 1
                self.live_nodes.add(self.node[w])
            if self.down_pings[w] > 0:
                self.down_pings[w] -= 1
                return DOWN, ""
            self.state[w] = "up"
        return BACK, self.node[w]

    def node_of(self, worker):
        return self.first_node[worker]

    def node_alive(self, node):
        return node in self.live_nodes

    def has_room(self):
        return self.room

    def kill(self, worker):
        self.killed.append(worker)
        self.state[worker] = "dead"

    # ------------------------------------------------------------------ running the actors
    def result(self, ref):
        """(value, error) of a reference, running its actor's calls up to its task first."""
        task = ref.task
        queue = self.queues[task.worker]
        while not task.done:
            self._execute(queue.pop(0))
        if task.error is not None:
            return None, task.error
        if ref.id in self.lost:
            return None, ObjectGone(ref.id)
        return (task.value if ref.index is None else task.value[ref.index]), None

    def _execute(self, task):
        task.done = True
        w = task.worker
        if self.state[w] != "up":
            task.error = WorkerGone(f"actor {w} is gone")
            return
        try:
            args = self._resolve(task.args)
        except ObjectGone as exc:
            task.error = exc
            return
        rule = self._rule(task)
        if rule is not None:
            rule["times"] -= 1
            if rule["how"] == "bad":
                task.error = BadRow("row 7 is malformed")
                return
            task.error = WorkerGone(f"actor {w} died")
            if rule["how"] == "lose node":
                self.lose_node(self.node[w])
            else:
                self._crash(w)
            return
        task.node = self.node[w]
        if task.method == "featurize_test":
            task.value = (("x",) + args, ("meta",) + args)
            if self.fragile_parts:
                self.lost.add(task.refs[0].id)
        else:
            task.value = (task.method,) + args

    def _rule(self, task):
        for rule in self.rules:
            unit = _unit(task)
            if (rule["times"] > 0 and rule["method"] == task.method and rule["unit"] in unit
                    and rule["worker"] in (None, task.worker)):
                return rule
        return None

    def _crash(self, w):
        self.restarts[w] += 1
        if self.restarts[w] > MAX_RESTARTS:
            self.state[w] = "dead"  # Ray's restarts are used up
        else:
            self.state[w], self.down_pings[w] = "restarting", self.restart_pings

    def _resolve(self, value):
        if isinstance(value, (list, tuple)):
            return type(value)(self._resolve(v) for v in value)
        if isinstance(value, Ref):
            got, error = self.result(value)
            if error is not None:
                raise error
            return got
        return value

    def worker_of(self, method, unit):
        """The workers ``method`` for ``unit`` was sent to, in order."""
        return [w for w, m, args in self.sent if m == method and unit in _unit(Task(w, m, args))]


def _unit(task):
    """The shard indices (or a part's start row) a task is for."""
    first = task.args[0] if task.args else None
    if isinstance(first, ShardSpec):
        return {first.index}
    if task.method == "summed":
        return {s.index for s in task.args[1]}
    return {first}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(rec, cluster, clock, calls):
    """Runs the calls to completion as ``RayPool._run`` does; results in call order."""
    for c in calls:
        rec.submit(c)
    results = [None] * len(calls)
    pending = {c.ref: c for c in calls}
    for _ in range(10_000):
        if not (pending or rec.waiting):
            return results
        for ref, w in rec.probes().items():
            rec.on_ping(w, ref, pending)
        for ref in list(pending):
            c = pending.pop(ref)
            value, error = cluster.result(ref)
            if error is not None:
                rec.on_failure(c, error, pending)
            elif c.replaces is not None:
                rec.on_recomputed(c, pending)
            else:
                results[c.pos] = value
        clock.now += PING_INTERVAL / 2
        rec.tick(pending)
    raise AssertionError("the run never ended")
