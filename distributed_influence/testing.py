"""Fault injection for the reliability tests: the one module that knows about faults.

Losing a worker or the driver at a precise moment cannot be arranged reliably with sleeps and
signals from outside, so a test installs wrappers around the job's own functions that fail at a
named point. Nothing in the job's code checks for faults: :func:`install` replaces methods of
this package's own classes and functions of its own modules, in the processes where it runs.

How a test uses it:

* the test process (the driver) calls :func:`install` (the ``inject_fault`` fixture does, and
  undoes it afterwards);
* Ray worker processes run :func:`install` at their start when the test's Ray instance was
  started with :func:`runtime_env` (Ray's documented ``worker_process_setup_hook``);
* the fault to inject is read, at every check, from the file named by :data:`FAULT_FILE_ENV`,
  so a test can change it while Ray's processes live. Its text is one of:

  - ``stop-driver-after:N``: the driver raises after the scored results of N shards were
    persisted in this run (a crash between shards);
  - ``kill-worker:SHARD:MARKER``: the process scoring shard SHARD exits abruptly, once (the
    MARKER file records that it happened, with the process id);
  - ``kill-worker-always:SHARD``: every process that scores shard SHARD exits abruptly: a shard
    that takes down whichever worker runs it;
  - ``hold:WHERE:SHARD:DIR``: the first process to reach WHERE (a shard method such as
    ``prepare``, ``objective``, ``hvp`` or ``score`` for shard SHARD, or ``reduce`` with SHARD
    ``-1``: the driver entering the reduce stage) writes ``DIR/held`` (its Ray node id, or
    ``driver``) and waits until ``DIR/release`` exists, while the test removes that node;
  - ``stop-driver-after-reduce:N``: the driver raises after N reduce parts were persisted;
  - ``kill-reducer:PART:MARKER``: the process running the reduce task of test part PART exits
    abruptly, once.

With no file, or an empty one, nothing happens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, List, Optional, Tuple

#: Names the file holding the fault; set before Ray starts, so that its processes inherit it.
FAULT_FILE_ENV = "DISTRIBUTED_INFLUENCE_FAULT_FILE"
#: A held process goes on by itself after this many seconds (a test that forgot to release).
HOLD_TIMEOUT = 300.0
HELD, RELEASE = "held", "release"
#: The shard methods a ``hold`` can stop at (``score_partial`` holds as ``score``).
HOLD_METHODS = {"prepare": "prepare", "objective": "objective", "hvp": "hvp", "score_partial": "score"}


class InjectedFault(RuntimeError):
    """The driver failure asked for by the fault file."""


@dataclasses.dataclass(frozen=True)
class Fault:
    """One parsed fault (see the module's docstring for the kinds)."""

    kind: str
    shard: int = -1
    count: int = 0
    marker: str = ""
    where: str = ""


def parse(text: str) -> Optional[Fault]:
    """The fault a file's text asks for; None for an empty text.

    Raises:
        ValueError: an unknown kind (a typo in a test must not pass as "no fault").
    """
    text = text.strip()
    if not text:
        return None
    kind, _, rest = text.partition(":")
    if kind in ("stop-driver-after", "stop-driver-after-reduce"):
        return Fault(kind, count=int(rest))
    if kind in ("kill-worker", "kill-reducer"):
        shard, _, marker = rest.partition(":")
        return Fault(kind, shard=int(shard), marker=marker)
    if kind == "kill-worker-always":
        return Fault(kind, shard=int(rest))
    if kind == "hold":
        where, _, rest = rest.partition(":")
        shard, _, marker = rest.partition(":")
        return Fault(kind, shard=int(shard), marker=marker, where=where)
    raise ValueError(f"unknown fault {text!r}")


def current() -> Optional[Fault]:
    """The fault the file named by :data:`FAULT_FILE_ENV` asks for now, if any."""
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return None
    try:
        with open(path) as fh:
            return parse(fh.read())
    except FileNotFoundError:
        return None


def runtime_env() -> dict:
    """Ray's runtime environment that installs the wrappers in every worker process."""
    env = {"worker_process_setup_hook": f"{__name__}.install"}
    if os.environ.get(FAULT_FILE_ENV):
        env["env_vars"] = {FAULT_FILE_ENV: os.environ[FAULT_FILE_ENV]}
    return env


# ----------------------------------------------------------------------------- the faults


def _kill_once(fault: Fault) -> None:
    """Ends this process without cleanup, like a preempted node, unless the marker says it
    already happened."""
    if os.path.exists(fault.marker):
        return
    with open(fault.marker, "w") as fh:
        fh.write(str(os.getpid()))
    os._exit(1)


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id() or "driver"
    except Exception:  # noqa: BLE001 - outside Ray there is no node to name
        pass
    return "driver"


def _hold(fault: Fault, node: str) -> None:
    """Waits for the test's release; the marker is created exclusively, so exactly one process
    holds, even when the call is re-run on another worker after the first one was lost."""
    try:
        os.close(os.open(os.path.join(fault.marker, HELD + ".lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    tmp = os.path.join(fault.marker, HELD + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(node)
    os.replace(tmp, os.path.join(fault.marker, HELD))  # whole, or not there
    deadline = time.monotonic() + HOLD_TIMEOUT
    while not os.path.exists(os.path.join(fault.marker, RELEASE)) and time.monotonic() < deadline:
        time.sleep(0.05)


def _before_shard_method(name: str, spec) -> None:
    fault = current()
    if fault is None:
        return
    if fault.kind == "hold" and fault.where == HOLD_METHODS.get(name) and fault.shard == spec.index:
        _hold(fault, _node())
    if name == "score" and fault.shard == spec.index:
        if fault.kind == "kill-worker-always":
            os._exit(1)
        if fault.kind == "kill-worker":
            _kill_once(fault)


def _before_reduce_task(part: int) -> None:
    fault = current()
    if fault is not None and fault.kind == "kill-reducer" and fault.shard == part:
        _kill_once(fault)


def _before_reduce_stage() -> None:
    fault = current()
    if fault is not None and fault.kind == "hold" and fault.where == "reduce" and fault.shard == -1:
        _hold(fault, "driver")


def _after_save(store, name: str) -> None:
    """Counts what a run persisted (per work store: one per run) and fails the driver when
    the fault's count is reached."""
    fault = current()
    if fault is None:
        return
    prefix = {"stop-driver-after": "shard-", "stop-driver-after-reduce": "reduce-"}.get(fault.kind)
    if prefix is None or not name.startswith(prefix):
        return
    counts = store.__dict__.setdefault("_injected_fault_counts", {})
    counts[prefix] = counts.get(prefix, 0) + 1
    if counts[prefix] >= fault.count:
        what = "scored shards" if prefix == "shard-" else "reduced parts"
        raise InjectedFault(f"injected driver failure after {counts[prefix]} {what}")


# --------------------------------------------------------------------------- installation


def _wrapped(original: Callable, before: Optional[Callable] = None, after: Optional[Callable] = None):
    @functools.wraps(original)  # same name and module: Ray sends it by reference, as the original
    def call(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after(*args, **kwargs)
        return result

    call.__wrapped_by_fault_injection__ = True
    return call


def _targets() -> List[Tuple[object, str, Callable]]:
    """(owner, attribute, wrapper factory) of every point a fault can strike."""
    from distributed_influence.engine import reduce
    from distributed_influence.engine.shard import ShardWorker
    from distributed_influence.store import index
    from distributed_influence.store.workstore import WorkStore

    def shard_method(name):
        return lambda original: _wrapped(original, before=lambda self, spec, *a, **k: _before_shard_method(name, spec))

    points = [(ShardWorker, name, shard_method(name)) for name in ("prepare", "objective", "hvp", "score", "score_partial")]
    points.append((reduce, "reduce_test_range",
                   lambda original: _wrapped(original, before=lambda part, *a, **k: _before_reduce_task(part))))
    # The reduce stage's first step: writing the head of the index, before the pool is asked anything.
    points.append((index, "write_head", lambda original: _wrapped(original, before=lambda *a, **k: _before_reduce_stage())))
    points.append((WorkStore, "save",
                   lambda original: _wrapped(original, after=lambda self, name, *a, **k: _after_save(self, name))))
    return points


def install(setattr_: Optional[Callable] = None) -> None:
    """Wraps the fault points of this process (idempotent).

    Args:
        setattr_: how to replace an attribute; pytest's ``monkeypatch.setattr`` undoes it after
            the test. Default: plain ``setattr`` (a Ray worker process, for its whole life).
    """
    put = setattr_ or setattr
    for owner, name, wrap in _targets():
        original = getattr(owner, name)
        if getattr(original, "__wrapped_by_fault_injection__", False):
            continue
        put(owner, name, wrap(original))
