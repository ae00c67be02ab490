"""Fault injection for the reliability tests, switched on by one environment variable.

Losing a worker or the driver at a precise moment cannot be arranged reliably with sleeps and
signals from outside, so the job itself can be told to fail at a named point:

* ``DISTRIBUTED_INFLUENCE_FAULT=stop-driver-after:N`` — the driver raises after the scored
  results of N shards were persisted (a crash between shards).
* ``DISTRIBUTED_INFLUENCE_FAULT=kill-worker:SHARD:MARKER`` — the worker process scoring shard
  SHARD exits abruptly, once (the MARKER file records that it happened).
* ``DISTRIBUTED_INFLUENCE_FAULT=stop-driver-after-reduce:N`` — the driver raises after N reduce
  tasks' parts were persisted.
* ``DISTRIBUTED_INFLUENCE_FAULT=kill-reducer:PART:MARKER`` — the process running the reduce task
  of test part PART exits abruptly, once.

Unset (the normal case) nothing happens.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

FAULT_ENV = "DISTRIBUTED_INFLUENCE_FAULT"


class InjectedFault(RuntimeError):
    """The failure asked for by :data:`FAULT_ENV`."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    shard: int = -1
    count: int = 0
    marker: str = ""


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
    raise ValueError(f"{FAULT_ENV}: unknown fault {text!r}")


def maybe_kill_worker(fault: Optional[Fault], shard: int, kind: str = "kill-worker") -> None:
    """Ends this process without cleanup, like a preempted node, the first time only."""
    if fault is None or fault.kind != kind or fault.shard != shard:
        return
    if os.path.exists(fault.marker):
        return
    with open(fault.marker, "w") as fh:
        fh.write(str(os.getpid()))
    os._exit(1)


def maybe_stop_driver(fault: Optional[Fault], shards_saved: int) -> None:
    if fault is not None and fault.kind == "stop-driver-after" and shards_saved >= fault.count:
        raise InjectedFault(f"injected driver failure after {shards_saved} scored shards")


def maybe_stop_driver_in_reduce(fault: Optional[Fault], parts_saved: int) -> None:
    if fault is not None and fault.kind == "stop-driver-after-reduce" and parts_saved >= fault.count:
        raise InjectedFault(f"injected driver failure after {parts_saved} reduced parts")
