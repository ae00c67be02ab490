"""Losing the head node: the driver and its whole Ray instance die mid-scoring; the work store
on remote storage (a moto S3 server on loopback) is all that survives. The same command, run
again on a fresh Ray instance, resumes from it: the fit and the scored shards are reused, and
the tables equal those of an uninterrupted run exactly.

The command runs in a subprocess that owns its Ray instance (a local one, in a private temp dir,
like a head node's). Its workers are started with the fault-injection hook
(``distributed_influence.testing``), so the test can hold the last shard's scoring; it then kills
the subprocess and every process of its Ray instance, as losing the machine would.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest
from conftest import audit_config
from moto_s3 import moto_s3

from distributed_influence import load_results
from distributed_influence.engine.job import run_audit
from distributed_influence.testing import HELD

pytestmark = pytest.mark.slow  # Ray instances of its own

SHARDS = 3
#: One worker (and one CPU: no idle worker processes to start): it scores shards 0 and 1 (the
#: driver saves them) before it reaches shard 2, where it is held. With one worker, the in-process
#: engine adds the shards' sums in the same order, so its tables are an exact reference.
WORKERS = 1
HELD_SHARD = SHARDS - 1

#: The command with its own Ray instance: a local one started with the hook that lets the test hold
#: a worker, which the command then uses as it would any running Ray. Both runs use it, the second
#: with no fault to inject.
DRIVER = f"""
import sys
from distributed_influence import testing
from distributed_influence.cli import main
from distributed_influence.cluster.runtime import start_ray

start_ray(num_cpus={WORKERS}, runtime_env=testing.runtime_env())
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def s3():
    yield from moto_s3()


class Head:
    """The command in a subprocess with its own Ray instance: what losing the head node takes."""

    def __init__(self, args: list, log_path: str):
        # A short private temp dir (Unix socket paths are limited to ~107 bytes) that only this
        # instance's processes name, so the test can tell they are all gone.
        self.temp_dir = tempfile.mkdtemp(prefix="rayhl", dir="/tmp")
        env = dict(os.environ, RAY_TMPDIR=self.temp_dir)
        env.pop("RAY_ADDRESS", None)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, "-v", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()[-4000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def processes(self) -> list:
        """The subprocess and every process of its Ray instance still running."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and self.temp_dir in " ".join(p.info["cmdline"] or []):
                found.append(p)
        try:
            me = psutil.Process(self.proc.pid)
            found += [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        return list({p.pid: p for p in found}.values())

    def lose(self) -> None:
        """Kills the driver and its Ray instance at once, with no chance to clean up (nothing is
        left to kill once the command has ended by itself)."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _wait_for(what: str, ready, head: Head, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if head.proc.poll() is not None:
            raise AssertionError(f"the command ended ({head.proc.returncode}) before {what}:\n{head.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{head.log()}")
        time.sleep(0.1)


def test_rerun_on_a_new_cluster_resumes_from_the_work_store(s3, files, tmp_path, inject_fault):
    out = s3.uri("head-loss/out")
    args = ["audit", "--model", files["model"], "--train", files["train"], "--test", files["test"], "--out", out,
            "--k", "4", "--shards", str(SHARDS), "--workers", str(WORKERS)]

    # The first attempt: held while scoring the last shard, after the others were saved to S3.
    marker = tmp_path / "marker"
    marker.mkdir()
    inject_fault(f"hold:score:{HELD_SHARD}:{marker}")
    first = Head(args, str(tmp_path / "first.log"))
    try:
        _wait_for("the hold", lambda: (marker / HELD).exists(), first)
        saved = [f"shard-{i}.npz" for i in range(HELD_SHARD)]
        _wait_for("the saved shards", lambda: all(any(p.endswith("/" + f) for p in s3.listing("head-loss/out"))
                                                  for f in saved), first)
    finally:
        first.lose()
    assert first.processes() == []  # the driver and every process of its Ray instance are gone
    inject_fault(None)
    left = s3.listing("head-loss/out")
    assert "manifest.json" not in left and any(p.endswith("/fit.npz") for p in left), left

    # The new cluster: a fresh Ray instance, the same command.
    second = Head(args, str(tmp_path / "second.log"))
    try:
        code = second.wait(timeout=180)
    finally:
        second.lose()
    assert code == 0, second.log()
    assert second.processes() == []
    got = load_results(out)
    assert got.manifest["resume"] == {"reused_shards": list(range(HELD_SHARD)), "computed_shards": [HELD_SHARD],
                                      "fit_reused": True}, got.manifest["resume"]
    assert s3.listing("head-loss/out/_work") == []  # the work area is removed once published

    # An uninterrupted run: the in-process engine with the same shards sums them in the same order
    # as one Ray worker does, so its tables are the same bit for bit.
    run_audit(audit_config(files, str(tmp_path / "ref"), k=4, shards=SHARDS), use_ray=False)
    reference = load_results(str(tmp_path / "ref"))
    for name in ("influence_topk", "train_scores", "test_scores"):
        assert getattr(got, name).equals(getattr(reference, name)), name
