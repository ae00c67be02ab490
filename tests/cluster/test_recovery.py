"""The recovery state machine, without Ray: each transition on a fake cluster.

The fake (:mod:`fake_cluster`) stands for Ray; every test checks what a run returned (the same
as an undisturbed run's results, or the error that stops the job), where the calls went, and
the ``recovery`` section the manifest would report.
"""

import subprocess
import sys

import pytest
from fake_cluster import BadRow, Clock, FakeCluster, WorkerGone, run

from distributed_influence.cluster.recovery import (
    MAX_RESTARTS,
    MAX_SHARD_LOSSES,
    PING_INTERVAL,
    RESTART_WAIT,
    Call,
    Recovery,
)
from distributed_influence.engine.plan import ShardSpec
from distributed_influence.engine.pool import empty_recovery
from distributed_influence.errors import ClusterError


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
    # Lost with its node more times than a shard may take its worker down: never blamed.
    assert [(r["worker"], r["node"]) for r in s["restarted_workers"]] == [
        (1, f"node-1-{i}") for i in range(1, MAX_SHARD_LOSSES + 2)]
    assert s["redone_calls"] == {"hvp": [1, 3] * (MAX_SHARD_LOSSES + 1)} and s["lost_workers"] == []
    assert s["lost_nodes"] == []  # the worker came back: no node is reported lost


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
    # Every call waited for the part; those of the lost worker were moved first, then waited.
    assert sorted(s["redone_calls"]["score"]) == sorted([*range(9), 1, 4, 7])
    assert s["lost_nodes"] == ["node-1"] and [m["shard"] for m in s["moved_shards"]] == [1, 4, 7]
    # The calls that waited were sent again with the new part instead of the lost one.
    new = [t.refs[0] for t in cluster.tasks if t.method == "featurize_test"][-1]  # the part made again
    sent = [args[2] for w, m, args in cluster.sent if m == "score"]
    assert len(sent) == 9 + 3 + 9  # the run, the lost worker's calls moved, the calls that waited
    assert all(parts == x_parts for parts in sent[:12])
    assert all(parts == [x_parts[0], new, x_parts[2]] for parts in sent[12:])
    # A later call that names the lost part gets the new one without failing.
    n_sent = len(cluster.sent)
    assert run(rec, cluster, clock, [Call("reduce", (x_parts[1],), ("call", 0), 0)]) == [("reduce", ("x", 10, 20))]
    assert cluster.sent[n_sent][2] == (new,)


def test_a_part_lost_again_and_again_stops_the_job():
    rec, cluster, clock = setup(2)
    x_parts, _ = _featurized(rec, cluster, clock, 2, 2, 20)
    cluster.fragile_parts = True  # every new copy is lost before it is read
    cluster.lost.update(r.id for r in x_parts)
    with pytest.raises(ClusterError, match=rf"featurize_test\(0, 10\): its results were lost {MAX_SHARD_LOSSES} "
                                           "times; stopping. Finished work is kept"):
        run(rec, cluster, clock, shard_calls(rec, "score", specs(2), x_parts))
    assert len([p for p in rec.summary()["recomputed_test_parts"] if p["part"] == 0]) == MAX_SHARD_LOSSES - 1


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
    cluster.fail("score_partial", 1, how="lose node")
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
