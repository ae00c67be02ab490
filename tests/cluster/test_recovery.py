"""The recovery state machine, without Ray: each transition on a fake cluster.

:class:`FakeCluster` implements the :class:`~distributed_influence.cluster.recovery.Submitter`
interface with actors that behave like Ray's for recovery: an actor runs its calls in order, a
crash fails the call it was running and those queued behind it, Ray restarts a crashed actor
(up to ``MAX_RESTARTS`` times) on its node, or elsewhere if its node is gone and another has
room, and objects a lost node held are lost. :func:`run` waits for the calls the way
``RayPool._run`` does, with a fake clock. Every call's value depends only on what it was asked,
never on the worker that ran it, so a recovered run must return what an undisturbed run returns.
"""

import itertools
import subprocess
import sys

import pytest

from distributed_influence.cluster import recovery
from distributed_influence.cluster.recovery import (
    BACK,
    DEAD,
    DOWN,
    FATAL,
    MAX_RESTARTS,
    MAX_SHARD_LOSSES,
    OBJECT_LOST,
    PING_INTERVAL,
    RESTART_WAIT,
    WORKER_LOST,
    Call,
    Failure,
    Recovery,
)
from distributed_influence.engine.plan import ShardSpec
from distributed_influence.engine.pool import empty_recovery
from distributed_influence.errors import ClusterError


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
                self.node[w] = f"node-{w}-again"  # Ray restarts it on a node with room
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


def specs(n):
    return [ShardSpec(i, 10 * i, 10 * i + 10) for i in range(n)]


def shard_calls(rec, method, shards, *shared):
    """What ``RayPool.map`` submits: one call per shard, its key known to recovery."""
    calls = [Call(method, (s, *shared), ("shard", s.index), i, rows=s.rows,
                  what=f"shard {s.index} (training rows {s.start}-{s.stop})") for i, s in enumerate(shards)]
    rec.add_shards(c.key for c in calls)
    return calls


def part_calls(first_pos, ranges):
    """What ``RayPool.featurize`` submits for the test ranges: (big, small) calls."""
    return [Call("featurize_test", (a, b), ("part", p), first_pos + p, rows=b - a, num_returns=2,
                 what=f"featurize_test({a}, {b})") for p, (a, b) in enumerate(ranges)]


def setup(n, **kw):
    cluster, clock = FakeCluster(n, **kw), Clock()
    return Recovery(cluster, n, clock=clock), cluster, clock


def undisturbed(n_workers, method, n_shards, *shared):
    rec, cluster, clock = setup(n_workers)
    return run(rec, cluster, clock, shard_calls(rec, method, specs(n_shards), *shared))


# ---------------------------------------------------------------------- nothing lost


def test_without_losses_each_shard_runs_once_on_its_first_worker():
    rec, cluster, clock = setup(3)
    out = run(rec, cluster, clock, shard_calls(rec, "score", specs(7), "theta"))
    assert out == [("score", s, "theta") for s in specs(7)]
    assert [w for w, _, _ in cluster.sent] == [i % 3 for i in range(7)]
    assert rec.summary() == empty_recovery()


# ---------------------------------------------------------------------- a lost actor, restarted


def test_lost_actor_is_restarted_and_its_calls_redone_there():
    rec, cluster, clock = setup(2, restart_pings=2)
    cluster.fail("score", 2)  # worker 0's process dies while scoring shard 2, once
    out = run(rec, cluster, clock, shard_calls(rec, "score", specs(6), "theta"))
    assert out == undisturbed(2, "score", 6, "theta")
    # Shard 4, queued behind shard 2 on the same actor, failed with it: both re-run on worker 0.
    assert cluster.worker_of("score", 2) == [0, 0] and cluster.worker_of("score", 4) == [0, 0]
    assert cluster.worker_of("score", 3) == [1]
    s = rec.summary()
    assert s["redone_calls"] == {"score": [2, 4]}
    assert [(r["worker"], r["node"]) for r in s["restarted_workers"]] == [(0, "node-0")]
    # Back at the third ping: pinged at once, then every PING_INTERVAL.
    assert s["restarted_workers"][0]["seconds"] == pytest.approx(2 * PING_INTERVAL + PING_INTERVAL / 2, abs=0.3)
    assert s["wait_seconds"] == s["restarted_workers"][0]["seconds"]
    assert s["lost_workers"] == [] and s["moved_shards"] == [] and s["lost_nodes"] == []
    assert cluster.killed == []


