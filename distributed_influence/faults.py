"""Fault injection for the reliability tests, switched on by one environment variable.

Losing a worker or the driver at a precise moment cannot be arranged reliably with sleeps and
signals from outside, so the job itself can be told to fail at a named point:

* ``DISTRIBUTED_INFLUENCE_FAULT=stop-driver-after:N`` — the driver raises after the scored
  results of N shards were persisted (a crash between shards).
* ``DISTRIBUTED_INFLUENCE_FAULT=kill-worker:SHARD:MARKER`` — the worker process scoring shard
  SHARD exits abruptly, once (the MARKER file records that it happened).
* ``DISTRIBUTED_INFLUENCE_FAULT=kill-worker-always:SHARD`` — every worker process that scores
  shard SHARD exits abruptly: a shard that takes down whichever worker runs it.
* ``DISTRIBUTED_INFLUENCE_FAULT=hold:WHERE:SHARD:DIR`` — the first process to reach WHERE (a
  worker method such as ``score`` for shard SHARD, or the driver entering the stage WHERE, with
  SHARD ``-1``) writes ``DIR/held`` (its Ray node id, or ``driver``) and waits until
  ``DIR/release`` exists. A test removes that node meanwhile: a node lost at a precise moment.
* ``DISTRIBUTED_INFLUENCE_FAULT=stop-driver-after-reduce:N`` — the driver raises after N reduce
  tasks' parts were persisted.
* ``DISTRIBUTED_INFLUENCE_FAULT=kill-reducer:PART:MARKER`` — the process running the reduce task
  of test part PART exits abruptly, once.

Unset (the normal case) nothing happens.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

FAULT_ENV = "DISTRIBUTED_INFLUENCE_FAULT"
#: A held process goes on by itself after this many seconds (a test that forgot to release).
HOLD_TIMEOUT = 300.0
HELD, RELEASE = "held", "release"


class InjectedFault(RuntimeError):
    """The failure asked for by :data:`FAULT_ENV`."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    shard: int = -1
    count: int = 0
    marker: str = ""
    where: str = ""


def from_env() -> Optional[Fault]:
    text = os.environ.get(FAULT_ENV, "").strip()
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
    raise ValueError(f"{FAULT_ENV}: unknown fault {text!r}")


def maybe_kill_worker(fault: Optional[Fault], shard: int, kind: str = "kill-worker") -> None:
    """Ends this process without cleanup, like a preempted node, the first time only."""
    if fault is None or fault.shard != shard:
        return
    if kind == "kill-worker" and fault.kind == "kill-worker-always":
        os._exit(1)
    if fault.kind != kind:
        return
    if os.path.exists(fault.marker):
        return
    with open(fault.marker, "w") as fh:
        fh.write(str(os.getpid()))
    os._exit(1)


def maybe_stop_driver(fault: Optional[Fault], shards_saved: int) -> None:
    if fault is not None and fault.kind == "stop-driver-after" and shards_saved >= fault.count:
        raise InjectedFault(f"injected driver failure after {shards_saved} scored shards")


def maybe_hold(fault: Optional[Fault], where: str, shard: int = -1, node: str = "driver") -> None:
    """Waits for the test's release at ``where``, the first time any process gets there.

    The marker is created exclusively, so exactly one process holds, even when the shard's
    call is re-run on another worker after the first one was lost.
    """
    if fault is None or fault.kind != "hold" or fault.where != where or fault.shard != shard:
        return
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


def maybe_stop_driver_in_reduce(fault: Optional[Fault], parts_saved: int) -> None:
    if fault is not None and fault.kind == "stop-driver-after-reduce" and parts_saved >= fault.count:
        raise InjectedFault(f"injected driver failure after {parts_saved} reduced parts")
