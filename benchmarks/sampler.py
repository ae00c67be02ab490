"""The process-tree sampler of the benchmarks: peak RSS and CPU time of a job's driver and every
process it starts (Ray's raylet, GCS and workers), and the CPU other processes took meanwhile.

Why a module of its own: every benchmark that reports "peak RSS of the worker" or "other
processes used N CPU-s" measures it here, so the figures of two scripts mean the same thing.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Dict

#: Seconds between two memory samples of the job's process tree.
SAMPLE_INTERVAL = 0.2


def import_psutil():
    """psutil, which Ray vendors in ``ray/thirdparty_files`` (put on sys.path by ``import ray``)."""
    try:
        import psutil
    except ImportError:
        # isort: off
        import ray  # noqa: F401 - adds Ray's third-party directory to sys.path
        import psutil
        # isort: on
    return psutil


@dataclasses.dataclass
class ProcSeen:
    """What the sampler saw of one process."""

    pid: int
    titles: set
    peak_rss: int = 0
    cpu_seconds: float = 0.0


def role_of(seen: ProcSeen, root_pid: int) -> str:
    """driver, worker (a Ray actor of the job), raylet, gcs, or other."""
    if seen.pid == root_pid:
        return "driver"
    text = " ".join(seen.titles)
    if "ray::WorkerActor" in text or "default_worker.py" in text:
        return "worker"
    if "raylet" in text:
        return "raylet"
    if "gcs_server" in text:
        return "gcs"
    return "other"


class TreeSampler(threading.Thread):
    """Samples RSS and CPU time of a process and all its descendants every ``interval`` s."""

    def __init__(self, root_pid: int, interval: float = SAMPLE_INTERVAL):
        super().__init__(daemon=True)
        self._psutil = import_psutil()
        self.root_pid = root_pid
        self.interval = interval
        self.seen: Dict[int, ProcSeen] = {}
        self.peak_tree_rss = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        """Samples until :meth:`stop`."""
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stops sampling and waits for the thread."""
        self._halt.set()
        self.join()

    def sample(self) -> None:
        """One sample of every live process of the tree."""
        ps = self._psutil
        try:
            root = ps.Process(self.root_pid)
            procs = [root] + root.children(recursive=True)
        except ps.Error:
            return
        total = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    cpu = p.cpu_times()
                    title = " ".join(p.cmdline()) or p.name()
            except ps.Error:
                continue
            s = self.seen.setdefault(p.pid, ProcSeen(p.pid, set()))
            s.titles.add(title[:200])
            s.peak_rss = max(s.peak_rss, rss)
            s.cpu_seconds = max(s.cpu_seconds, cpu.user + cpu.system)
            total += rss
        self.peak_tree_rss = max(self.peak_tree_rss, total)
        self.samples += 1

    def peaks(self) -> Dict[str, int]:
        """Largest per-process peak RSS for each role (0 when the role was never seen)."""
        out = {r: 0 for r in ("driver", "worker", "raylet", "gcs", "other")}
        for s in self.seen.values():
            r = role_of(s, self.root_pid)
            out[r] = max(out[r], s.peak_rss)
        return out

    def tree_cpu_seconds(self) -> float:
        """CPU seconds of every process of the tree, as last sampled."""
        return sum(s.cpu_seconds for s in self.seen.values())

    def count(self, role: str) -> int:
        """How many processes of a role were seen."""
        return sum(1 for s in self.seen.values() if role_of(s, self.root_pid) == role)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent not idle since boot (all cores)."""
    t = import_psutil().cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def steal_cpu_seconds() -> float:
    """CPU seconds the hypervisor ran something else on this machine's cores since boot (all
    cores; 0 where the system does not report it): part of :func:`busy_cpu_seconds`."""
    return float(getattr(import_psutil().cpu_times(), "steal", 0.0))


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all threads)."""
    t = os.times()
    return t.user + t.system


@dataclasses.dataclass
class Contention:
    """CPU used by processes outside the measured code while it ran (a noise indicator)."""

    wall: float
    foreign_cpu: float
    #: Of foreign_cpu, what the hypervisor took for other machines on the same host (steal).
    steal: float = 0.0

    @property
    def cores(self) -> float:
        """Average number of cores the other processes kept busy."""
        return self.foreign_cpu / self.wall if self.wall > 0 else 0.0

    def text(self) -> str:
        """One line for the report."""
        return (f"other processes used {self.foreign_cpu:.1f} CPU-s meanwhile "
                f"(on average {self.cores:.2f} of {os.cpu_count()} cores; of it the host, "
                f"for other machines: {self.steal:.1f})")