def test_actor_restarted_on_another_node_is_not_blamed():
    """A node lost while another has room: Ray restarts the actor there; the loss is the
    node's, so the call it was running is not counted against its shard."""
    rec, cluster, clock = setup(2, room=True)
    cluster.fail("hvp", 1, how="lose node", times=MAX_SHARD_LOSSES + 1)
    out = run(rec, cluster, clock, shard_calls(rec, "hvp", specs(4), "theta", "v"))
    assert out == undisturbed(2, "hvp", 4, "theta", "v")
    s = rec.summary()
    assert [(r["worker"], r["node"]) for r in s["restarted_workers"]] == [(1, "node-1-again")]
    assert s["redone_calls"] == {"hvp": [1, 3]} and s["lost_workers"] == []


# ---------------------------------------------------------------------- a lost node, no room


def test_lost_node_moves_its_shards_to_the_survivors():
    rec, cluster, clock = setup(3)
    cluster.fail("hvp", 1, how="lose node")  # worker 1's node goes away during shard 1
    out = run(rec, cluster, clock, shard_calls(rec, "hvp", specs(9), "theta"))
    assert out == undisturbed(3, "hvp", 9, "theta")
    s = rec.summary()
    # Given up at the first ping: the node is dead and no node has room, so no restart can come.
    (lost,) = s["lost_workers"]
    assert lost == {"worker": 1, "node": "node-1", "during": "hvp", "error": "WorkerGone",
                    "why": "its node is gone and no other node has room", "seconds_to_give_up": 0.25,
                    "shards_moved": [1, 4, 7]}
    assert s["lost_nodes"] == ["node-1"] and rec.dead == {1} and cluster.killed == [1]
    # Each to the survivor with the fewest shards (the lower index on a tie).
    assert s["moved_shards"] == [{"shard": 1, "from": 1, "to": 0}, {"shard": 4, "from": 1, "to": 2},
                                 {"shard": 7, "from": 1, "to": 0}]
    assert cluster.worker_of("hvp", 4) == [1, 2] and cluster.worker_of("hvp", 7) == [1, 0]
    assert sorted(s["redone_calls"]["hvp"]) == [1, 4, 7] and s["restarted_workers"] == []
    # Later runs send those shards straight to their new workers.
    again = run(rec, cluster, clock, shard_calls(rec, "score", specs(9)))
    assert again == undisturbed(3, "score", 9)
    assert [w for w, m, _ in cluster.sent if m == "score"] == [0, 0, 2, 0, 2, 2, 0, 0, 2]


def test_a_call_only_a_lost_worker_could_answer_has_no_answer():
    """A worker's summed call is not moved: its shards are re-mapped by the pool instead."""
    rec, cluster, clock = setup(2)
    rec.add_shards(("shard", i) for i in range(4))
    calls = [Call("summed", ("hvp", [s for s in specs(4) if s.index % 2 == w], "theta"), ("worker", w), w,
                  movable=False, worker=w) for w in range(2)]
    cluster.fail("summed", 1, how="lose node")
    out = run(rec, cluster, clock, calls)
    assert out[0] == ("summed", "hvp", [specs(4)[0], specs(4)[2]], "theta") and out[1] is None
    s = rec.summary()
    assert s["lost_workers"][0]["during"] == "hvp" and s["redone_calls"] == {}
    assert [m["shard"] for m in s["moved_shards"]] == [1, 3]
    assert rec.alive() == [0] and [w for w, m, _ in cluster.sent if m == "summed"] == [0, 1]


def test_a_restart_that_never_comes_is_given_up_after_the_wait():
    rec, cluster, clock = setup(2, restart_pings=10**6)  # restarting on its live node, forever
    cluster.fail("score", 0)
    out = run(rec, cluster, clock, shard_calls(rec, "score", specs(4)))
    assert out == undisturbed(2, "score", 4)
    (lost,) = rec.summary()["lost_workers"]
    assert lost["why"] == f"not back within {RESTART_WAIT:g} s" and lost["node"] == "node-0"
    assert RESTART_WAIT <= lost["seconds_to_give_up"] < RESTART_WAIT + 1
    assert rec.summary()["lost_nodes"] == []  # the node lives: a worker lost, not a node
    assert [m["to"] for m in rec.summary()["moved_shards"]] == [1, 1]


def test_an_actor_out_of_restarts_is_given_up_and_its_shards_move():
    rec, cluster, clock = setup(2)
    for shard in (0, 2, 4, 6):  # four deaths of worker 0, each on another shard
        cluster.fail("score", shard, worker=0)
    out = run(rec, cluster, clock, shard_calls(rec, "score", specs(8)))
    assert out == undisturbed(2, "score", 8)
    s = rec.summary()
    assert [r["worker"] for r in s["restarted_workers"]] == [0] * MAX_RESTARTS
    (lost,) = s["lost_workers"]
    assert (lost["worker"], lost["why"], lost["during"]) == (0, "dead for good", "score")
    assert s["lost_nodes"] == [] and [(m["shard"], m["to"]) for m in s["moved_shards"]] == [(0, 1), (2, 1),
                                                                                            (4, 1), (6, 1)]
    assert cluster.worker_of("score", 6)[-1] == 1


# ---------------------------------------------------------------------- a lost object


def _featurized(rec, cluster, clock, n_workers, n_shards, n_test):
    """What ``RayPool.featurize`` runs: the shards' prepare and one test part per worker."""
    step = n_test // n_workers
    ranges = [(p * step, (p + 1) * step) for p in range(n_workers)]
    prep = shard_calls(rec, "prepare", specs(n_shards))
    parts = part_calls(len(prep), ranges)
    out = run(rec, cluster, clock, prep + parts)
    return [c.refs[0] for c in parts], out


def test_lost_object_has_its_producer_rerun_and_its_waiters_resubmitted():
    rec, cluster, clock = setup(3)
    x_parts, _ = _featurized(rec, cluster, clock, 3, 9, 30)
    cluster.lose_node("node-1")  # between stages: worker 1 and test part 1 (rows 10-20) go with it
    out = run(rec, cluster, clock, shard_calls(rec, "score", specs(9), "theta", x_parts))
    features = [("x", 0, 10), ("x", 10, 20), ("x", 20, 30)]
    assert out == [("score", s, "theta", features) for s in specs(9)]
    s = rec.summary()
    # Recomputed once, though every score call read it, by the survivor with the fewest shards.
    assert s["recomputed_test_parts"] == [{"part": 1, "args": [10, 20], "worker": 2}]
    assert cluster.worker_of("featurize_test", 10) == [1, 1, 2]  # made; tried on the lost actor; again
    assert sorted(s["redone_calls"]["score"]) == list(range(9))  # every call waited for the part
    assert s["lost_nodes"] == ["node-1"] and [m["shard"] for m in s["moved_shards"]] == [1, 4, 7]
    # The calls that waited were sent again with the new part instead of the lost one.
    new = rec._subst[x_parts[1].id]
    redone = [args for w, m, args in cluster.sent if m == "score"][9:]
    assert all(args[2][1] is new and args[2][0] is x_parts[0] for args in redone[-2:])
    # A later call that names the lost part gets the new one without failing.
    sent = len(cluster.sent)
    assert run(rec, cluster, clock, [Call("reduce", (x_parts[1],), ("call", 0), 0)]) == [("reduce", ("x", 10, 20))]
    assert cluster.sent[sent][2] == (new,)


def test_a_part_lost_again_and_again_stops_the_job():
    rec, cluster, clock = setup(2)
    x_parts, _ = _featurized(rec, cluster, clock, 2, 2, 20)
    cluster.fragile_parts = True  # every new copy is lost before it is read
    cluster.lost.update(r.id for r in x_parts)
    with pytest.raises(ClusterError, match=rf"featurize_test\(0, 10\): its results were lost {MAX_SHARD_LOSSES} "
                                           "times; stopping. Finished work is kept"):
        run(rec, cluster, clock, shard_calls(rec, "score", specs(2), x_parts))
    assert len([p for p in rec.summary()["recomputed_test_parts"] if p["part"] == 0]) == MAX_SHARD_LOSSES - 1


def test_an_object_lost_is_fatal_when_reassignment_is_off(monkeypatch):
    monkeypatch.setattr(recovery, "REASSIGN_LOST_SHARDS", False)
    rec, cluster, clock = setup(2)
    x_parts, _ = _featurized(rec, cluster, clock, 2, 2, 20)
    cluster.lost.add(x_parts[1].id)
    with pytest.raises(ObjectGone):
        run(rec, cluster, clock, shard_calls(rec, "score", specs(2), x_parts))
    assert rec.summary()["recomputed_test_parts"] == []


# ---------------------------------------------------------------------- giving up


def test_a_shard_that_kills_every_worker_running_it_stops_the_job():
    rec, cluster, clock = setup(3)
    cluster.fail("score", 2, times=10**6)
    with pytest.raises(ClusterError) as err:
        run(rec, cluster, clock, shard_calls(rec, "score", specs(6)))
    assert str(err.value) == (
        f"shard 2 (training rows 20-30): the worker running it died {MAX_SHARD_LOSSES} times (last: WorkerGone); "
        "stopping, as a reason in its data (a crash, its memory) is likely. Finished work is kept: run the same "
        "command again to resume")
    # Shard 5, queued behind shard 2 each time, is not blamed: only the running call is.
    assert cluster.worker_of("score", 2) == [2] * MAX_SHARD_LOSSES


def test_losing_the_last_worker_stops_the_job():
    rec, cluster, clock = setup(1)
    for shard in range(MAX_RESTARTS + 1):
        cluster.fail("score", shard)
    with pytest.raises(ClusterError) as err:
        run(rec, cluster, clock, shard_calls(rec, "score", specs(MAX_RESTARTS + 1)))
    assert str(err.value) == (
        "every worker was lost (the last, worker 0 on node node-0, with WorkerGone during score); finished work "
        "is kept: run the same command again, on a cluster with room, to resume")
    assert cluster.killed == [0] and rec.alive() == []


def test_every_node_lost_stops_the_job():
    rec, cluster, clock = setup(2)
    cluster.fail("hvp", 0, how="lose node")
    cluster.fail("hvp", 1, how="lose node")
    with pytest.raises(ClusterError, match="every worker was lost"):
        run(rec, cluster, clock, shard_calls(rec, "hvp", specs(4)))


def test_a_lost_worker_fails_the_job_when_reassignment_is_off(monkeypatch):
    monkeypatch.setattr(recovery, "REASSIGN_LOST_SHARDS", False)
    rec, cluster, clock = setup(2)
    cluster.fail("prepare", 1, how="lose node")
    with pytest.raises(WorkerGone):
        run(rec, cluster, clock, shard_calls(rec, "prepare", specs(4)))
    assert rec.dead == set() and cluster.killed == []


def test_any_other_error_fails_the_job_at_once():
    rec, cluster, clock = setup(2)
    cluster.fail("score", 1, how="bad")
    calls = shard_calls(rec, "score", specs(4))
    with pytest.raises(BadRow):
        run(rec, cluster, clock, calls)
    assert len(cluster.sent) == 4 and rec.summary() == empty_recovery()
    assert not rec.recoverable(BadRow()) and rec.recoverable(WorkerGone())


def test_forget_drops_what_a_failed_run_waited_for():
    rec, cluster, clock = setup(2, restart_pings=10**6)
    cluster.fail("score", 0)
    calls = shard_calls(rec, "score", specs(2))
    for c in calls:
        rec.submit(c)
    pending = {}
    rec.on_failure(calls[0], cluster.result(calls[0].ref)[1], pending)
    assert rec.waiting and rec.poll_timeout == PING_INTERVAL / 2
    rec.forget()
    assert not rec.waiting and rec.poll_timeout is None and rec.probes() == {}


# ---------------------------------------------------------------------- the manifest's section


def test_the_summary_is_the_manifests_recovery_section():
    rec, cluster, clock = setup(3)
    assert rec.summary() == empty_recovery()
    cluster.fail("score", 1, how="lose node")
    run(rec, cluster, clock, shard_calls(rec, "score_partial", specs(6)))
    clock.now += 1
    rec.took(1.23456)
    s = rec.summary()
    assert set(s) == set(empty_recovery())
    assert s["redone_calls"] == {"score": [1, 4]}  # score_partial is recorded as the work it does
    assert s["lost_workers"][0]["during"] == "score"
    assert s["seconds"] == 1.235 and s["wait_seconds"] == 0.25
    # A copy: the caller may change it.
    s["moved_shards"].clear()
    s["redone_calls"]["score"] = []
    assert len(rec.summary()["moved_shards"]) == 2 and rec.summary()["redone_calls"] == {"score": [1, 4]}


def test_recovery_imports_no_ray():
    code = "import sys, distributed_influence.cluster.recovery\nprint('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
